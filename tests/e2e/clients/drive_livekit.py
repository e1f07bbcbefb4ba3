"""LiveKit Agents' OpenAI realtime plugin (livekit-plugins-openai 1.8.9) against duplexd.

The plugin's ``RealtimeModel`` → ``RealtimeSession``, used as LiveKit's AgentSession uses
it: ``push_audio`` of ``rtc.AudioFrame``s, ``generate_reply()`` for the greeting (its most
common call), and on ``input_speech_started`` during a reply what the agent activity does:
``interrupt()`` and ``truncate(message_id, audio_end_ms=<played>)``. Run with the clients venv.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import llm
from livekit.plugins.openai import realtime
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad

from tests.e2e.clients.common import RATE, Microphone, Report, args, scenario, wait_until


async def main() -> None:
    a = args()
    report = Report("livekit")
    async with aiohttp.ClientSession() as http:
        model = realtime.RealtimeModel(
            base_url=a.url,
            api_key=a.key,
            model="gpt-realtime",
            http_session=http,
            turn_detection=ServerVad(
                type="server_vad", silence_duration_ms=400, create_response=True, interrupt_response=True
            ),
        )
        sess = model.session()
        gens: list[dict[str, Any]] = []  # one per generation: {message_id, ms, done, interrupted}
        tasks: set[asyncio.Task[None]] = set()

        async def play(gen: dict[str, Any], stream: Any) -> None:
            async for msg in stream:
                gen["message_id"] = msg.message_id
                async for frame in msg.audio_stream:
                    pcm = bytes(frame.data)
                    if gen["interrupted"]:
                        report.audio(pcm, generation=gen["n"], after_interrupt=True)
                        continue  # AgentSession would not play it
                    report.audio(pcm, generation=gen["n"])
                    gen["ms"] += len(pcm) / 2 / RATE * 1000
            gen["done"] = True
            report.note("generation_done", n=gen["n"])

        def on_generation(ev: llm.GenerationCreatedEvent) -> None:
            gen = {"n": len(gens) + 1, "message_id": None, "ms": 0.0, "done": False, "interrupted": False}
            gens.append(gen)
            report.note("generation_created", n=gen["n"], user_initiated=ev.user_initiated)
            t = asyncio.get_running_loop().create_task(play(gen, ev.message_stream))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        def on_speech_started(_: Any) -> None:
            report.note("input_speech_started")
            live = [g for g in gens if not g["done"] and not g["interrupted"]]
            for g in live:
                # What AgentSession does when the user talks over its speech.
                g["interrupted"] = True
                report.note("interrupt", n=g["n"], played_ms=round(g["ms"]))
                sess.interrupt()
                if g["message_id"]:
                    sess.truncate(message_id=g["message_id"], modalities=["audio"], audio_end_ms=int(g["ms"]))

        sess.on("generation_created", on_generation)
        sess.on("input_speech_started", on_speech_started)
        sess.on("error", lambda ev: report.note("error", error=str(getattr(ev, "error", ev))[:300]))

        def send(pcm: bytes) -> None:
            sess.push_audio(rtc.AudioFrame(pcm, RATE, 1, len(pcm) // 2))

        try:
            await asyncio.sleep(0.5)
            report.note("start")
            # The greeting: generate_reply() with no arguments, as agents call it on entry.
            try:
                await asyncio.wait_for(sess.generate_reply(), 12)
                report.note("greeting_created")
                await wait_until(lambda: bool(gens) and gens[0]["done"], 15, "greeting audio", report)
            except (llm.RealtimeError, TimeoutError) as exc:
                report.note("greeting_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            skip = len(gens)  # the turn's response is the next generation
            await scenario(
                report,
                Microphone(send),
                lambda: gens[skip]["ms"] if len(gens) > skip else 0.0,
                lambda: len(gens) - skip,
            )
        finally:
            report.dump(a.out)
            for t in list(tasks):
                t.cancel()
            with contextlib.suppress(Exception):
                await sess.aclose()
            await model.aclose()


if __name__ == "__main__":
    asyncio.run(main())
