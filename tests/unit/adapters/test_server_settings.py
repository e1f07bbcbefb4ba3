"""The adapter's settings as an operator writes them: API key files, the frame limit."""

from __future__ import annotations

from pathlib import Path

import msgspec

from duplexd.adapters.server import ServerSettings, frame_limit, load_api_keys


def test_api_key_file_skips_comments_even_indented(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\n  sk-one  \n\n    # sk-revoked (an indented comment)\n\t# tab too\nsk-two\n")
    settings = msgspec.structs.replace(ServerSettings(), api_keys=["sk-list"], api_key_file=str(keys))
    assert load_api_keys(settings) == ["sk-list", "sk-one", "sk-two"]


def test_frame_limit_is_what_an_append_can_use_not_64_mib() -> None:
    s = ServerSettings()
    limit = frame_limit(s)
    # The largest accepted append, base64-encoded, fits, with room for its JSON and for an
    # append a little too large to still be answered with audio_too_large ...
    assert limit >= s.max_audio_bytes * 4 // 3 + 64 * 1024
    # ... and nothing much bigger gets buffered (one 60 MiB frame cost ~160 MB in the adapter).
    assert limit <= s.max_audio_bytes * 4 // 3 + 2 * 1024 * 1024
    assert limit < 24 * 1024 * 1024
