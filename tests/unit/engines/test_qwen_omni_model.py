"""qwen-omni model code against the transformers implementation, on tiny random weights:
the slot decoder (thinker and talker), the thinker's whole pipeline against
``generate()``, the streaming mel against the Whisper extractor, and token2wav."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from duplexd.actors.engines.base import ThinkerInput  # noqa: E402
from duplexd.actors.engines.qwen_omni.configs import omni_config  # noqa: E402
from duplexd.actors.engines.qwen_omni.decoder import DecoderShape, SlotDecoder  # noqa: E402
from duplexd.actors.engines.qwen_omni.loading import thinker_text_model  # noqa: E402
from duplexd.actors.engines.qwen_omni.mel import StreamingMel, mel_filters  # noqa: E402
from duplexd.actors.engines.qwen_omni.options import QwenOmniOptions  # noqa: E402
from duplexd.actors.engines.qwen_omni.thinker import QwenOmniThinker  # noqa: E402
from duplexd.actors.engines.qwen_omni.token2wav import PAD_BLOCK, ode_mel, vocode  # noqa: E402
from duplexd.bus.messages import ChunkKind, SessionConfig  # noqa: E402

transformers.logging.set_verbosity_error()
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config() -> Any:
    return omni_config("tiny")


@pytest.fixture(scope="module")
def thinker(config: Any) -> Any:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    return Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_config).eval()


@torch.no_grad()
def test_slot_decoder_matches_the_thinker_across_slots_prefill_and_decode(config: Any, thinker: Any) -> None:
    lm = thinker_text_model(thinker)
    dec = SlotDecoder(lm.layers, lm.norm, DecoderShape.of(config.thinker_config.text_config), 3, 64, CPU,
                      torch.float32)
    # Fused q/k/v and gate/up weights: the modules' weights are views of them (no second copy).
    attn = lm.layers[0].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == dec.wqkv[0].untyped_storage().data_ptr()
    assert dec.fused_norm
    ids = torch.randint(0, 200, (2, 12))
    ref = thinker(input_ids=ids, output_hidden_states=True)
    hs = ref.hidden_states[-1]  # final-norm output: what the talker reads
    emb = lm.embed_tokens(ids)
    # Two sessions of different lengths in one padded prefill, into slots 2 and 0.
    x = torch.zeros(2, 7, emb.shape[-1])
    x[0], x[1, :5] = emb[0, :7], emb[1, :5]
    out = dec.prefill(x, torch.tensor([2, 0]), torch.tensor([0, 0]), torch.tensor([7, 5]))
    torch.testing.assert_close(out[0], hs[0, :7], atol=2e-6, rtol=0)
    torch.testing.assert_close(out[1, :5], hs[1, :5], atol=2e-6, rtol=0)
    # One decode step for rows 0..2 (= slots): slot 1 idle at the scratch position.
    xb = torch.zeros(3, emb.shape[-1])
    xb[2], xb[0] = emb[0, 7], emb[1, 5]
    o = dec.decode(xb, torch.tensor([5, 64, 7]), span=16)
    torch.testing.assert_close(o[2], hs[0, 7], atol=2e-6, rtol=0)
    torch.testing.assert_close(o[0], hs[1, 5], atol=2e-6, rtol=0)
    torch.testing.assert_close(thinker.lm_head(o[2]), ref.logits[0, 7], atol=2e-6, rtol=0)
    # A later span continues the slot; a rollback is just writing from an earlier position.
    out2 = dec.prefill(emb[1:2, 6:12], torch.tensor([0]), torch.tensor([6]), torch.tensor([6]))
    torch.testing.assert_close(out2[0], hs[1, 6:12], atol=2e-6, rtol=0)
    other = torch.randint(0, 200, (1, 4))
    dec.prefill(lm.embed_tokens(other), torch.tensor([0]), torch.tensor([6]), torch.tensor([4]))
    again = dec.prefill(emb[1:2, 6:12], torch.tensor([0]), torch.tensor([6]), torch.tensor([6]))
    torch.testing.assert_close(again[0], hs[1, 6:12], atol=2e-6, rtol=0)


@torch.no_grad()
def test_slot_decoder_matches_the_talker(config: Any) -> None:
    from transformers import Qwen2_5OmniTalkerForConditionalGeneration

    torch.manual_seed(1)
    tk = Qwen2_5OmniTalkerForConditionalGeneration._from_config(config.talker_config).eval()
    rows = torch.randn(1, 9, config.talker_config.embedding_size) * 0.5
    ref = tk(inputs_embeds=rows.clone(), use_cache=False).logits
    dec = SlotDecoder(tk.model.layers, tk.model.norm, DecoderShape.of(config.talker_config), 2, 32, CPU,
                      torch.float32)
    h = dec.prefill(tk.thinker_to_talker_proj(rows[:, :6]), torch.tensor([1]), torch.tensor([0]), torch.tensor([6]))
    torch.testing.assert_close(tk.codec_head(h), ref[:, :6], atol=2e-5, rtol=0)
    x = torch.zeros(2, tk.thinker_to_talker_proj.out_features)
    for p in range(6, 9):
        x[1] = tk.thinker_to_talker_proj(rows[0, p])
        o = dec.decode(x, torch.tensor([32, p]), span=16)
        torch.testing.assert_close(tk.codec_head(o[1]), ref[0, p], atol=2e-5, rtol=0)


def _audio(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(16000 * seconds)
    return (0.2 * np.sin(np.linspace(0, 40, n)) * rng.standard_normal(n)).astype(np.float32)


@torch.no_grad()
def test_streamed_thinker_reply_equals_generate_on_the_same_prompt(config: Any) -> None:
    """Audio streamed in chunks (windows encoded as they complete, prefilled in pieces)
    gives the tokens transformers' generate() gives for the whole prompt at once."""
    opts = QwenOmniOptions(random_init=True, random_size="tiny", greedy=True, max_sessions=2, max_context=512,
                           max_reply_tokens=8, warm_up=False, seed=3, cpu_threads=1)
    th = QwenOmniThinker(opts)
    th.load()
    th.open_session("s", SessionConfig())
    audio = _audio(5, 4.7)  # two full encoder windows and a tail
    n = th.info.chunk_samples
    chunks = [audio[i : i + n] for i in range(0, audio.size, n)]
    for i, c in enumerate(chunks):
        kind = ChunkKind.UTTERANCE_END if i == len(chunks) - 1 else ChunkKind.UTTERANCE
        th.step([ThinkerInput("s", i, kind, c, True)])
    text = []
    for j in range(40):
        out = th.step([ThinkerInput("s", 100 + j, ChunkKind.CONTINUATION, np.zeros(n, np.float32),
                                    response_id="r")])[0]
        text.append(out.text)
        if out.end_of_turn:
            break
    s = th._s["s"]
    reply = s.reply.body
    assert len(reply) == 8
    # The same prompt for generate(): the template ids with <|AUDIO|> placeholders, and the
    # same log-mel frames as features.
    tok = th.tok
    mel = StreamingMel(mel_filters())
    feats = np.concatenate([*mel.push(np.concatenate(chunks)), mel.flush()], axis=1)
    n_audio = s.ctx.turns[1].audio_tokens
    prompt = [*tok.header("system"), *tok.encode(opts.system_prompt), *tok.footer(), *tok.header("user"),
              tok.audio_start, *[tok.audio] * n_audio, tok.audio_end, *tok.footer(), *tok.header("assistant")]
    ids = torch.tensor([prompt])
    out = th.parts.thinker.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        input_features=torch.from_numpy(feats)[None],
        feature_attention_mask=torch.ones(1, feats.shape[1], dtype=torch.long),
        max_new_tokens=8,
        do_sample=False,
        suppress_tokens=tok.suppress,
        eos_token_id=list(tok.eos),
    )
    assert out[0, len(prompt) :].tolist() == reply
    assert "".join(text) == tok.decode(reply)


@torch.no_grad()
def test_streaming_mel_equals_the_whisper_extractor() -> None:
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    for seconds in (5.05, 2.0, 0.03):
        x = (0.1 * np.random.default_rng(1).standard_normal(int(16000 * seconds))).astype(np.float32)
        ref = fe(x, sampling_rate=16000, return_tensors="np", padding="max_length", return_attention_mask=True)
        frames = int(ref["attention_mask"][0].sum())
        m = StreamingMel(mel_filters())
        windows = []
        for i in range(0, x.size, 1234):
            windows += m.push(x[i : i + 1234])
        got = np.concatenate([*windows, m.flush()], axis=1)
        assert got.shape == (128, frames) and all(w.shape == (128, 200) for w in windows)
        # (stationary noise: the running maximum is the clip's maximum)
        np.testing.assert_allclose(got, ref["input_features"][0][:, :frames], atol=1e-5)


@pytest.fixture(scope="module")
def token2wav(config: Any) -> Any:
    from transformers import Qwen2_5OmniToken2WavModel

    torch.manual_seed(0)
    return Qwen2_5OmniToken2WavModel._from_config(config.token2wav_config).eval().float()


@torch.no_grad()
def test_dit_ode_equals_sample_and_padding_frames_change_nothing(token2wav: Any) -> None:
    dit = token2wav.code2wav_dit_model
    n = 30
    code = torch.randint(0, 60, (1, n))
    cond, ref = torch.randn(1, 16), torch.randn(1, 120, 80)
    torch.manual_seed(5)
    want = dit.sample(cond, ref, code)  # [1, mel, frames]
    torch.manual_seed(5)
    noise = torch.randn([1, 2 * n, 80])  # the noise sample() drew
    ecapa = dit.input_embed.spk_encoder(torch.cat([ref, torch.zeros_like(ref)]))
    blocks = (torch.arange(2 * n) // 24)[None]
    got = ode_mel(dit, noise, code, cond, ecapa, blocks, 10, 0.5, -1.0)
    torch.testing.assert_close(got.permute(0, 2, 1), want, atol=1e-5, rtol=0)
    # The same window padded to a longer fixed shape (one graph for every window).
    pad = 20
    got_p = ode_mel(
        dit,
        torch.cat([noise, torch.zeros(1, 2 * pad, 80)], 1),
        torch.cat([code, torch.zeros(1, pad, dtype=torch.long)], 1),
        cond,
        ecapa,
        torch.cat([blocks, torch.full((1, 2 * pad), PAD_BLOCK)], 1),
        10,
        0.5,
        -1.0,
    )
    torch.testing.assert_close(got_p[:, : 2 * n], got, atol=1e-6, rtol=0)


@torch.no_grad()
def test_vocoder_without_the_cpu_copy_equals_bigvgan(token2wav: Any) -> None:
    big = token2wav.code2wav_bigvgan_model
    mel = torch.randn(1, 80, 40) - 4
    torch.testing.assert_close(vocode(big, mel)[0], big(mel), atol=1e-6, rtol=0)
