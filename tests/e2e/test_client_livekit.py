"""LiveKit Agents' OpenAI realtime plugin (livekit-agents / livekit-plugins-openai 1.8.9)
against the real server.

The plugin's ``RealtimeModel``/``RealtimeSession``, used as LiveKit's AgentSession uses it
(see the driver), through a recording relay: a session, the greeting with
``generate_reply()`` (which sends ``"instructions": null``), a turn with audio, and an
interruption (``interrupt()`` + ``truncate()``) after which no audio of the interrupted
response may follow.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.realtime_clients import (
    CLIENT_SERVER_SECTIONS,
    WireRecorder,
    clients_venv_missing,
    delivered,
    first_interruption,
    run_driver,
    stale_message,
)
from tests.harness import ServerProcess

pytestmark = [pytest.mark.timeout(180), pytest.mark.clients]

if (why := clients_venv_missing()) is not None:
    pytest.skip(why, allow_module_level=True)


@pytest.fixture
async def wire() -> AsyncIterator[WireRecorder]:
    with ServerProcess(sections=CLIENT_SERVER_SECTIONS) as server:
        rec = await WireRecorder(server).start()
        yield rec
        await rec.stop()


async def test_livekit_session_greeting_turn_and_interruption_without_stale_audio(
    wire: WireRecorder, tmp_path: Path
) -> None:
    report = await run_driver("livekit", wire, tmp_path / "livekit.json", timeout_s=120)
    seq = "\n".join(wire.sequence())
    out = report["output"]
    kinds = [e["kind"] for e in report["events"] if e["kind"] != "audio"]
    # Session: the plugin configured it, the server accepted it.
    assert wire.of("session.created") and wire.of("session.update", "out"), seq
    assert wire.of("session.updated"), seq
    # A turn with audio: the response's audio reached the application, decodable.
    cut = first_interruption(wire)
    r1 = delivered(report, cut.tag)
    assert len(r1) >= 10, f"R1 audio frames delivered: {len(r1)}\n{seq}\n{out}"
    # The interruption: speech_started while R1 plays; the agent interrupts and truncates.
    assert cut.speech_started_t is not None, seq
    assert cut.client_cut in ("response.cancel", "conversation.item.truncate"), seq
    assert wire.of("conversation.item.truncate", "out"), seq
    interrupted = [e["t"] for e in report["events"] if e["kind"] == "interrupt" and e["t"] > r1[0]["t"]]
    assert interrupted, kinds
    assert cut.status == "cancelled", f"R1 ended {cut.status}\n{seq}"
    # Zero stale audio after the cancel/truncate: on the wire, and in what the plugin hands over.
    stale = delivered(report, cut.tag, after_t=interrupted[0])
    msg = stale_message(cut, len(stale), wire.sequence(cut.speech_started_t or 0.0))
    assert cut.after_cut == 0, msg
    # With interrupt_response, speech_started is the cancel: no audio of it after that either.
    assert cut.after_speech_started == 0, msg
    assert stale == [], msg
    # The session goes on: the interrupting speech was answered.
    assert len(wire.of("response.created")) >= 2, seq
    # Its most common call, generate_reply() (the greeting, before the turn), sends
    # "instructions": null: accepted and answered, no error on the wire.
    errors = [e.data.get("error") for e in wire.of("error")]
    assert "greeting_created" in kinds and errors == [], f"{kinds}\n{errors}\n{seq}\n{out}"
