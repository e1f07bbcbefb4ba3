"""Real client libraries against the real server: their venv, a wire recorder, the checks.

The libraries (Pipecat, LiveKit Agents, the OpenAI Agents SDK) pin websockets < 17 and
protobuf < 7, which the server's own environment does not, so they live in their own
virtualenv, ``.venv-clients`` (``make test`` builds it from ``requirements/clients.txt``).
Each library is driven by a script in ``tests/e2e/clients/`` running in that venv; it
reports what the library handed to the application. Between it and the server sits a
:class:`WireRecorder`, a transparent websocket relay that logs every event both ways
(audio deltas reduced to their scripted-engine marker), so a failure shows the exact
event sequence on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.server import ServerConnection

from duplexd.actors.engines.scripted import MARKER, response_tag
from tests.harness import REPO, ServerProcess

CLIENTS_PY = REPO / ".venv-clients" / "bin" / "python"

# The scripted engine answers each turn with 4 s of marked tone made at real-time pace
# (so a reply is still being generated when the user talks over it); energy VAD hears
# the drivers' tones as speech. Overlap knobs stay at their defaults: that is the contract.
CLIENT_SERVER_SECTIONS: dict[str, dict[str, Any]] = {
    "engines.scripted": {"reply_ms": 4000, "out_chunk_ms": 40},
    "stage1": {"max_lead_ms": 500},
    "host": {"vad": "energy"},
}


def clients_venv_missing() -> str | None:
    if not (CLIENTS_PY.parent.parent / ".installed").exists():
        return "the client libraries' venv (.venv-clients) is not built: run `make test` (or `make clients`)"
    return None


@dataclass
class WireEvent:
    t: float
    direction: str  # "in": server → client; "out": client → server
    type: str
    data: dict[str, Any]


@dataclass
class WireRecorder:
    """A websocket relay on a free port that forwards to ``server`` and logs both ways."""

    server: ServerProcess
    events: list[WireEvent] = field(default_factory=list)
    t0: float = 0.0  # times are CLOCK_MONOTONIC, system-wide: comparable with the drivers' reports
    port: int = 0
    _server: Any = None

    async def start(self) -> WireRecorder:
        self._server = await websockets.serve(self._relay, "127.0.0.1", 0, max_size=None, compression=None)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def _log(self, direction: str, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            self.events.append(WireEvent(time.monotonic() - self.t0, direction, "(binary)", {"bytes": len(raw)}))
            return
        try:
            ev = json.loads(raw)
        except ValueError:
            ev = {"type": "(not json)"}
        etype = str(ev.get("type", "?"))
        data: dict[str, Any] = {k: v for k, v in ev.items() if k not in ("delta", "audio")}
        if etype in ("response.output_audio.delta", "response.audio.delta"):
            pcm = base64.b64decode(ev.get("delta", ""))
            samples = np.frombuffer(pcm[:8], dtype="<i2")
            data["marker"] = [int(x) for x in samples]
            data["ms"] = len(pcm) / 48
        elif etype == "input_audio_buffer.append":
            data = {}
        self.events.append(WireEvent(time.monotonic() - self.t0, direction, etype, data))

    async def _relay(self, client: ServerConnection) -> None:
        assert client.request is not None
        keep = ("authorization", "openai-beta")
        headers = [(k, v) for k, v in client.request.headers.raw_items() if k.lower() in keep]
        upstream_url = f"ws://{self.server.base}{client.request.path}"
        async with websockets.connect(upstream_url, additional_headers=headers, max_size=None) as upstream:

            async def pump(src: Any, dst: Any, direction: str) -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    async for msg in src:
                        self._log(direction, msg)
                        await dst.send(msg)
                with contextlib.suppress(Exception):
                    await dst.close()

            await asyncio.gather(pump(client, upstream, "out"), pump(upstream, client, "in"))

    # ------------------------------------------------------------------ reading the wire
    def of(self, etype: str, direction: str = "in") -> list[WireEvent]:
        return [e for e in self.events if e.type == etype and e.direction == direction]

    def sequence(self, start_t: float = 0.0, limit: int = 60) -> list[str]:
        """A compact event sequence from ``start_t`` (audio deltas folded into runs)."""
        out: list[str] = []
        run = 0
        for e in self.events:
            if e.t < start_t or e.type == "input_audio_buffer.append":
                continue
            if e.type in ("response.output_audio.delta", "response.audio.delta"):
                run += 1
                continue
            if run:
                out.append(f"{run}x audio.delta")
                run = 0
            arrow = "<-" if e.direction == "in" else "->"
            extra = ""
            if e.type == "response.done":
                extra = f" {e.data['response'].get('status')}"
            elif e.type == "conversation.item.truncate":
                extra = f" audio_end_ms={e.data.get('audio_end_ms')}"
            elif e.type == "error":
                extra = f" {e.data.get('error', {}).get('code')}"
            out.append(f"{e.t - self.events[0].t:7.3f} {arrow} {e.type}{extra}")
        if run:
            out.append(f"{run}x audio.delta")
        return out[:limit]


@dataclass
class Interruption:
    """What the wire shows about the first response and how it was interrupted."""

    response_id: str
    item_id: str
    tag: int
    speech_started_t: float | None
    client_cut_t: float | None  # the client's truncate (or cancel) of it
    client_cut: str | None
    cancelled_t: float | None  # response.done (cancelled) of it
    status: str | None
    after_cut: int  # its audio deltas that reached the client after its cut
    after_speech_started: int  # ...after speech_started
    after_cancel: int  # ...after its response.done


def first_interruption(wire: WireRecorder) -> Interruption:
    """The first response the user talked over: ``speech_started`` after its first audio
    delta and before its ``response.done``."""
    audio = [e for e in wire.events if e.direction == "in" and e.type.endswith("audio.delta")]
    started_at = [e.t for e in wire.of("input_audio_buffer.speech_started")]
    created = wire.of("response.created")
    assert created, f"no response.created on the wire: {wire.sequence()}"
    rid = created[0].data["response"]["id"]
    for c in created:
        r = c.data["response"]["id"]
        mine = [e.t for e in audio if e.data.get("response_id") == r]
        done = [e.t for e in wire.of("response.done") if e.data["response"]["id"] == r]
        end = done[0] if done else float("inf")
        if mine and any(mine[0] < t < end for t in started_at):
            rid = r
            break
    added = [e for e in wire.of("response.output_item.added") if e.data.get("response_id") == rid]
    item = added[0].data["item"]["id"] if added else ""
    mine_ev = [e for e in audio if e.data.get("response_id") == rid]
    first_audio_t = mine_ev[0].t if mine_ev else 0.0
    started = [t for t in started_at if t > first_audio_t]
    cuts = [
        e
        for e in wire.events
        if e.direction == "out"
        and (
            (e.type == "conversation.item.truncate" and e.data.get("item_id") == item)
            or e.type in ("response.cancel", "output_audio_buffer.clear")
        )
        and e.t > first_audio_t
    ]
    done_ev = [e for e in wire.of("response.done") if e.data["response"]["id"] == rid]
    cut_t = cuts[0].t if cuts else None
    done_t = done_ev[0].t if done_ev else None
    status = done_ev[0].data["response"]["status"] if done_ev else None
    return Interruption(
        response_id=rid,
        item_id=item,
        tag=response_tag(rid),
        speech_started_t=started[0] if started else None,
        client_cut_t=cut_t,
        client_cut=cuts[0].type if cuts else None,
        cancelled_t=done_t if status == "cancelled" else None,
        status=status,
        after_cut=sum(1 for e in mine_ev if cut_t is not None and e.t > cut_t),
        after_speech_started=sum(1 for e in mine_ev if started and e.t > started[0]),
        after_cancel=sum(1 for e in mine_ev if done_t is not None and e.t > done_t),
    )


def stale_message(cut: Interruption, stale_delivered: int, seq: list[str]) -> str:
    gap = (
        round(cut.cancelled_t - cut.speech_started_t, 3)
        if cut.cancelled_t is not None and cut.speech_started_t is not None
        else None
    )
    return (
        f"{cut.response_id}: {cut.after_cut} audio deltas on the wire after the client's {cut.client_cut}, "
        f"{cut.after_speech_started} after speech_started, {cut.after_cancel} after its response.done; "
        f"{stale_delivered} chunks handed to the application after the library's interruption; "
        f"speech_started -> response.done(cancelled): {gap} s\n" + "\n".join(seq)
    )


def delivered(report: dict[str, Any], tag: int, after_t: float | None = None) -> list[dict[str, Any]]:
    """Audio chunks the library handed to the application that belong to response ``tag``."""
    return [
        e
        for e in report["events"]
        if e["kind"] == "audio"
        and len(e["marker"]) == 4
        and e["marker"][0] == MARKER
        and e["marker"][1] == tag
        and (after_t is None or e["t"] > after_t)
    ]


ARTIFACTS = REPO / "tests" / "artifacts" / "clients"


async def run_driver(name: str, wire: WireRecorder, out: Path, timeout_s: float = 90.0) -> dict[str, Any]:
    """Run ``tests/e2e/clients/drive_<name>.py`` in the clients venv; its report. The wire's
    event sequence is kept in ``tests/artifacts/clients/<name>-wire.txt`` as evidence."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("VIRTUAL_ENV", None)
    proc = await asyncio.create_subprocess_exec(
        str(CLIENTS_PY),
        "-m",
        f"tests.e2e.clients.drive_{name}",
        "--url",
        wire.url,
        "--out",
        str(out),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    try:
        raw = await asyncio.to_thread(out.read_text)
    except FileNotFoundError:
        raise AssertionError(f"the {name} driver wrote no report (exit {proc.returncode}):\n{text[-4000:]}") from None
    report = json.loads(raw)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread((ARTIFACTS / f"{name}-wire.txt").write_text, "\n".join(wire.sequence(limit=100000)) + "\n")
    report["exit_code"] = proc.returncode
    report["output"] = text[-4000:]
    return report
