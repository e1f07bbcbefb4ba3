"""The OpenAI Agents SDK's realtime runner (openai-agents 0.24) against duplexd.

``RealtimeRunner(RealtimeAgent)`` → ``RealtimeSession``: audio goes in with
``send_audio``; the session's events (``audio``, ``audio_interrupted``, ``error``...) are
what an application plays and reacts to. Run with the clients venv.
"""

from __future__ import annotations

import asyncio
import contextlib

from agents.realtime import RealtimeAgent, RealtimeRunner

from tests.e2e.clients.common import RATE, Microphone, Report, args, scenario


async def main() -> None:
    a = args()
    report = Report("openai-agents")
    agent = RealtimeAgent(name="assistant", instructions="Answer briefly.")
    runner = RealtimeRunner(
        agent,
        config={
            "model_settings": {
                "model_name": "gpt-realtime",
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 400, "interrupt_response": True},
            }
        },
    )
    responses: list[str] = []
    r1_ms = [0.0]
    session = await runner.run(model_config={"url": f"{a.url}/realtime?model=gpt-realtime", "api_key": a.key})

    async def events() -> None:
        async for ev in session:
            if ev.type == "audio":
                rid = ev.audio.response_id
                if rid not in responses:
                    responses.append(rid)
                    report.note("response_audio_started", response_id=rid, n=len(responses))
                report.audio(ev.audio.data, response_id=rid, item_id=ev.item_id)
                if len(responses) == 1:
                    r1_ms[0] += len(ev.audio.data) / 2 / RATE * 1000
            elif ev.type in ("audio_interrupted", "audio_end"):
                report.note(ev.type, item_id=ev.item_id)
            elif ev.type == "error":
                report.note("error", error=str(ev.error)[:300])

    try:
        async with session:
            reader = asyncio.create_task(events())
            await asyncio.sleep(0.5)
            report.note("start")
            try:
                await scenario(report, Microphone(session.send_audio), lambda: r1_ms[0], lambda: len(responses))
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    finally:
        report.dump(a.out)


if __name__ == "__main__":
    asyncio.run(main())
