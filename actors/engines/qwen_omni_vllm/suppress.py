"""The ids the thinker never samples, masked to -inf inside vLLM's sampler.

One fixed set for every request (special tokens, ids past the text vocabulary), so it is
one engine-wide logits processor with a precomputed index: a single ``index_fill_`` per
step. (Per-request alternatives cost too much: ``allowed_token_ids`` is a 152k-id list
that vLLM checks and turns into a mask in Python on every request, and ``logit_bias``
is clamped to -100 and rebuilt per step in Python.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def suppress_processor(ids: Sequence[int]) -> type:
    """A vLLM V1 ``LogitsProcessor`` class that masks ``ids`` for every request."""
    import torch
    from vllm.v1.sample.logits_processor import LogitsProcessor  # type: ignore[import-not-found]

    fixed = tuple(int(i) for i in ids)

    class SuppressIds(LogitsProcessor):  # type: ignore[misc]
        """Masks the thinker's never-sampled ids (applied in greedy decoding too)."""

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            self.ids = torch.tensor(fixed, dtype=torch.long, device=device)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes what argmax picks

        def update_state(self, batch_update: Any) -> None:
            pass  # the same ids for every request

        def apply(self, logits: Any) -> Any:
            if self.ids.numel():
                logits.index_fill_(1, self.ids, float("-inf"))
            return logits

    return SuppressIds
