"""One Moshi step for every occupied slot at once: codec, temporal LM, depth decoder, codec.

State lives in a fixed table of ``slots`` rows. A step over a bucket of ``B`` rows runs
on rows ``[:B]`` (slots are leased lowest first, so the occupied ones sit at the bottom;
a free row inside the bucket computes and is ignored). On CUDA each bucket's step is
captured once as four CUDA graphs (encode, LM, depth, decode), replayed with no host
work but two copies: input audio and controls in, outputs out. Nothing in the step reads
a tensor value on the host, allocates outside the graph pool or draws from a global
random generator (sampling noise is counter-based, see sampling.py).

Per frame ``t`` of a slot (Moshi's delay pattern, as Kyutai's LMGen): the user's audio
is encoded (codebook 0 of frame t, acoustic codebooks of frame t-1 enter the LM); the LM
sees the text token and Moshi's 8 codes sampled at t-1; it samples text_t, the depth
decoder samples codes_t (semantic of t, acoustic of t-1). The output frame is time t-1:
(text_{t-1}, semantic_{t-1}, acoustic from codes_t), decoded to 1920 samples. Frame 0
has no output (Moshi's one-frame acoustic delay).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from duplexd.actors.engines.moshi.lm import DepthDecoder, TemporalLM
from duplexd.actors.engines.moshi.mimi import StreamingMimi
from duplexd.actors.engines.moshi.sampling import sample_top_k, stream_key

PHASES = ("mimi_encode", "lm", "depth", "mimi_decode")


def _attention_backends() -> contextlib.AbstractContextManager[None]:
    """SDPA kernels the step may use: flash (no mask), memory-efficient (masks) and math.
    cuDNN attention is left out: its shape coverage for one-query decoding has varied
    across torch releases, and a captured graph must not meet an unsupported case."""
    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass(frozen=True, slots=True)
class StepConfig:
    """What the step needs besides the model (from MoshiOptions)."""

    slots: int
    context: int
    buckets: tuple[int, ...]
    cuda_graphs: bool = True
    temp_text: float = 0.7
    temp_audio: float = 0.8
    top_k_text: int = 25
    top_k_audio: int = 250
    text_pad_id: int = 3


@dataclass(slots=True)
class StepOutput:
    """Host copies of one step's outputs, rows ``[:B]`` (one per slot of the bucket)."""

    text: np.ndarray  # [B] int64: text token of the output frame
    pcm: np.ndarray  # [B, 1920] float32: the output frame's audio (24 kHz)
    rms: np.ndarray  # [B] float32
    listen_prob: np.ndarray  # [B] float32: P(text pad) of the output frame's text
    codes: np.ndarray  # [B, 8] int64: the output frame's codes
    phase_ms: dict[str, float] = field(default_factory=dict)  # GPU time per phase (timing on)


class _State:
    """The slot table's device tensors (inputs, recurrent state, outputs)."""

    def __init__(self, n: int, codebooks: int, frame: int, device: torch.device, mimi_dtype: torch.dtype) -> None:
        z = {"device": device}
        self.t = torch.zeros(n, dtype=torch.int64, **z)
        self.seed = torch.zeros(n, dtype=torch.int64, **z)
        self.ctrl = torch.zeros(n, 3, dtype=torch.float32, **z)  # log listen bias, force listen, temperature scale
        self.pcm_in = torch.zeros(n, 1, frame, dtype=mimi_dtype, **z)
        self.last_text = torch.zeros(n, dtype=torch.int64, **z)
        self.last_codes = torch.zeros(n, codebooks, dtype=torch.int64, **z)
        self.user_prev = torch.zeros(n, codebooks - 1, dtype=torch.int64, **z)
        self.last_listen = torch.zeros(n, dtype=torch.float32, **z)
        # between phases (static so separate graphs can hand over)
        self.ucodes = torch.zeros(n, codebooks, dtype=torch.int64, **z)
        self.hidden = torch.zeros(0, **z)  # sized by the runner once the LM's width is known
        self.text_t = torch.zeros(n, dtype=torch.int64, **z)
        self.listen_t = torch.zeros(n, dtype=torch.float32, **z)
        self.codes_t = torch.zeros(n, codebooks, dtype=torch.int64, **z)
        # outputs
        self.out_meta = torch.zeros(n, 3, dtype=torch.float32, **z)  # text, rms, listen prob
        self.out_pcm = torch.zeros(n, frame, dtype=torch.float32, **z)
        self.out_codes = torch.zeros(n, codebooks, dtype=torch.int64, **z)


class MoshiRunner:
    """The batched, graph-captured Moshi step over a slot table (see module docstring)."""

    def __init__(self, model: torch.nn.Module, cfg: StepConfig) -> None:
        self.model = model
        self.cfg = cfg
        mc = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.codebooks = mc.num_codebooks
        self.vocab = mc.vocab_size
        self.audio_vocab = mc.audio_vocab_size
        self.mimi = StreamingMimi(model.audio_encoder, self.codebooks, cfg.slots)
        self.frame_samples = self.mimi.frame_samples
        self.lm = TemporalLM(model, cfg.slots, cfg.context)
        self.depth = DepthDecoder(model, cfg.slots)
        n = cfg.slots
        self.s = _State(n, self.codebooks, self.frame_samples, self.device, self.mimi.dtype)
        self.s.hidden = torch.zeros(n, mc.hidden_size, dtype=self.dtype, device=self.device)
        self.buckets = tuple(b for b in cfg.buckets if b <= n) or (n,)
        if self.buckets[-1] != n:
            self.buckets = (*self.buckets, n)
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        pin = self.device.type == "cuda"
        self._pcm_host = torch.zeros(n, 1, self.frame_samples, dtype=torch.float32, pin_memory=pin)
        self._ctrl_host = torch.zeros(n, 3, dtype=torch.float32, pin_memory=pin)
        self._meta_host = torch.zeros(n, 3, dtype=torch.float32, pin_memory=pin)
        self._pcm_out_host = torch.zeros(n, self.frame_samples, dtype=torch.float32, pin_memory=pin)
        self._codes_host = torch.zeros(n, self.codebooks, dtype=torch.int64, pin_memory=pin)
        self.timing = False
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(5)] if pin else []
        self.pad_onehot = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        self.pad_onehot[cfg.text_pad_id] = 1.0
        self._phases: list[Callable[[int], None]] = [self._encode, self._lm, self._depth, self._decode]

    # ------------------------------------------------------------------ slots
    def bucket_for(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def reset_slot(self, slot: int, seed: int) -> None:
        """A new stream in ``slot``: frame 0, its sampling seed. Everything else is read
        through the frame index (fresh convolutions, masked ring entries)."""
        self.s.t[slot] = 0
        self.s.seed[slot] = seed & 0x7FFFFFFF

    def set_controls(self, slot: int, log_listen_bias: float, force_listen: bool, temperature_scale: float) -> None:
        self._ctrl_host[slot, 0] = log_listen_bias
        self._ctrl_host[slot, 1] = 1.0 if force_listen else 0.0
        self._ctrl_host[slot, 2] = temperature_scale

    # ------------------------------------------------------------------ phases (rows [:b], in place)
    def _encode(self, b: int) -> None:
        s = self.s
        s.ucodes[:b] = self.mimi.encode(s.pcm_in[:b], s.t[:b])

    def _lm(self, b: int) -> None:
        s, cfg = self.s, self.cfg
        t = s.t[:b]
        first = (t == 0)[:, None]
        text_in = torch.where(first[:, 0], self.vocab, s.last_text[:b])
        moshi_in = torch.where(first, self.audio_vocab, s.last_codes[:b])
        user_ac = torch.where(first, self.audio_vocab, s.user_prev[:b])
        audio_in = torch.cat((moshi_in, s.ucodes[:b, :1], user_ac), dim=1)
        hidden, logits = self.lm(self.lm.embed(text_in, audio_in), t)
        ctrl = s.ctrl[:b]
        # listen_prob_scale biases the pad (listen) token; a forced frame may only pad
        logits = logits + ctrl[:, :1] * self.pad_onehot
        forced = (ctrl[:, 1:2] > 0) & (self.pad_onehot == 0)
        logits = logits.masked_fill(forced, float("-inf"))
        temp = cfg.temp_text * ctrl[:, 2]
        probs = torch.softmax(logits / temp.clamp(min=1e-3)[:, None], dim=-1)
        s.listen_t[:b] = probs[:, cfg.text_pad_id]
        s.text_t[:b] = sample_top_k(logits, temp, cfg.top_k_text, stream_key(s.seed[:b], t, 0))
        s.hidden[:b] = hidden

    def _depth(self, b: int) -> None:
        s, cfg = self.s, self.cfg
        temp = cfg.temp_audio * s.ctrl[:b, 2]
        s.codes_t[:b] = self.depth.sample(s.hidden[:b], s.text_t[:b], temp, cfg.top_k_audio, s.seed[:b], s.t[:b])

    def _decode(self, b: int) -> None:
        s, cfg = self.s, self.cfg
        t = s.t[:b]
        first = t == 0
        out_codes = torch.cat((s.last_codes[:b, :1], s.codes_t[:b, 1:]), dim=1)
        out_codes = torch.where(first[:, None], 0, out_codes)  # frame 0: nothing to decode yet
        pcm = self.mimi.decode(out_codes, torch.clamp(t - 1, min=0)).float()
        rms = torch.sqrt(torch.mean(pcm * pcm, dim=-1))
        zero = torch.zeros_like(rms)
        s.out_meta[:b, 0] = torch.where(first, float(cfg.text_pad_id), s.last_text[:b].float())
        s.out_meta[:b, 1] = torch.where(first, zero, rms)
        s.out_meta[:b, 2] = torch.where(first, torch.ones_like(rms), s.last_listen[:b])
        s.out_pcm[:b] = torch.where(first[:, None], 0.0, pcm)
        s.out_codes[:b] = out_codes
        s.last_text[:b] = s.text_t[:b]
        s.last_listen[:b] = s.listen_t[:b]
        s.last_codes[:b] = s.codes_t[:b]
        s.user_prev[:b] = s.ucodes[:b, 1:]
        s.t[:b] += 1

    # ------------------------------------------------------------------ capture
    def capture(self, progress: Callable[[str], None] | None = None) -> float:
        """Warm up every bucket and, on CUDA, capture its graphs. Returns seconds spent."""
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        with torch.inference_mode(), _attention_backends():
            if not self.use_graphs:
                self._run_eager(self.buckets[-1] if self.device.type == "cuda" else self.buckets[0])
            else:
                pool = torch.cuda.graph_pool_handle()
                for b in sorted(self.buckets, reverse=True):  # largest first: the pool fits the rest
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            self._run_eager(b)
                    torch.cuda.current_stream().wait_stream(side)
                    graphs = []
                    for phase in self._phases:
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g, pool=pool):
                            phase(b)
                        graphs.append(g)
                    self.graphs[b] = graphs
                    if progress:
                        progress(f"captured batch bucket {b}")
                torch.cuda.synchronize()
            self.s.t.zero_()  # warm-up frames are not anyone's stream
        return time.perf_counter() - t0

    def _run_eager(self, b: int) -> None:
        with _attention_backends():
            for phase in self._phases:
                phase(b)

    # ------------------------------------------------------------------ step
    def set_input(self, row: int, pcm: np.ndarray | None) -> None:
        """Stage one slot's input frame for the next step (None: silence)."""
        if pcm is None:
            self._pcm_host[row, 0].zero_()
        else:
            self._pcm_host[row, 0].copy_(torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32)))

    def step(self, rows: int) -> StepOutput:
        """Step rows ``[:rows]`` (rounded up to a bucket) with the staged inputs."""
        with torch.inference_mode():
            return self._step(rows)

    def _step(self, rows: int) -> StepOutput:
        b = self.bucket_for(rows)
        s = self.s
        s.pcm_in[:b].copy_(self._pcm_host[:b], non_blocking=True)
        s.ctrl[:b].copy_(self._ctrl_host[:b], non_blocking=True)
        ev = self._events if self.timing and self._events else None
        marks = [time.perf_counter()] if self.timing and not ev else None  # CPU: wall time per phase
        if ev:
            ev[0].record()
        graphs = self.graphs.get(b) if self.use_graphs else None
        for i, phase in enumerate(self._phases):
            if graphs is not None:
                graphs[i].replay()
            else:
                with _attention_backends():
                    phase(b)
            if ev:
                ev[i + 1].record()
            elif marks is not None:
                marks.append(time.perf_counter())
        self._meta_host[:b].copy_(s.out_meta[:b], non_blocking=True)
        self._pcm_out_host[:b].copy_(s.out_pcm[:b], non_blocking=True)
        self._codes_host[:b].copy_(s.out_codes[:b], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        phase_ms: dict[str, float] = {}
        if ev:
            phase_ms = {name: ev[i].elapsed_time(ev[i + 1]) for i, name in enumerate(PHASES)}
        elif marks is not None:
            phase_ms = {name: (marks[i + 1] - marks[i]) * 1000 for i, name in enumerate(PHASES)}
        meta = self._meta_host[:rows].numpy()
        return StepOutput(
            text=meta[:, 0].astype(np.int64),
            pcm=self._pcm_out_host[:rows].numpy().copy(),
            rms=meta[:, 1].copy(),
            listen_prob=meta[:, 2].copy(),
            codes=self._codes_host[:rows].numpy().copy(),
            phase_ms=phase_ms,
        )

