"""qwen-omni's fast paths against the slow ones they replace, on tiny random weights:
the prepared DiT field against the transformers layers (and its self-check catching a
wrong field), the first chunk's short DiT window against the full one, CUDA-graph
capture failing for one bucket only (on a stand-in for the CUDA API), and one reply of
both engines in bfloat16 — the GPU's dtype — on the CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from duplexd.actors.engines.qwen_omni import graphs as graphs_mod  # noqa: E402
from duplexd.actors.engines.qwen_omni import token2wav as t2w_mod  # noqa: E402
from duplexd.actors.engines.qwen_omni.configs import omni_config  # noqa: E402
from duplexd.actors.engines.qwen_omni.dit import DiTField, dit_eval, reference_ode_mel  # noqa: E402
from duplexd.actors.engines.qwen_omni.graphs import GraphCache  # noqa: E402
from duplexd.actors.engines.qwen_omni.token2wav import PAD_BLOCK, ChunkJob, Token2Wav  # noqa: E402

transformers.logging.set_verbosity_error()
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def token2wav() -> Any:
    from transformers import Qwen2_5OmniToken2WavModel

    torch.manual_seed(0)
    model = Qwen2_5OmniToken2WavModel._from_config(omni_config("tiny").token2wav_config).eval().float()
    # Random init (std 0.02, zero biases) leaves attention nearly uniform and every block's
    # gates near zero: a wrong attention layout would hardly show. Weights of a trained
    # model's size make every part of the DiT matter.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.code2wav_dit_model.named_parameters():
            if "spk_encoder" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.25 if p.ndim > 1 else 0.1))
    return model


def inputs(b: int, frames: int, seed: int = 0, pad_from: int | None = None) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, frames, 80, generator=g)
    code = torch.randint(0, 64, (b, frames // 2), generator=g)
    spk, ecapa = torch.randn(b, 16, generator=g), torch.randn(2 * b, 16, generator=g)
    bid = (torch.arange(frames) // 24)[None].repeat(b, 1)
    if pad_from is not None:
        bid[:, pad_from:] = PAD_BLOCK
    return x, code, spk, ecapa, bid


@torch.no_grad()
def test_the_prepared_dit_field_equals_the_transformers_layers_at_every_ode_time(token2wav: Any) -> None:
    """Against the layers in float64: the field's float32 error is the layers' own float32
    rounding (a wrong field is off by ~0.5, see the next test)."""
    import copy

    dit = token2wav.code2wav_dit_model
    dit64 = copy.deepcopy(dit).double()
    field = DiTField(dit, 10, -1.0, 0.5)
    x, code, spk, ecapa, bid = inputs(2, 96, pad_from=72)
    x64, spk64, ec64 = x.double(), spk.double(), ecapa.double()
    prep = field.prepare(code, spk, ecapa, bid)
    assert len(field.evals) == 36
    for k, t in enumerate(field.evals):
        exact = dit_eval(dit64, x64, t, code, spk64, ec64, bid, 0.5)
        layers = dit_eval(dit, x, t, code, spk, ecapa, bid, 0.5)
        got = field.velocity(k, x, prep)
        assert rel(got, layers) < 1e-4
        assert rel(got.double(), exact) <= 2 * rel(layers.double(), exact) + 1e-6
    exact = reference_ode_mel(dit64, x64, code, spk64, ec64, bid, 10, 0.5, -1.0)
    layers = reference_ode_mel(dit, x, code, spk, ecapa, bid, 10, 0.5, -1.0)
    got = field.ode(x, code, spk, ecapa, bid)
    assert rel(got.double(), exact) <= 2 * rel(layers.double(), exact) + 1e-6
    assert field.check() < 1e-4


def rel(got: Any, want: Any) -> float:
    """Largest difference relative to the largest value."""
    return float((got - want).abs().max() / want.abs().max())


@torch.no_grad()
def test_the_field_check_catches_a_wrong_field_and_token2wav_then_runs_the_layers(
    token2wav: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    dit = token2wav.code2wav_dit_model
    field = DiTField(dit, 10, -1.0, 0.5)
    d = field.head_dim
    # The planted bug: head 0 of q without its rotary layout (as if transformers had stopped
    # de-interleaving it).
    field.qkv_w[0][:d] = dit.transformer_blocks[0].attn.to_q.weight[:d]
    field.qkv_b[0][:d] = dit.transformer_blocks[0].attn.to_q.bias[:d]
    assert field.check() > t2w_mod.CHECK_TOLERANCE[torch.float32]

    fast = make_t2w(token2wav)
    assert fast.field is not None and fast.check_error is not None and fast.check_error < 1e-5
    monkeypatch.setattr(t2w_mod.DiTField, "check", lambda self, frames=48: 1.0)
    slow = make_t2w(token2wav)
    assert slow.field is None  # the reference layers run
    job = first_chunk_job(slow, codes=40)
    a, b = run_job(fast, job), run_job(slow, job)
    np.testing.assert_allclose(a.pcm.numpy(), b.pcm.numpy(), atol=1e-4)


def make_t2w(model: Any, **kw: Any) -> Token2Wav:
    args: dict[str, Any] = dict(max_batch=2, chunk=24, first_chunk=12, lookahead=12, context=12, vocoder_context=4,
                                steps=4, guidance=0.5, sway=-1.0, graphs=False)
    args.update(kw)
    return Token2Wav(model, CPU, torch.float32, **args)


def first_chunk_job(t2w: Token2Wav, codes: int) -> ChunkJob:
    g = torch.Generator().manual_seed(4)
    noise = t2w.noise_for_reply(100, 0)
    spk = torch.randn(1, 16, generator=g)
    ecapa = torch.randn(2, 16, generator=g)
    code_ids = torch.randint(0, 64, (codes,), generator=g).tolist()
    return ChunkJob("s", code_ids, 0, t2w.first, noise, spk, ecapa, None, False)


def run_job(t2w: Token2Wav, job: ChunkJob) -> Any:
    t2w.launch([job])
    (res,) = t2w.poll()
    return res


@torch.no_grad()
def test_the_first_chunk_through_its_short_window_equals_the_full_window(token2wav: Any) -> None:
    short = make_t2w(token2wav)
    assert short.windows == [24, 48]  # first chunk + look-ahead; context + chunk + look-ahead
    full = make_t2w(token2wav)
    full.windows = [full.window]  # one window length for every call (as before)
    job = first_chunk_job(short, codes=40)
    a = run_job(short, job)
    assert short.last_key == (1, 48)  # 24 codec tokens = 48 frames, not the 96 of a full window
    b = run_job(full, job)
    assert full.last_key == (1, 96)
    assert a.pcm.shape == b.pcm.shape == (12 * 2 * 240,)
    np.testing.assert_allclose(a.pcm.numpy(), b.pcm.numpy(), atol=1e-5)
    torch.testing.assert_close(a.tail_mel, b.tail_mel, atol=1e-5, rtol=0)
    # A later chunk needs the long window.
    later = ChunkJob("s", job.codes, 12, 36, job.noise, job.spk, job.ecapa, a.tail_mel, False)
    run_job(short, later)
    assert short.last_key == (1, 96)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay runs the captured function again."""

    current: FakeGraph | None = None

    def __init__(self) -> None:
        self.fn: Any = None
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


@contextlib.contextmanager
def fake_capture(graph: FakeGraph, pool: Any = None, stream: Any = None) -> Any:
    FakeGraph.current = graph
    yield


def test_a_bucket_whose_capture_fails_runs_eagerly_and_the_others_are_still_captured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = graphs_mod.torch.cuda
    for name, value in {
        "graph_pool_handle": lambda: "pool",
        "Stream": lambda device=None: type("S", (), {"wait_stream": lambda self, s: None})(),
        "stream": lambda s: contextlib.nullcontext(),
        "current_stream": lambda device=None: type("S", (), {"wait_stream": lambda self, s: None})(),
        "CUDAGraph": FakeGraph,
        "graph": fake_capture,
        "synchronize": lambda device=None: None,
    }.items():
        monkeypatch.setattr(cuda, name, value)
    cache = GraphCache(torch.device("cuda"), True, "test", warmups=1)
    calls: list[str] = []

    def good(name: str) -> Any:
        return lambda: calls.append(name) or torch.zeros(1)

    def bad() -> Any:
        if FakeGraph.current is not None and calls.count("bad") >= 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        calls.append("bad")
        return torch.zeros(1)

    cache.capture("a", good("a"))
    FakeGraph.current = None
    cache.capture("b", bad)
    cache.capture("c", good("c"))
    assert "a" in cache and "c" in cache and "b" not in cache
    assert set(cache.failures) == {"b"} and "capturing" in cache.failed
    assert set(cache.times) == {"a", "c"} and cache.capture_s >= 0
    assert calls.count("a") == 2 and calls.count("c") == 2  # one warm-up run, then the capture
    before = len(calls)
    cache.run("a", good("a"))  # replayed: the function does not run
    assert len(calls) == before
    FakeGraph.current = None
    cache.run("b", bad)  # eager
    assert calls[-1] == "bad"


@torch.no_grad()
def test_one_reply_of_both_engines_in_bfloat16_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU runs the thinker, the talker (and optionally token2wav) in bfloat16, which the
    CPU tests otherwise never see (the engines use float32 on the CPU)."""
    import msgspec

    from duplexd.actors.engines.base import TalkerInput, ThinkerInput
    from duplexd.actors.engines.qwen_omni import loading
    from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions
    from duplexd.actors.engines.qwen_omni.talker import QwenOmniTalker
    from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker
    from duplexd.bus.messages import Action, ChunkKind, HistoryEntry, SessionConfig

    monkeypatch.setattr(loading, "resolve_dtype", lambda name, device: loading._DTYPES[name])
    opts = msgspec.convert(
        dict(random_init=True, random_size="tiny", stage0_device="cpu", stage1_device="cpu", max_sessions=2,
             max_context=512, max_reply_tokens=6, min_reply_tokens=5, max_codec_tokens=36, min_codec_tokens=35,
             t2w_steps=2, t2w_chunk=24, vocoder_context=4, token2wav_dtype="bfloat16", cpu_threads=1,
             warm_up=False),
        QwenOmniOptions,
    )
    th, tk = QwenOmniThinker(opts), QwenOmniTalker(opts)
    th.load()
    tk.load()
    assert th.dtype == tk.dtype == tk.t2w.dtype == torch.bfloat16
    assert tk.t2w.field is not None  # the bf16 field passed its check
    sid = "s"
    th.open_session(sid, SessionConfig())
    tk.open_session(sid, SessionConfig())
    n = th.info.chunk_samples
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    chunks = [audio[i : i + n] for i in range(0, audio.size, n)]
    for i, c in enumerate(chunks):
        kind = ChunkKind.UTTERANCE_END if i == len(chunks) - 1 else ChunkKind.UTTERANCE
        th.step([ThinkerInput(sid, i, kind, c, True)])
    th.set_context(sid, (HistoryEntry("user", "", "u"),), "")
    pcm: list[np.ndarray] = []
    hidden_dtypes = set()
    for seq in range(100, 400):
        out = th.step([ThinkerInput(sid, seq, ChunkKind.CONTINUATION, np.zeros(n, np.float32), response_id="r")])[0]
        if out.action == Action.SPEAK or out.end_of_turn:
            if out.hidden is not None:
                hidden_dtypes.add(out.hidden.dtype)
            tk.feed(sid, TalkerInput(out.text, out.end_of_turn, out.tokens, out.hidden, turn_key="r"))
        if tk.pending(sid):
            c = tk.step([sid])[0]
            if c is not None:
                pcm.append(c.pcm)
                if c.end_of_turn:
                    break
    assert hidden_dtypes == {np.dtype(np.int16)}  # bfloat16 rows travel as their bits
    wav = np.concatenate(pcm)
    codes = len(tk._turns[sid].codes)
    assert codes >= 35 and wav.size == codes * 2 * 240
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0
