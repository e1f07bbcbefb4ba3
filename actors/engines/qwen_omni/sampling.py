"""Batched next-token choice: one call for all sessions of a step.

Per row: suppressed ids, a minimum length (end tokens suppressed before it), repetition
penalty over ids already used (transformers' rule: positive logits divided, negative
multiplied), then greedy argmax or temperature + top-k + top-p sampling.
"""

from __future__ import annotations

import torch


class Sampler:
    """Logit rules shared by every row; temperatures, greediness and history per row."""

    def __init__(
        self,
        vocab: int,
        suppress: list[int],
        eos: list[int],
        device: torch.device,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.vocab = vocab
        self.device = device
        self.top_k = top_k
        self.top_p = top_p
        self.penalty = repetition_penalty
        self.suppress = torch.tensor(sorted(set(suppress)), dtype=torch.long, device=device)
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long, device=device)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        greedy: list[bool],
        temperature: list[float],
        no_eos: list[bool] | None = None,
        seen: torch.Tensor | None = None,
    ) -> list[int]:
        """``logits`` [n, vocab]; ``no_eos[i]``: row i may not end yet; ``seen`` [n, vocab]
        bool: ids row i already used (repetition penalty). Returns one id per row."""
        x = logits.float()
        if x.shape[-1] > self.vocab:
            x = x[:, : self.vocab]
        x = x.clone()
        if self.suppress.numel():
            x[:, self.suppress] = float("-inf")
        if no_eos is not None and any(no_eos):
            rows = torch.tensor([i for i, f in enumerate(no_eos) if f], device=x.device)
            x[rows[:, None], self.eos[None, :]] = float("-inf")
        if seen is not None and self.penalty != 1.0:
            pen = torch.where(x > 0, x / self.penalty, x * self.penalty)
            x = torch.where(seen, pen, x)
        out = x.argmax(dim=-1)
        if not all(greedy):
            t = torch.tensor([max(1e-5, v) for v in temperature], device=x.device, dtype=x.dtype)[:, None]
            y = x / t
            if self.top_k and self.top_k < y.shape[-1]:
                kth = torch.topk(y, self.top_k, dim=-1).values[:, -1:]
                y = y.masked_fill(y < kth, float("-inf"))
            if self.top_p < 1.0:
                srt, idx = torch.sort(y, dim=-1, descending=True)
                cum = torch.softmax(srt, dim=-1).cumsum(dim=-1)
                drop = cum - torch.softmax(srt, dim=-1) > self.top_p  # keep the first token past top_p
                srt = srt.masked_fill(drop, float("-inf"))
                y = torch.full_like(y, float("-inf")).scatter(-1, idx, srt)
            probs = torch.softmax(y, dim=-1)
            drawn = torch.multinomial(probs, 1, generator=self.gen)[:, 0]
            g = torch.tensor(greedy, device=x.device)
            out = torch.where(g, out, drawn)
        return [int(v) for v in out.tolist()]
