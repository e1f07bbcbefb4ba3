"""End-to-end fixtures: real servers (supervisor + four processes) per test module.

Fixture names carry their suite's prefix (``native_``, ``bridge_``, ``browser_``...) so the
suites sharing this file never shadow each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import ServerProcess, free_port

# ---------------------------------------------------------------------- native protocol (test_native.py)
NATIVE_REPLY_MS = 2000


@pytest.fixture(scope="module")
def native_server() -> Iterator[ServerProcess]:
    """Scripted engine, energy VAD (tones are speech), audio generated at real-time pace
    (at most 500 ms ahead), so a barge-in lands while the reply is still being made."""
    server = ServerProcess(
        sections={
            "engines.scripted": {"reply_ms": NATIVE_REPLY_MS, "out_chunk_ms": 40},
            "stage1": {"max_lead_ms": 500},
            "host": {"vad": "energy"},
        }
    )
    with server:
        yield server


# ---------------------------------------------------------------------- MiniCPM-o demo bridge (test_bridge.py)
BRIDGE_REPLY_MS = 2400  # two full 1 s results and a 0.4 s turn-final one


@dataclass
class BridgeServer:
    """The real server with the demo bridge on its own port."""

    server: ServerProcess
    port: int

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def bridge_server() -> Iterator[BridgeServer]:
    port = free_port()
    server = ServerProcess(
        sections={
            "server": {"bridge_port": port},
            "engines.scripted": {"reply_ms": BRIDGE_REPLY_MS, "out_chunk_ms": 40, "interrupt_chunks": 3},
            # Audio is made at most 500 ms ahead of real time, so the reply is still being
            # generated (cancellable) when the user barges in a second after it started.
            "stage1": {"max_lead_ms": 500},
            "host": {"vad": "energy"},
        }
    )
    with server:
        yield BridgeServer(server, port)
