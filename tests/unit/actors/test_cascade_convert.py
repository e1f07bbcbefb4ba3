"""GGUF → CTranslate2 conversion against a transformers reference, on tiny random llama and
qwen2 models written as GGUF in the test; the model cache's keying, atomicity and repair."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from duplexd.actors.engines.cascade import convert, model_cache
from duplexd.actors.engines.cascade.convert import ConversionError, convert_gguf, unpermute_qk
from tests.harness import REPO, write_config
from tests.unit.actors.gguf_kit import CHATML, CORPUS, N_HEAD, TinyModel, build, permute, permute_inverse

pytest.importorskip("gguf")
pytest.importorskip("ctranslate2")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build(tmp_path_factory.mktemp("cache-llama"), "llama", seed=1)


def ct2_logits(model_dir: Path, ids: list[int], compute_type: str) -> np.ndarray:
    import ctranslate2

    gen = ctranslate2.Generator(str(model_dir), device="cpu", compute_type=compute_type, intra_threads=1)
    return np.asarray(gen.forward_batch([ids]))[0]


def hf_logits(tiny: TinyModel, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return tiny.hf(torch.tensor([ids])).logits[0].numpy()


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (8, 4):
        p = permute(w, N_HEAD * 2, heads)
        assert not np.array_equal(p, w)
        assert np.array_equal(unpermute_qk(p, heads), w)
        assert np.array_equal(permute_inverse(p, heads), w)


def test_converted_logits_match_the_transformers_model(tiny: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "ct2"
    res = convert_gguf(tiny.path, out, quantization="float32")
    assert res.arch == tiny.arch and res.chat.name == "chatml" and res.chat.end_tokens == ("<|im_end|>",)
    ids = tiny.tokenizer.encode(CORPUS[1] + " " + CORPUS[2]).ids[:40]
    assert len(ids) >= 24  # long enough for rope to matter at every position
    ref, got = hf_logits(tiny, ids), ct2_logits(out, ids, "float32")
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-3 * float(np.abs(ref).max()), rtol=0)

    # int8 weights (what the cache stores): close to the reference. CTranslate2's int8 *compute*
    # also quantizes activations, which on a random 64-wide model is only roughly right.
    out8 = tmp_path / "ct2-int8"
    convert_gguf(tiny.path, out8, quantization="int8")
    w8 = ct2_logits(out8, ids, "float32")
    assert rel_rms(w8, ref) < 0.03 and float(np.mean(w8.argmax(-1) == ref.argmax(-1))) >= 0.9
    assert np.corrcoef(ct2_logits(out8, ids, "int8").ravel(), ref.ravel())[0, 1] > 0.97


def rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def test_rebuilt_tokenizer_matches_the_reference_and_round_trips(tiny: TinyModel, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    out = tmp_path / "ct2"
    convert_gguf(tiny.path, out, quantization="float32")
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [*CORPUS, "  two  spaces\nand a newline\n\n", "Paris, 2025: 1,000,000 people!"]
    for text in texts:
        ref = tiny.tokenizer.encode(text).ids
        assert tk.encode(text, add_special_tokens=False).ids == ref, text
        assert tk.decode(ref) == text
    # Control tokens are single tokens; the vocabulary order is the GGUF's.
    assert tk.encode("<|im_start|>user", add_special_tokens=False).ids[0] == tiny.tokenizer.token_to_id("<|im_start|>")
    vocab = json.loads((out / "vocabulary.json").read_text())
    assert vocab == [tiny.tokenizer.id_to_token(i) for i in range(len(vocab))]


def test_unsupported_files_fail_with_a_clear_error(tmp_path: Path) -> None:
    import gguf

    bad = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(bad), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="architecture 'gpt2' is not supported"):
        convert_gguf(bad, tmp_path / "o1")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        convert_gguf(junk, tmp_path / "o2")
    with pytest.raises(ConversionError, match="unsupported chat template"):
        convert.detect_chat_format("{{ messages }}", {"<s>"}, "<s>", True)
    assert convert.detect_chat_format(CHATML, {"<|im_start|>", "<|im_end|>"}, "", False).name == "chatml"
    llama3 = convert.detect_chat_format(
        "<|start_header_id|>", {"<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"}, "<|begin_of_text|>", True
    )
    assert llama3.name == "llama3" and llama3.end_tokens == ("<|eot_id|>", "<|end_of_text|>")


def test_llama3_rope_factors_are_recognised() -> None:
    f = convert.llama3_rope_factors(32.0, 1.0, 4.0, 8192, 500000.0, 64)
    assert f[0] == 1.0 and f[-1] == 32.0 and np.all(np.diff(f) >= 0)


# ---------------------------------------------------------------------- cache
def _prepare(src: Path, cache: Path) -> model_cache.PreparedModel:
    return model_cache.prepare(str(src), str(cache), progress=lambda _m: None)


def test_cache_converts_once_per_source_hash(tmp_path: Path, llama: TinyModel) -> None:
    tiny = llama
    cache = tmp_path / "cache"
    first = _prepare(tiny.path, cache)
    assert first.converted and first.chat.name == "chatml"
    manifest = json.loads((first.path / model_cache.MANIFEST).read_text())
    assert manifest["source_sha256"] == model_cache.file_sha256(tiny.path)
    again = _prepare(tiny.path, cache)
    assert not again.converted and again.path == first.path
    # A copy elsewhere with the same bytes is the same entry; changed bytes are a new one.
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny.path, copy)
    assert not _prepare(copy, cache).converted
    with copy.open("ab") as f:
        f.write(b"\0" * 64)  # trailing padding: still a valid GGUF, another hash
    other = _prepare(copy, cache)
    assert other.converted and other.path != first.path


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_manifest", "missing_file"])
def test_a_partial_or_corrupt_cache_entry_is_rebuilt(tmp_path: Path, llama: TinyModel, damage: str) -> None:
    tiny = llama
    cache = tmp_path / "cache"
    entry = _prepare(tiny.path, cache).path
    good = (entry / "model.bin").read_bytes()
    if damage == "truncate":
        (entry / "model.bin").write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        (entry / "model.bin").write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    elif damage == "no_manifest":
        (entry / model_cache.MANIFEST).unlink()
    elif damage == "bad_manifest":
        (entry / model_cache.MANIFEST).write_text("{ half a manifest")
    else:
        (entry / "tokenizer.json").unlink()
    # A conversion killed half-way left its temporary directory behind.
    (cache / f".{entry.name}.dead").mkdir()
    again = _prepare(tiny.path, cache)
    assert again.converted and again.path == entry
    assert (entry / "model.bin").read_bytes() == good
    assert not list(cache.glob(f".{entry.name}.*/"))
    assert not _prepare(tiny.path, cache).converted


def test_a_ready_ctranslate2_directory_is_used_as_it_is(tmp_path: Path, llama: TinyModel) -> None:
    tiny = llama
    out = tmp_path / "mine"
    convert_gguf(tiny.path, out, quantization="int8")  # no manifest: the chat format comes from the tokenizer
    got = model_cache.prepare(str(out), str(tmp_path / "unused"))
    assert got.path == out and not got.converted and got.chat.name == "chatml"
    assert not (tmp_path / "unused").exists()
    with pytest.raises(model_cache.ModelPrepError, match="no such file"):
        model_cache.prepare(str(tmp_path / "nope.gguf"), str(tmp_path / "c"))
    (out / "tokenizer.json").unlink()
    with pytest.raises(model_cache.ModelPrepError, match="tokenizer.json is missing"):
        model_cache.prepare(str(out), "")


def test_cache_home_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert model_cache.default_cache_dir() == tmp_path / "duplexd" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache.default_cache_dir() == tmp_path / "home" / ".cache" / "duplexd" / "models"


def test_prepare_models_command_converts_once_and_reports_errors(tmp_path: Path, llama: TinyModel) -> None:
    def run(**cascade: str) -> subprocess.CompletedProcess[str]:
        cfg = tmp_path / "c.toml"
        write_config(cfg, {"engines.cascade": cascade})
        cmd = [sys.executable, "-m", "duplexd.runtime.cli", "prepare-models", "--config", str(cfg)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)

    cache = str(tmp_path / "cache")
    first = run(local_model=str(llama.path), local_cache_dir=cache)
    assert first.returncode == 0, first.stderr
    assert "local model: converting" in first.stderr and "local model converted:" in first.stderr
    again = run(local_model=str(llama.path), local_cache_dir=cache)
    assert again.returncode == 0 and "already prepared" in again.stderr and "converting" not in again.stderr
    missing = run(local_model=str(tmp_path / "nope.gguf"), local_cache_dir=cache)
    assert missing.returncode == 1 and "no such file" in missing.stderr
    echo = run(policy="echo")
    assert echo.returncode == 0 and "nothing to prepare" in echo.stderr
