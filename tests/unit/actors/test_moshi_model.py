"""The batched Moshi step against HF's reference forward passes, on a tiny random model.

Each part of the step is checked on its own against transformers' implementation of the
same weights: the streaming Mimi encoder and decoder against HF's whole-sequence
encode/decode, the temporal LM (ring KV, sliding window) against HF's forward, the depth
decoder against HF's teacher-forced forward; then the assembled runner for its delay
pattern wiring and for batch independence (a slot's outputs do not depend on which slot
it holds, on who shares the batch, or on others joining and leaving).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from duplexd.actors.engines.moshi.lm import DepthDecoder, TemporalLM  # noqa: E402
from duplexd.actors.engines.moshi.mimi import StreamingMimi  # noqa: E402
from duplexd.actors.engines.moshi.runner import MoshiRunner, StepConfig  # noqa: E402
from duplexd.actors.engines.moshi.sampling import sample_top_k, stream_key  # noqa: E402
from tests.moshi_tiny import AUDIO_VOCAB, TEXT_VOCAB, tiny_model  # noqa: E402

F = 1920


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    torch.set_num_threads(1)
    return tiny_model(seed=0)


def _audio(n_frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(1, 1, n_frames * F, generator=g)


@torch.inference_mode()
def test_streaming_mimi_encode_matches_hf_whole_sequence(model) -> None:  # noqa: ANN001
    frames = 14  # longer than the tiny codec's 10-step transformer window (7 frames)
    x = torch.cat([_audio(frames, 1), _audio(frames, 2)])
    ref = model.audio_encoder.encode(x, num_quantizers=8).audio_codes  # [2, 8, T]
    mimi = StreamingMimi(model.audio_encoder, 8, slots=3)
    got = []
    for t in range(frames):
        # the second stream sits in slot 2 (slot 1 is a free row computing garbage)
        pcm = torch.stack([x[0, :, t * F : (t + 1) * F], torch.randn(1, F), x[1, :, t * F : (t + 1) * F]])
        got.append(mimi.encode(pcm, torch.full((3,), t)))
    got = torch.stack(got, dim=-1)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[1])


@torch.inference_mode()
def test_streaming_mimi_decode_matches_hf_whole_sequence(model) -> None:  # noqa: ANN001
    frames = 12
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, AUDIO_VOCAB, (2, 8, frames), generator=g)
    ref = model.audio_encoder.decode(codes).audio_values[:, 0]  # [2, T*F]
    mimi = StreamingMimi(model.audio_encoder, 8, slots=2)
    got = torch.cat([mimi.decode(codes[:, :, t], torch.full((2,), t)) for t in range(frames)], dim=-1)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@torch.inference_mode()
def test_streaming_mimi_slot_restart_reads_fresh_state(model) -> None:  # noqa: ANN001
    mimi = StreamingMimi(model.audio_encoder, 8, slots=1)
    x = _audio(4, 5)
    for t in range(3):  # another stream used the slot before
        mimi.encode(_audio(1, 9 + t), torch.tensor([t]))
    got = torch.stack([mimi.encode(x[:, :, t * F : (t + 1) * F], torch.tensor([t])) for t in range(4)], -1)
    assert torch.equal(got[0], model.audio_encoder.encode(x, num_quantizers=8).audio_codes[0])


def _tokens(frames: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, TEXT_VOCAB, (batch, frames), generator=g)
    audio = torch.randint(0, AUDIO_VOCAB, (batch, 16, frames), generator=g)
    return text, audio


def _hf_logits(model, text: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    out = model(input_ids=text, moshi_audio_codes=audio[:, :8], user_audio_codes=audio[:, 8:], use_cache=False)
    return out.logits, out.last_hidden_state


@torch.inference_mode()
def test_temporal_lm_matches_hf_forward(model) -> None:  # noqa: ANN001
    frames = 10
    text, audio = _tokens(frames, 2, 4)
    ref_logits, ref_hidden = _hf_logits(model, text, audio)
    lm = TemporalLM(model, slots=2, context=64)
    for t in range(frames):
        h, logits = lm(lm.embed(text[:, t], audio[:, :, t]), torch.full((2,), t))
        torch.testing.assert_close(logits, ref_logits[:, t].float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, ref_hidden[:, t], rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_temporal_lm_window_slides_over_the_oldest_frames(model) -> None:  # noqa: ANN001
    frames, window = 13, 5
    text, audio = _tokens(frames, 1, 6)
    # Reference: HF's forward over the whole sequence where every query, in every layer,
    # sees only the last `window` frames (a sliding-window mask) — what a ring cache does.
    q = torch.arange(frames)[:, None]
    k = torch.arange(frames)[None, :]
    visible = (k <= q) & (q - k < window)
    mask = torch.zeros(1, 1, frames, frames).masked_fill(~visible, float("-inf"))
    out = model(
        input_ids=text,
        moshi_audio_codes=audio[:, :8],
        user_audio_codes=audio[:, 8:],
        attention_mask=mask,
        use_cache=False,
    )
    full, _ = _hf_logits(model, text, audio)
    assert not torch.allclose(out.logits[:, -1], full[:, -1], atol=1e-3)  # the window matters here
    lm = TemporalLM(model, slots=1, context=window)
    for t in range(frames):
        _, logits = lm(lm.embed(text[:, t], audio[:, :, t]), torch.tensor([t]))
        torch.testing.assert_close(logits, out.logits[:, t].float(), rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_depth_decoder_matches_hf_teacher_forced_forward(model) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, model.config.hidden_size, generator=g)
    text = torch.randint(0, TEXT_VOCAB, (3,), generator=g)
    codes = torch.randint(0, AUDIO_VOCAB, (3, 8), generator=g)
    ids = torch.cat([text[:, None], codes[:, :7]], dim=1)
    ref = model.depth_decoder(input_ids=ids, last_hidden_state=hidden[:, None]).logits  # [3, 8, A]
    dd = DepthDecoder(model, slots=3)
    prev = text
    for k in range(8):
        logits = dd.logits(dd.step_input(hidden, prev, k), k)
        # HF initialises the flexible linears with unit-variance weights: logits reach the
        # hundreds, so the tolerance scales with them
        scale = float(ref[:, k].abs().max())
        torch.testing.assert_close(logits, ref[:, k].float(), rtol=1e-4, atol=1e-5 * scale)
        prev = codes[:, k]


def test_sampling_is_per_row_and_order_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=g)
    seed = torch.tensor([1, 2, 3, 4])
    frame = torch.tensor([0, 5, 9, 2])
    temp = torch.full((4,), 0.9)
    a = sample_top_k(logits, temp, 20, stream_key(seed, frame, 0))
    # the same rows, reordered and alone, sample the same tokens
    perm = torch.tensor([2, 0, 3, 1])
    b = sample_top_k(logits[perm], temp[perm], 20, stream_key(seed[perm], frame[perm], 0))
    assert torch.equal(a[perm], b)
    one = sample_top_k(logits[1:2], temp[1:2], 20, stream_key(seed[1:2], frame[1:2], 0))
    assert int(one) == int(a[1])
    greedy = sample_top_k(logits, torch.zeros(4), 20, stream_key(seed, frame, 0))
    assert torch.equal(greedy, logits.argmax(-1))


def test_sampling_follows_the_softmax() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 1e-9]])).expand(4000, -1)
    seed = torch.arange(4000)
    got = sample_top_k(logits, torch.ones(4000), 3, stream_key(seed, torch.zeros(4000, dtype=torch.long), 0))
    freq = torch.bincount(got, minlength=4).float() / 4000
    assert freq[3] == 0  # outside the top 3
    torch.testing.assert_close(freq[:3], torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def _runner(model, slots: int = 3, context: int = 64, **kw) -> MoshiRunner:  # noqa: ANN001
    r = MoshiRunner(model, StepConfig(slots=slots, context=context, buckets=(1, 2, 4), **kw))
    r.capture()
    return r


def _run(r: MoshiRunner, plan: dict[int, tuple[int, np.ndarray, int]], steps: int) -> dict[int, list]:
    """plan: slot → (first step, audio, seed); returns each slot's outputs per step it streamed."""
    outs: dict[int, list] = {slot: [] for slot in plan}
    for i in range(steps):
        live = [slot for slot, (start, x, _) in plan.items() if start <= i < start + len(x) // F]
        for slot, (start, x, seed) in plan.items():
            if i == start:
                r.reset_slot(slot, seed)
                r.set_controls(slot, 0.0, False, 1.0)
            k = i - start
            r.set_input(slot, x[k * F : (k + 1) * F] if slot in live else None)
        if not live:
            continue
        out = r.step(max(live) + 1)
        for slot in live:
            outs[slot].append((int(out.text[slot]), out.codes[slot].copy(), out.pcm[slot].copy()))
    return outs


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (ta, ca, pa), (tb, cb, pb) in zip(a, b, strict=True):
        assert ta == tb
        assert np.array_equal(ca, cb)
        np.testing.assert_allclose(pa, pb, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(pb).max())))


@torch.inference_mode()
@pytest.mark.parametrize(("slot_a", "slot_b"), [(0, 2), (2, 0)])
def test_runner_slot_streams_do_not_depend_on_the_batch(model, slot_a: int, slot_b: int) -> None:  # noqa: ANN001
    xa = _audio(9, 11)[0, 0].numpy()
    xb = _audio(6, 12)[0, 0].numpy()
    alone_a = _run(_runner(model, context=6), {0: (0, xa, 71)}, 9)[0]
    alone_b = _run(_runner(model, context=6), {0: (0, xb, 72)}, 6)[0]
    # together, in other slots (one free row between them): b joins at step 2 and leaves
    # at step 8 while a goes on; the context window (6 frames) slides for a
    both = _run(_runner(model, context=6), {slot_a: (0, xa, 71), slot_b: (2, xb, 72)}, 9)
    _same(both[slot_a], alone_a)
    _same(both[slot_b], alone_b)


@torch.inference_mode()
def test_runner_wires_moshis_delay_pattern(model) -> None:  # noqa: ANN001
    r = _runner(model, slots=1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    embed = r.lm.embed
    r.lm.embed = lambda text, audio: (seen.append((text.clone(), audio.clone())), embed(text, audio))[1]
    r.reset_slot(0, 5)
    r.set_controls(0, 0.0, False, 1.0)
    x = _audio(5, 13)[0, 0].numpy()
    user = model.audio_encoder.encode(torch.from_numpy(x)[None, None], num_quantizers=8).audio_codes[0]  # [8, 5]
    outs, gen_text, gen_codes = [], [], []
    for t in range(5):
        r.set_input(0, x[t * F : (t + 1) * F])
        outs.append(r.step(1))
        gen_text.append(int(r.s.last_text[0]))
        gen_codes.append(r.s.last_codes[0].clone())
    V, A = model.config.vocab_size, model.config.audio_vocab_size  # noqa: N806
    for t, (text, audio) in enumerate(seen):
        assert int(text[0]) == (V if t == 0 else gen_text[t - 1])
        moshi = torch.full((8,), A) if t == 0 else gen_codes[t - 1]
        assert torch.equal(audio[0, :8], moshi)
        assert int(audio[0, 8]) == int(user[0, t])  # the user's semantic code of this frame
        prev_ac = torch.full((7,), A) if t == 0 else user[1:, t - 1]  # acoustic codes one frame late
        assert torch.equal(audio[0, 9:], prev_ac)
    # output frame t-1: its text, its semantic code, and the acoustic codes sampled at t
    assert float(np.abs(outs[0].pcm).max()) == 0.0
    for t in range(1, 5):
        assert int(outs[t].text[0]) == gen_text[t - 1]
        assert int(outs[t].codes[0, 0]) == int(gen_codes[t - 1][0])
        assert np.array_equal(outs[t].codes[0, 1:], gen_codes[t][1:].numpy())


@torch.inference_mode()
def test_forced_listen_samples_only_the_pad_token(model) -> None:  # noqa: ANN001
    r = _runner(model, slots=2, text_pad_id=3)
    for slot in range(2):
        r.reset_slot(slot, slot)
        r.set_controls(slot, 0.0, slot == 0, 1.0)
    x = _audio(4, 14)[0, 0].numpy()
    texts = []
    for t in range(4):
        for slot in range(2):
            r.set_input(slot, x[t * F : (t + 1) * F])
        out = r.step(2)
        texts.append(int(r.s.last_text[0]))
        assert float(out.listen_prob[0]) == (1.0 if t == 0 else pytest.approx(1.0))
    assert texts == [3, 3, 3, 3]
