"""Streaming token2wav: codec tokens → mel (flow-matching DiT) → 24 kHz audio (BigVGAN).

The release runs token2wav once, over the whole reply, after the talker has finished.
Here it runs per chunk of codec tokens while the talker is still generating:

* the DiT attends block-locally (24-frame blocks, one block of look-ahead in one layer
  and of look-back in two), so a chunk is computed over a *window*: ``context`` tokens
  before it, the chunk, and ``lookahead`` tokens after it; only the chunk's frames are
  kept. The ODE starts from noise drawn once per reply (seeded), indexed by frame, so a
  frame's starting point does not depend on the chunking;
* windows come in two lengths: the first chunk's (the chunk and its look-ahead, no
  context before it: a third of the frames of a later window, and it is the call on the
  path to a reply's first audio) and every later one's. Shorter windows (the last) are
  padded with frames in a block of their own, which no real frame attends to and which
  attend to no real frame — padding changes nothing, and one CUDA graph per batch and
  window length serves every window;
* BigVGAN vocodes the chunk's frames with ``vocoder_context`` frames of mel on each side
  (from the previous chunk, and the DiT's provisional frames after the chunk), keeping
  only the chunk's samples.

:class:`Token2Wav` holds the graphs and static buffers and runs a batch of chunk jobs of
several sessions as one DiT call and one BigVGAN call; on CUDA it runs them on a side
stream so the talker keeps decoding meanwhile (a high-priority stream when the batch
holds a reply's first chunk: that call is what the user waits for; later chunks have
the audio already played as slack). The DiT runs as the prepared velocity field of
:mod:`.dit` (checked against the transformers layers at load). The chunked output is not bit-equal to
the offline pass (the ODE's 36 evaluations widen the receptive field beyond a window);
:func:`ode_mel` over a full window is, and tests check that against ``sample()``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from duplexd.actors.engines.qwen_omni.decoder import bucket_for, buckets
from duplexd.actors.engines.qwen_omni.dit import DiTField, dit_eval, ode_mel, reference_ode_mel, time_points
from duplexd.actors.engines.qwen_omni.graphs import GraphCache
from duplexd.bus.log import get_logger, log

__all__ = ["ChunkAudio", "ChunkJob", "Token2Wav", "dit_eval", "ode_mel", "time_points", "vocode"]
_log = get_logger(__name__)

HOP = 240  # BigVGAN samples per mel frame at 24 kHz (5*3*2*2*2*2)
PAD_BLOCK = 1 << 20  # block id of padding frames: far from every real block


def mel_pad_value() -> float:
    """The mel value BigVGAN's preprocessing maps to 0 (what its conv padding sees)."""
    # processed = 2 * (db + 115) / 115 - 1 = 0  <=>  db = -57.5;  db = 20 log10(exp(mel)) - 20
    return (-57.5 + 20.0) / 20.0 * math.log(10.0)


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


# The fast field may differ from the transformers layers by rounding only; beyond this
# (relative to the velocity's size) it is taken to be wrong and the reference runs.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


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
        fast_dit: bool = True,
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
        self.window = context + max(chunk, first_chunk) + lookahead  # codec tokens per DiT window (the longest)
        # Window lengths with a graph each: the first chunk's, and the longest.
        self.windows = sorted({min(first_chunk + lookahead, self.window), self.window})
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
        self.field: DiTField | None = None
        self.check_error: float | None = None  # the fast field against the transformers layers
        if fast_dit:
            t0 = time.perf_counter()
            field = DiTField(self.dit, steps, sway, guidance)
            self.check_error = field.check()
            ok = self.check_error <= CHECK_TOLERANCE.get(dtype, 3e-2)
            log(_log, logging.INFO if ok else logging.ERROR,
                "token2wav DiT field checked" if ok else "token2wav DiT field disagrees with transformers; "
                "running the transformers layers", relative_error=f"{self.check_error:.2e}",
                prepare_s=round(time.perf_counter() - t0, 3))
            self.field = field if ok else None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device=device)
            try:  # lower is higher; the default stream (the decode steps) is at 0
                self.first_stream = torch.cuda.Stream(device=device, priority=-1)
            except Exception:  # no stream priorities here: one side stream for every call
                self.first_stream = self.stream
        else:
            self.stream = self.first_stream = None
        self._inflight: tuple[list[ChunkJob], list[tuple[int, int, int]], Any, Any, Any] | None = None
        self.calls = 0
        self.busy_s = 0.0
        self._launched_at = 0.0
        self.last_s = 0.0  # launch to results of the last call (device time, batched)
        self.last_key: tuple[int, int] = (0, 0)  # (batch bucket, window frames) of the last call

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
    def dit_fn(self, b: int, frames: int) -> Callable[[], torch.Tensor]:
        """The DiT over the static buffers of ``b`` rows and ``frames`` frames."""
        tokens = frames // self.repeats

        def fn() -> torch.Tensor:
            half = self._ecapa.shape[0] // 2
            ec = torch.cat([self._ecapa[:b], self._ecapa[half : half + b]])
            args = (self._noise[:b, :frames], self._code[:b, :tokens], self._spk[:b], ec, self._bid[:b, :frames])
            if self.field is not None:
                return self.field.ode(*args)
            return reference_ode_mel(self.dit, *args, self.steps, self.guidance, self.sway)

        return fn

    def voc_fn(self, b: int) -> Callable[[], torch.Tensor]:
        return lambda: vocode(self.big, self._vmel[:b])

    def capture(self) -> None:
        for b in self.b_buckets:
            for w in self.windows:
                self.graphs.capture(("dit", b, w * self.repeats), self.dit_fn(b, w * self.repeats), stream=None)
            self.graphs.capture(("voc", b), self.voc_fn(b), stream=None)

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
        for j in jobs:
            w0 = max(0, j.c0 - self.ctx)
            w1 = min(len(j.codes), j.c1 + self.la)
            spans.append((w0, w1, w1 - w0))
        window = bucket_for(max(n for _, _, n in spans), self.windows)
        frames = window * self.repeats
        self.last_key = (b, frames)
        first = any(j.c0 == 0 for j in jobs)
        stream = self.first_stream if first else self.stream
        ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            self._noise[:b, :frames].zero_()
            self._code[:b, :window].zero_()
            self._bid[:b, :frames].fill_(PAD_BLOCK)
            for i, (j, (w0, w1, n)) in enumerate(zip(jobs, spans, strict=True)):
                fr = n * self.repeats
                codes = torch.tensor(j.codes[w0:w1], dtype=torch.long).clamp_(0, self.num_embeds - 1)
                self._code[i, :n].copy_(codes.to(self.device, non_blocking=True))
                self._noise[i, :fr].copy_(j.noise[w0 * self.repeats : w1 * self.repeats])
                self._bid[i, :fr].copy_(torch.arange(fr, device=self.device) // self.block)
                self._spk[i].copy_(j.spk[0])
                self._ecapa[i].copy_(j.ecapa[0])
                self._ecapa[half + i].copy_(j.ecapa[1])
            mel = self.graphs.run(("dit", b, frames), self.dit_fn(b, frames))  # [b, frames, mel]
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
            wav = self.graphs.run(("voc", b), self.voc_fn(b))  # [b, vframes * HOP]
            pcm = [wav[i, lf * HOP : (lf + bf) * HOP].float().clone() for i, (lf, bf, _) in enumerate(tails)]
            done = torch.cuda.Event() if stream is not None else None
            if done is not None:
                done.record(stream)
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
