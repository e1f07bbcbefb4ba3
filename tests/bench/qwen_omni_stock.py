"""The stock ``generate()`` baseline (a child phase of ``gpu_qwen_omni``).

transformers' ``Qwen2_5OmniForConditionalGeneration.generate()`` on the same config,
prompt and reply lengths, a batch of N prompts at once. Its audio exists only when it
returns, so first audio = the whole call. Bounded: a short call first (it pays the
one-time CUDA initialisation the engine pays in its warm-up), then N = 1; a larger N
runs only when its predicted time (the N = 1 call, scaled by N for the per-sample
token2wav) fits before the phase deadline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.bench.qwen_omni_micro import PhaseOut


def run(args: Any) -> int:
    import torch
    import transformers
    from transformers import Qwen2_5OmniForConditionalGeneration

    from duplexd.actors.engines.qwen_omni.configs import omni_config
    from duplexd.actors.engines.qwen_omni.loading import fix_config, speaker_raw, synthetic_speakers
    from duplexd.actors.engines.qwen_omni.mel import StreamingMel, mel_filters
    from duplexd.actors.engines.qwen_omni.options import QWEN_SYSTEM_PROMPT
    from duplexd.actors.engines.qwen_omni.tokens import ChatTokens, word_tokenizer
    from tests.bench.gpu_qwen_omni import summarize, user_audio

    out = PhaseOut(Path(args.phase_out), args.phase_deadline)
    transformers.logging.set_verbosity_error()
    phase = out.data.setdefault("stock", {"levels": {}})
    size = "tiny" if args.tiny else "full"
    dev = torch.device("cpu" if args.tiny else "cuda:0")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)
    t0 = time.monotonic()
    cfg = fix_config(omni_config(size))
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2_5OmniForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.token2wav.float()
    model.eval()
    model.speaker_map = speaker_raw(synthetic_speakers(cfg, 0, torch.device("cpu")))  # random init has none
    phase["init_s"] = round(time.monotonic() - t0, 1)
    out.save()
    print(f"   stock model built in {phase['init_s']} s", flush=True)
    tok = ChatTokens(word_tokenizer(size), cfg.thinker_config)
    mel = StreamingMel(mel_filters())
    feats = np.concatenate([*mel.push(user_audio(0, args.user_s, 16000)), mel.flush()], axis=1)
    n_audio = ((feats.shape[1] - 1) // 2 + 1 - 2) // 2 + 1
    prompt = [*tok.header("system"), *tok.encode(QWEN_SYSTEM_PROMPT), *tok.footer(), *tok.header("user"),
              tok.audio_start, *[tok.audio] * n_audio, tok.audio_end, *tok.footer(), *tok.header("assistant")]
    num_embeds = int(cfg.token2wav_config.dit_config.num_embeds)
    vocab = int(cfg.talker_config.vocab_size)
    # Codes the DiT cannot embed (and the end tokens) are banned, as the engine suppresses them:
    # both paths then make exactly codec_tokens codes.
    banned = [[i] for i in range(num_embeds, vocab)]

    def call(n: int, reply: int, codes: int) -> tuple[float, float]:
        ids = torch.tensor([prompt] * n, device=dev)
        kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            input_features=torch.from_numpy(feats)[None].repeat(n, 1, 1).to(dev, dtype),
            feature_attention_mask=torch.ones(n, feats.shape[1], dtype=torch.long, device=dev),
            speaker=sorted(model.speaker_map)[0],
            thinker_max_new_tokens=reply,
            thinker_min_new_tokens=reply,
            talker_max_new_tokens=codes,
            talker_bad_words_ids=banned,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.monotonic()
        with torch.no_grad():
            _, wavs = model.generate(**kwargs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        took = time.monotonic() - t
        wavs = [wavs] if isinstance(wavs, torch.Tensor) else wavs
        return took, float(np.mean([w.numel() / 24000 for w in wavs]))

    warm_s = 0.0
    try:
        warm_s, _ = call(1, 2, 24)
        phase["warm_up_call_s"] = round(warm_s, 2)
        out.save()
    except Exception as exc:
        out.error("stock:warm_up", exc)
    # The warm-up call (24 codes, plus one-time CUDA set-up) scaled to the reply: an upper
    # bound of the N = 1 call. Replies are shortened (and say so) only when that would not fit.
    codes = args.codec_tokens
    estimate = warm_s * codes / 24
    if warm_s and out.left() < 1.3 * estimate:
        codes = max(48, int(codes * out.left() / (1.3 * estimate)))
        phase["codec_tokens_used"] = codes
        phase["shortened"] = f"the stock reply was cut to {codes} codec tokens to fit the time left"
        print(f"   stock: {phase['shortened']}", flush=True)
    phase["codec_tokens"] = codes
    one_s = 0.0
    for n in args.counts[: args.stock_levels]:
        predicted = one_s * (1 + 0.25 * (n - 1)) if one_s else 0.0
        if out.left() < max(5.0, 1.3 * predicted):
            phase["skipped_from"] = n
            phase["skip_reason"] = f"{out.left():.0f} s left, the call would take ~{predicted:.0f} s"
            out.save()
            print(f"   stock N={n}: skipped ({phase['skip_reason']})", flush=True)
            break
        try:
            took, audio = call(n, args.reply_tokens, codes)
            if n == 1:
                one_s = took
            level = summarize([took] * n, [], [audio] * n, 0.0)
            level["call_s"] = round(took, 2)
            level["rtf"] = round(took / audio, 3) if audio else None  # < 1: faster than real time
            level["realtime_sessions"] = n if took <= audio else 0  # (all audio comes at the end anyway)
            phase["levels"][str(n)] = level
            out.save()
            print(f"   stock N={n:>3}: {json.dumps({k: v for k, v in level.items() if k != 'ttfa_ms'})}", flush=True)
        except Exception as exc:
            out.error(f"stock:N={n}", exc)
            if "out of memory" in str(exc).lower():
                break
    return 0
