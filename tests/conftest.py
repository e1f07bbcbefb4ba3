"""Shared fixtures: a real server (four processes) per module, on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import ServerProcess


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ServerProcess]:
    """Scripted engine; tones are not speech, so sessions here use manual or duplex mode."""
    server = ServerProcess(
        sections={
            "engines.scripted": {"reply_ms": 2000, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 500},
            "host": {"vad": "energy"},
        }
    )
    with server:
        yield server
