"""Streaming token2wav: codec tokens → mel (flow-matching DiT) → 24 kHz audio (BigVGAN).

The release runs token2wav once, over the whole reply, after the talker has finished.
Here it runs per chunk of codec tokens while the talker is still generating:

* the DiT attends block-locally (24-frame blocks, one block of look-ahead in one layer
  and of look-back in two), so a chunk is computed over a *window*: ``context`` tokens
  before it, the chunk, and ``lookahead`` tokens after it; only the chunk's frames are
  kept. The ODE starts from noise drawn once per reply (seeded), indexed by frame, so a
  frame's starting point does not depend on the chunking;
* every window has the same length: shorter ones (the first chunk, the last) are padded
  with frames in a block of their own, which no real frame attends to and which attend
  to no real frame — padding changes nothing, and one CUDA graph serves every window;
* BigVGAN vocodes the chunk's frames with ``vocoder_context`` frames of mel on each side
  (from the previous chunk, and the DiT's provisional frames after the chunk), keeping
  only the chunk's samples.

:class:`Token2Wav` holds the graphs and static buffers and runs a batch of chunk jobs of
several sessions as one DiT call and one BigVGAN call; on CUDA it runs them on a side
stream so the talker keeps decoding meanwhile. The chunked output is not bit-equal to
the offline pass (the ODE's 36 evaluations widen the receptive field beyond a window);
:func:`ode_mel` over a full window is, and tests check that against ``sample()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from duplexd.actors.engines.qwen_omni.decoder import bucket_for, buckets
from duplexd.actors.engines.qwen_omni.graphs import GraphCache

HOP = 240  # BigVGAN samples per mel frame at 24 kHz (5*3*2*2*2*2)
PAD_BLOCK = 1 << 20  # block id of padding frames: far from every real block


def mel_pad_value() -> float:
    """The mel value BigVGAN's preprocessing maps to 0 (what its conv padding sees)."""
    # processed = 2 * (db + 115) / 115 - 1 = 0  <=>  db = -57.5;  db = 20 log10(exp(mel)) - 20
    return (-57.5 + 20.0) / 20.0 * math.log(10.0)


def time_points(steps: int, sway: float) -> list[float]:
    """The ODE's time grid, exactly as ``Qwen2_5OmniToken2WavDiTModel.sample`` builds it."""
    t = torch.linspace(0, 1, steps, dtype=torch.float32)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return [float(v) for v in t]


def dit_eval(
    dit: Any,
    x: torch.Tensor,
    t: float,
    code: torch.Tensor,
    spk: torch.Tensor,
    ecapa: torch.Tensor,
    block_ids: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """One classifier-free-guided velocity of the DiT. ``x`` [B, F, mel] state, ``code``
    [B, F/2] codec ids, ``spk`` [B, enc_emb] conditioning, ``ecapa`` [2B, enc_dim] the
    speaker encoder on (reference mel; zeros), ``block_ids`` [B, F] attention blocks."""
    b, f, _ = x.shape
    cond = dit.text_embed(code)  # repeated to frames inside
    uncond = dit.text_embed(code, drop_code=True)
    x2 = torch.cat([x, x], dim=0)
    spk2 = torch.cat([spk, torch.zeros_like(spk)], dim=0)[:, None].expand(2 * b, f, -1)
    ec2 = ecapa[:, None].expand(2 * b, f, -1)
    code2 = torch.cat([cond, uncond], dim=0)
    h = dit.input_embed.proj(torch.cat((x2, ec2, code2, spk2), dim=-1))
    ts = torch.full((2 * b,), t, dtype=x.dtype, device=x.device)
    temb = dit.time_embed(ts)
    pos = torch.arange(f, device=x.device)[None].expand(2 * b, f)
    rope = dit.rotary_embed(h, pos)
    ids = torch.cat([block_ids, block_ids], dim=0)
    block_diff = (ids[:, None, :] - ids[:, :, None])[:, None]  # [2B, 1, F, F]: j's block - i's block
    for blk in dit.transformer_blocks:
        h = blk(h, temb, position_embeddings=rope, block_diff=block_diff)
    h = dit.norm_out(h, temb)
    out = dit.proj_out(h)
    guided, null = torch.chunk(out, 2, dim=0)
    return guided + (guided - null) * guidance


def ode_mel(
    dit: Any,
    noise: torch.Tensor,
    code: torch.Tensor,
    spk: torch.Tensor,
    ecapa: torch.Tensor,
    block_ids: torch.Tensor,
    steps: int,
    guidance: float,
    sway: float,
) -> torch.Tensor:
    """The RK4 flow-matching integration of ``sample()``: noise → mel [B, F, mel]."""
    ts = time_points(steps, sway)

    def f(t: float, y: torch.Tensor) -> torch.Tensor:
        return dit_eval(dit, y, t, code, spk, ecapa, block_ids, guidance)

    y = noise
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        dt = t1 - t0
        k1 = f(t0, y)
        k2 = f(t0 + dt / 3, y + dt * k1 / 3)
        k3 = f(t0 + 2 * dt / 3, y + dt * (k2 - k1 / 3))
        k4 = f(t1, y + dt * (k1 - k2 + k3))
        y = y + (k1 + 3 * (k2 + k3) + k4) * dt / 8
    return y


def vocode(big: Any, mel: torch.Tensor) -> torch.Tensor:
    """BigVGAN's forward without its ``.cpu()`` (so it can be captured): mel [B, mel, F] → [B, F*240]."""
    min_level = math.exp(-115 / 20.0 * math.log(10))
    amp = torch.exp(mel)
    db = 20 * torch.log10(torch.clamp(amp, min=min_level)) - 20
    x = torch.clamp(2 * ((db + 115) / 115) - 1, -1, 1)
    x = big.conv_pre(x)
    for i in range(big.num_upsample_layers):
        x = big.ups[i][0](x)
        x = sum(big.resblocks[i * big.num_residual_blocks + j](x) for j in range(big.num_residual_blocks))
        x = x / big.num_residual_blocks
    x = big.activation_post(x)
    x = big.conv_post(x)
    return torch.clamp(x, -1.0, 1.0)[:, 0]


@dataclass(slots=True)
class ChunkJob:
    """One chunk of one session: codec tokens [c0, c1) of its reply."""

    key: Any  # the caller's handle
    codes: list[int]  # all codec tokens of the reply so far
    c0: int
    c1: int
    noise: torch.Tensor  # [frames of the whole reply, mel] the reply's noise
    spk: torch.Tensor  # [1, enc_emb]
    ecapa: torch.Tensor  # [2, enc_dim] (reference mel, zeros)
    left_mel: torch.Tensor | None  # [mel, k] last frames of the previous chunk
    final: bool  # the reply's last chunk (no right context exists)


@dataclass(slots=True)
class ChunkAudio:
    key: Any
    c1: int  # the chunk ended at this codec token
    pcm: torch.Tensor  # [samples] float32 on the CPU
    tail_mel: torch.Tensor  # [mel, k] for the next chunk's left context (device)


class Token2Wav:
    """Batched, graph-captured, asynchronous chunked token2wav (see module docstring)."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int,
        chunk: int,
        first_chunk: int,
        lookahead: int,
        context: int,
        vocoder_context: int,
        steps: int,
        guidance: float,
        sway: float,
        graphs: bool,
    ) -> None:
        self.dit = model.code2wav_dit_model
        self.big = model.code2wav_bigvgan_model
        self.device, self.dtype = device, dtype
        self.repeats = int(self.dit.repeats)
        self.block = int(self.dit.block_size)
        self.mel_dim = int(self.dit.mel_dim)
        self.num_embeds = int(self.dit.config.num_embeds)
        self.chunk, self.first, self.la, self.ctx = chunk, first_chunk, lookahead, context
        self.vctx = vocoder_context
        self.steps, self.guidance, self.sway = steps, guidance, sway
        self.window = context + max(chunk, first_chunk) + lookahead  # codec tokens per DiT window
        self.frames = self.window * self.repeats
        self.vframes = 2 * vocoder_context + max(chunk, first_chunk) * self.repeats
        self.b_buckets = buckets(max_batch)
        B = max_batch
        self._noise = torch.zeros(B, self.frames, self.mel_dim, device=device, dtype=dtype)
        self._code = torch.zeros(B, self.window, dtype=torch.long, device=device)
        self._spk = torch.zeros(B, int(model.config.dit_config.enc_emb_dim), device=device, dtype=dtype)
        self._ecapa = torch.zeros(2 * B, int(model.config.dit_config.enc_dim), device=device, dtype=dtype)
        self._bid = torch.full((B, self.frames), PAD_BLOCK, dtype=torch.long, device=device)
        self._vmel = torch.full((B, self.mel_dim, self.vframes), mel_pad_value(), device=device, dtype=dtype)
        self.graphs = GraphCache(device, graphs, "token2wav")
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._inflight: tuple[list[ChunkJob], list[tuple[int, int, int]], Any, Any, Any] | None = None
        self.calls = 0
        self.busy_s = 0.0
        self._launched_at = 0.0
        self.last_s = 0.0  # launch to results of the last call (device time, batched)

    # ------------------------------------------------------------------ per speaker
    def speaker_features(self, ref_mel: torch.Tensor) -> torch.Tensor:
        """[2, enc_dim]: the DiT's speaker encoder on the reference mel and on zeros (the
        unconditional half of guidance), computed once per voice instead of per step."""
        ref = ref_mel.to(self.device, self.dtype)
        return self.dit.input_embed.spk_encoder(torch.cat([ref, torch.zeros_like(ref)], dim=0))

    def noise_for_reply(self, max_codes: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        n = torch.randn(max_codes * self.repeats, self.mel_dim, generator=g)
        return n.to(self.device, self.dtype)

    # ------------------------------------------------------------------ graphs
    def _dit_fn(self, b: int) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            ec = torch.cat([self._ecapa[:b], self._ecapa[self._ecapa.shape[0] // 2 : self._ecapa.shape[0] // 2 + b]])
            return ode_mel(
                self.dit,
                self._noise[:b],
                self._code[:b],
                self._spk[:b],
                ec,
                self._bid[:b],
                self.steps,
                self.guidance,
                self.sway,
            )

        return fn

    def _voc_fn(self, b: int) -> Callable[[], torch.Tensor]:
        return lambda: vocode(self.big, self._vmel[:b])

    def capture(self) -> None:
        for b in self.b_buckets:
            self.graphs.capture(("dit", b), self._dit_fn(b), stream=None)
            self.graphs.capture(("voc", b), self._voc_fn(b), stream=None)

    # ------------------------------------------------------------------ jobs
    def ready(self, codes: int, done: int, final: bool) -> tuple[int, int] | None:
        """The next chunk [c0, c1) once ``codes`` tokens exist and ``done`` have audio."""
        if done >= codes and final:
            return None
        c1 = self.first if done == 0 else done + self.chunk
        if final:
            return (done, min(c1, codes)) if codes > done else None
        if codes >= c1 + self.la:
            return done, c1
        return None

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    def done(self) -> bool:
        """A call is in flight and the device has finished it."""
        if self._inflight is None:
            return False
        event = self._inflight[4]
        return event is None or bool(event.query())

    def launch(self, jobs: list[ChunkJob]) -> None:
        """Starts one batched call (at most ``max_batch`` jobs; one call in flight)."""
        assert self._inflight is None and jobs
        t0 = time.perf_counter()
        b = bucket_for(len(jobs), self.b_buckets)
        half = self._ecapa.shape[0] // 2
        spans = []
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else _nullcontext()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            self._noise.zero_()
            self._code.zero_()
            self._bid.fill_(PAD_BLOCK)
            for i, j in enumerate(jobs):
                w0 = max(0, j.c0 - self.ctx)
                w1 = min(len(j.codes), j.c1 + self.la)
                n = w1 - w0
                fr = n * self.repeats
                codes = torch.tensor(j.codes[w0:w1], dtype=torch.long).clamp_(0, self.num_embeds - 1)
                self._code[i, :n].copy_(codes.to(self.device, non_blocking=True))
                self._noise[i, :fr].copy_(j.noise[w0 * self.repeats : w1 * self.repeats])
                self._bid[i, :fr].copy_(torch.arange(fr, device=self.device) // self.block)
                self._spk[i].copy_(j.spk[0])
                self._ecapa[i].copy_(j.ecapa[0])
                self._ecapa[half + i].copy_(j.ecapa[1])
                spans.append((w0, w1, n))
            mel = self.graphs.run(("dit", b), self._dit_fn(b))  # [b, frames, mel]
            self._vmel.fill_(mel_pad_value())
            tails = []
            for i, (j, (w0, w1, _)) in enumerate(zip(jobs, spans, strict=True)):
                a = (j.c0 - w0) * self.repeats
                c = (j.c1 - w0) * self.repeats
                right = mel[i, c : min(c + self.vctx, (w1 - w0) * self.repeats)].T
                left = j.left_mel if j.left_mel is not None else mel.new_zeros(self.mel_dim, 0)
                body = mel[i, a:c].T
                seq = torch.cat([left, body, right], dim=1)
                self._vmel[i, :, : seq.shape[1]].copy_(seq)
                keep = body[:, -self.vctx :].clone() if self.vctx else body[:, :0]
                tails.append((left.shape[1], body.shape[1], keep))
            wav = self.graphs.run(("voc", b), self._voc_fn(b))  # [b, vframes * HOP]
            pcm = [wav[i, lf * HOP : (lf + bf) * HOP].float().clone() for i, (lf, bf, _) in enumerate(tails)]
            done = torch.cuda.Event() if self.stream is not None else None
            if done is not None:
                done.record(self.stream)
        self._inflight = (jobs, spans, pcm, [t[2] for t in tails], done)
        self._launched_at = t0
        self.calls += 1
        self.busy_s += time.perf_counter() - t0

    def poll(self) -> list[ChunkAudio]:
        """Results of the call in flight, once the device has finished it (else [])."""
        if self._inflight is None:
            return []
        jobs, _, pcm, tails, done = self._inflight
        if done is not None and not done.query():
            return []
        self._inflight = None
        self.last_s = time.perf_counter() - self._launched_at
        out = []
        for j, p, tail in zip(jobs, pcm, tails, strict=True):
            out.append(ChunkAudio(j.key, j.c1, torch.nan_to_num(p).cpu(), tail))
        return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
