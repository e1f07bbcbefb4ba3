"""Test harness: start the real server (supervisor + four role processes) and talk to it.

``ServerProcess`` writes a config for a free port and a private run dir, starts
``python -m duplexd.runtime.cli serve``, waits for ``/health`` to report all four roles,
and stops it (SIGTERM, ordered) at the end. ``NativeClient`` is a thin ``websockets``
client of ``/v1/duplex`` that records every event and decodes audio frames.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from duplexd.actors.engines.scripted import decode_chunk
from duplexd.adapters.native import AUDIO_IN, AUDIO_IN_FORCE, unpack_audio_out

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


@dataclass
class ServerProcess:
    """The real server in child processes, on a free port."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine: str = "scripted"
    ready_timeout_s: float = 120.0
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    log_path: Path | None = None

    def start(self) -> ServerProcess:
        self.port = self.port or free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="dx-")
        d = Path(self.tmp.name)
        sections = {k: dict(v) for k, v in self.sections.items()}
        sections.setdefault("server", {}).setdefault("port", self.port)
        sections["server"]["port"] = self.port
        sections.setdefault("bus", {}).setdefault("run_dir", str(d / "run"))
        sections.setdefault("engine", {}).setdefault("name", self.engine)
        sections.setdefault("logging", {}).setdefault("level", "INFO")
        cfg = d / "config.toml"
        write_config(cfg, sections)
        self.log_path = d / "server.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "duplexd.runtime.cli", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://{self.base}/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self, timeout_s: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            with contextlib.suppress(OSError, ValueError):
                code, body = self.health()
                last = body
                if code == 200:
                    return body
            time.sleep(0.1)
        raise TimeoutError(f"server not ready: {last}\n{self.logs()[-4000:]}")

    def role_pid(self, role: str) -> int:
        _, body = self.health()
        return next(r["pid"] for r in body["roles"] if r["role"] == role)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        if self.tmp is not None:
            self.tmp.cleanup()
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- audio helpers
def tone(ms: int, rate: int = 24000, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(rate * ms // 1000) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(ms: int, rate: int = 24000) -> np.ndarray:
    return np.zeros(rate * ms // 1000, dtype=np.float32)


def pcm16(x: np.ndarray) -> bytes:
    return np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def frames(x: np.ndarray, frame_ms: int = 20, rate: int = 24000) -> list[np.ndarray]:
    n = rate * frame_ms // 1000
    return [x[i : i + n] for i in range(0, len(x), n)]


@dataclass
class AudioFrame:
    header: dict[str, Any]
    pcm: np.ndarray
    received_after: int  # index in the event list when it arrived

    @property
    def marker(self) -> tuple[int, int, int] | None:
        return decode_chunk(self.pcm)


class EventLog:
    """Every event a client connection received, in order, and waiting for one."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.monotonic() each event arrived (same index)
        self.closed = False
        self.closed_at: float | None = None
        self._cond = asyncio.Condition()

    async def add(self, event: dict[str, Any]) -> None:
        async with self._cond:
            self.events.append(event)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def time_of(self, event: dict[str, Any]) -> float:
        """When ``event`` (one of ``events``) arrived."""
        return self.times[next(i for i, e in enumerate(self.events) if e is event)]

    async def mark_closed(self) -> None:
        async with self._cond:
            self.closed = True
            self.closed_at = time.monotonic()
            self._cond.notify_all()

    def of(self, etype: str, start: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[start:] if e["type"] == etype]

    def types(self, start: int = 0) -> list[str]:
        return [e["type"] for e in self.events[start:]]

    async def wait_for(
        self, what: str | Callable[[dict[str, Any]], bool], within_s: float = 15.0, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``start`` on that is of type ``what`` (or matches it)."""
        pred = (lambda e: e["type"] == what) if isinstance(what, str) else what
        try:
            async with asyncio.timeout(within_s), self._cond:
                while True:
                    for e in self.events[start:]:
                        if pred(e):
                            return e
                    if self.closed:
                        raise ConnectionError(f"closed while waiting for {what}: {self.types(start)[-8:]}")
                    await self._cond.wait()
        except TimeoutError:
            tail = [e if e["type"] == "error" else e["type"] for e in self.events[start:]][-8:]
            raise AssertionError(f"no {what} within {within_s} s; events since: {tail}") from None

    async def wait_closed(self, within_s: float = 15.0) -> None:
        async with asyncio.timeout(within_s), self._cond:
            await self._cond.wait_for(lambda: self.closed)



class JsonClient(EventLog):
    """A raw websocket client of a JSON protocol (Realtime, native, the demo bridge); binary
    frames (the native protocol's output audio) are recorded as ``(audio frame)`` events."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                await self.add({"type": "(audio frame)"} if isinstance(frame, bytes) else json.loads(frame))
        except websockets.ConnectionClosed:
            pass
        finally:
            await self.mark_closed()

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.ws.send(event if isinstance(event, str) else json.dumps(event))

    async def ask(self, event: dict[str, Any] | str, answer: str, within_s: float = 15.0) -> dict[str, Any]:
        n = len(self.events)
        await self.send(event)
        return await self.wait_for(answer, start=n, within_s=within_s)

    async def close(self) -> None:
        await self.ws.close()
        await self._reader

class NativeClient(EventLog):
    """Records everything a ``/v1/duplex`` connection receives."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self.audio: list[AudioFrame] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, server: ServerProcess, **kw: Any) -> NativeClient:
        ws = await websockets.connect(f"ws://{server.base}/v1/duplex", max_size=None, **kw)
        client = cls(ws)
        await client.wait_for("session.created")
        return client

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    header, pcm = unpack_audio_out(frame)
                    self.audio.append(AudioFrame(header, np.frombuffer(pcm, dtype="<i2"), len(self.events)))
                    await self.add({"type": "audio", **header, "bytes": len(pcm)})
                else:
                    await self.add(json.loads(frame))
        except websockets.ConnectionClosed:
            pass
        finally:
            await self.mark_closed()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def send_audio(self, x: np.ndarray, force: bool = False) -> None:
        await self.ws.send(bytes([AUDIO_IN_FORCE if force else AUDIO_IN]) + pcm16(x))

    async def stream(self, x: np.ndarray, frame_ms: int = 20, realtime: float = 0.0) -> None:
        """Send ``x`` in frames; ``realtime`` > 0 paces at that multiple of real time."""
        for f in frames(x, frame_ms):
            await self.send_audio(f)
            if realtime:
                await asyncio.sleep(frame_ms / 1000 / realtime)

    async def append_b64(self, x: np.ndarray) -> None:
        await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(x)).decode()})

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


class RealtimeClient(EventLog):
    """Records everything a ``/v1/realtime`` connection receives (audio deltas decoded)."""

    def __init__(self, ws: Any) -> None:
        super().__init__()
        self.ws = ws
        self.audio: list[AudioFrame] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, server: ServerProcess, query: str = "", wait: bool = True, **kw: Any) -> RealtimeClient:
        ws = await websockets.connect(f"ws://{server.base}/v1/realtime{query}", max_size=None, **kw)
        client = cls(ws)
        if wait:
            await client.wait_for("session.created")
        return client

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                e = json.loads(frame)
                if e["type"] in ("response.output_audio.delta", "response.audio.delta"):
                    pcm = np.frombuffer(base64.b64decode(e["delta"]), dtype="<i2")
                    self.audio.append(AudioFrame(e, pcm, len(self.events)))
                    e = {**e, "delta": len(pcm)}
                await self.add(e)
        except websockets.ConnectionClosed:
            pass
        finally:
            await self.mark_closed()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def append(self, x: np.ndarray, event_id: str = "") -> None:
        event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm16(x)).decode()}
        await self.send({**event, "event_id": event_id} if event_id else event)

    async def manual_turn(self, x: np.ndarray, tag: str = "turn") -> str:
        """Manual turn taking: append ``x``, commit, ask for a response. Returns the
        response.create's event id (``<tag>-create``; the others: ``-append``, ``-commit``)."""
        await self.append(x, f"{tag}-append")
        await self.send({"type": "input_audio_buffer.commit", "event_id": f"{tag}-commit"})
        await self.send({"type": "response.create", "event_id": f"{tag}-create"})
        return f"{tag}-create"

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false")
