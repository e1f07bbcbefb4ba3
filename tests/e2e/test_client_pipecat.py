"""Pipecat's OpenAI realtime service (pipecat-ai 1.14) against the real server.

The library's own ``OpenAIRealtimeLLMService`` in a real Pipecat pipeline (context
aggregators included), driven through a recording relay: a session, a turn with audio,
and an interruption after which no audio of the interrupted response may follow.
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


async def test_pipecat_session_turn_and_interruption_without_stale_audio(wire: WireRecorder, tmp_path: Path) -> None:
    report = await run_driver("pipecat", wire, tmp_path / "pipecat.json")
    seq = "\n".join(wire.sequence())
    out = report["output"]
    # Session: the service configured it, the server accepted it.
    assert wire.of("session.created") and wire.of("session.update", "out"), seq
    assert wire.of("session.updated") and not wire.of("error"), f"{seq}\n{out}"
    # A turn with audio: the first response's audio reached the pipeline, decodable.
    cut = first_interruption(wire)
    r1 = delivered(report, cut.tag)
    assert len(r1) >= 10, f"R1 audio frames delivered: {len(r1)}\n{seq}\n{out}"
    # The interruption: speech_started while R1 plays, Pipecat truncates R1 and interrupts.
    assert cut.speech_started_t is not None, seq
    assert cut.client_cut == "conversation.item.truncate", seq
    first_r1 = r1[0]["t"]
    interruptions = [e["t"] for e in report["events"] if e["kind"] == "interruption" and e["t"] > first_r1]
    assert interruptions, [e["kind"] for e in report["events"] if e["kind"] != "audio"]
    assert cut.status == "cancelled", f"R1 ended {cut.status}\n{seq}"
    # Zero stale audio: nothing of R1 on the wire after the truncate, nothing of R1 handed
    # to the output after Pipecat's interruption (it would play it, as a new TTS turn).
    stale = delivered(report, cut.tag, after_t=interruptions[0])
    msg = stale_message(cut, len(stale), wire.sequence(cut.speech_started_t or 0.0))
    assert cut.after_cut == 0, msg
    # With interrupt_response, speech_started is the cancel: no audio of it after that either.
    assert cut.after_speech_started == 0, msg
    assert stale == [], msg
    # The session goes on: the interrupting speech was answered.
    assert len(wire.of("response.created")) >= 2, seq
