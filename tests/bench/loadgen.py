"""The sweep's load generator: many real-time echo sessions over real websockets, lean.

Runs in processes of its own (never inside a server process), each with one event loop
driving its share of the sessions through a minimal websocket client on asyncio
protocols: frames are pre-built and pre-masked, so the generator's cost per frame is one
``transport.write``. Every session streams 20 ms frames of pcm16 24 kHz in real time
(phases spread evenly across the 20 ms period) and counts the assistant audio that comes
back.

Added latency of an echo: for each output message, the time from sending the input frame
that completes the engine chunk holding the message's last sample (in input time, sample
for sample: the echo plays input back) to receiving the message. Waiting for a chunk to
fill is the model's format, not the server's cost; everything after it counts: resampler
look-ahead, queueing, bus hops, model steps, websocket sends. Pipecat's pipeline has no
engine chunk (it echoes every 20 ms frame), so for it the chunk is one frame. The native
protocol's decisions (``response.speak``/``listen`` of chunk k) are timed from the frame
that completes chunk k. Protocols:

* ``native``: ``/v1/duplex``, binary frames in (0x01 + pcm); binary audio frames out (0x81
  + header + pcm); decisions (``response.speak``/``listen``) are JSON;
* ``realtime``: ``/v1/realtime?duplex=1``, ``input_audio_buffer.append`` with base64 in,
  ``response.output_audio.delta`` out;
* ``pipecat``: raw pcm16 binary frames both ways (tests/bench/pipecat_echo.py).

This file needs only numpy and the standard library (uvloop if present).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RATE = 24000
FRAME_MS = 20
FRAME_SAMPLES = RATE * FRAME_MS // 1000
_MASK = b"\x37\xfa\x21\x3d"
_MASK_ARR = np.frombuffer(_MASK * 4096, dtype=np.uint8)
_DECISION = re.compile(rb'"chunk_seq":(\d+)')


def _mask(payload: bytes) -> bytes:
    arr = np.frombuffer(payload, dtype=np.uint8)
    return (arr ^ _MASK_ARR[: arr.size]).tobytes()


def client_frame(payload: bytes, binary: bool) -> bytes:
    """A masked client websocket frame (RFC 6455) carrying ``payload``."""
    n = len(payload)
    head = bytes((0x82 if binary else 0x81,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return head + _MASK + _mask(payload)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """A voiced test signal (harmonics with a moving pitch, plus a little noise): pcm16."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * seconds)) / RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.08 + rng.normal(0, 0.003, t.size)
    return np.round(np.clip(x, -1, 1) * 32767).astype("<i2")


def build_frames(protocol: str, seed: int, count: int = 50) -> list[bytes]:
    """``count`` consecutive 20 ms frames (one second), ready to write."""
    pcm = speech_like(count * FRAME_MS / 1000, seed)
    out = []
    for i in range(count):
        raw = pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].tobytes()
        if protocol == "native":
            out.append(client_frame(b"\x01" + raw, binary=True))
        elif protocol == "pipecat":
            out.append(client_frame(raw, binary=True))
        else:
            ev = {"type": "input_audio_buffer.append", "audio": base64.b64encode(raw).decode()}
            out.append(client_frame(json.dumps(ev, separators=(",", ":")).encode(), binary=False))
    return out


def path_of(protocol: str) -> str:
    return {"native": "/v1/duplex", "realtime": "/v1/realtime?duplex=1", "pipecat": "/ws"}[protocol]


@dataclass
class Session:
    """One client connection's books."""

    index: int
    protocol: str
    frames: list[bytes]
    total_frames: int
    measure_from: int  # frame index where the measured window starts
    measure_to: int
    chunk_frames: int  # native decisions: frames per engine chunk
    transport: asyncio.Transport | None = None
    sent_at: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sent: int = 0
    out_samples: int = 0
    latencies: list[float] = field(default_factory=list)
    decision_lat: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ready: asyncio.Future[None] | None = None
    closed: bool = False


class WsClient(asyncio.Protocol):
    """The smallest websocket client that is still correct for this use: handshake, frame
    parsing (with fragmentation and control frames), pong, close."""

    def __init__(self, sess: Session, host: str, path: str, on_message: Any) -> None:
        self.sess = sess
        self.host = host
        self.path = path
        self.on_message = on_message
        self.buf = bytearray()
        self.upgraded = False
        self.frag: bytearray | None = None
        self.frag_op = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sess.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.sess.closed = True
        if self.sess.ready is not None and not self.sess.ready.done():
            self.sess.ready.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            del buf[: end + 4]
            if b" 101 " not in status + b" ":
                self.sess.errors += 1
                self.sess.error_samples.append(status.decode(errors="replace"))
                assert self.sess.transport is not None
                self.sess.transport.close()
                return
            self.upgraded = True
            if self.sess.ready is not None and not self.sess.ready.done():
                self.sess.ready.set_result(None)
        now = time.perf_counter()
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            ln = b1 & 0x7F
            hdr = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            if n - pos < hdr + ln:
                break
            payload = bytes(buf[pos + hdr : pos + hdr + ln])
            pos += hdr + ln
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op == 9:  # ping -> pong
                assert self.sess.transport is not None
                self.sess.transport.write(client_frame_op(0x8A, payload))
                continue
            if op == 8:
                self.sess.closed = True
                if len(self.sess.error_samples) < 5:  # why the server closed it
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
                    self.sess.error_samples.append(f"close {code} {payload[2:].decode(errors='replace')}")
                continue
            if op == 0:
                if self.frag is None:
                    continue
                self.frag += payload
                if fin:
                    payload, op, self.frag = bytes(self.frag), self.frag_op, None
                else:
                    continue
            elif not fin:
                self.frag, self.frag_op = bytearray(payload), op
                continue
            if op in (1, 2):
                self.on_message(self.sess, op == 2, payload, now)
        del buf[:pos]


def client_frame_op(first: int, payload: bytes) -> bytes:
    return bytes((first, 0x80 | len(payload))) + _MASK + _mask(payload)


def _b64_len(s: bytes) -> int:
    n = len(s) // 4 * 3
    if s.endswith(b"=="):
        n -= 2
    elif s.endswith(b"="):
        n -= 1
    return n


def on_message(sess: Session, binary: bool, payload: bytes, now: float) -> None:
    samples = 0
    if sess.protocol == "native":
        if binary:
            if payload[0] != 0x81:
                return
            hl = int.from_bytes(payload[1:3], "big")
            samples = (len(payload) - 3 - hl) // 2
        else:
            if payload.startswith(b'{"type":"response.speak"') or payload.startswith(b'{"type":"response.listen"'):
                m = _DECISION.search(payload)
                if m is not None:
                    k = int(m.group(1))
                    f = (k + 1) * sess.chunk_frames - 1  # the frame that completes chunk k
                    if sess.measure_from <= f < min(sess.sent, sess.measure_to):
                        sess.decision_lat.append(now - sess.sent_at[f])
                return
            _check_error(sess, payload)
            return
    elif sess.protocol == "realtime":
        if binary:
            return
        if payload.startswith(b'{"type":"response.output_audio.delta"'):
            i = payload.find(b'"delta":"')
            j = payload.find(b'"', i + 9)
            samples = _b64_len(payload[i + 9 : j]) // 2
        else:
            _check_error(sess, payload)
            return
    else:
        if not binary:
            _check_error(sess, payload)
            return
        samples = len(payload) // 2
    if samples <= 0:
        return
    sess.out_samples += samples
    last = (sess.out_samples - 1) // FRAME_SAMPLES  # the input frame holding this message's last sample
    f = (last // sess.chunk_frames + 1) * sess.chunk_frames - 1  # the frame that completes its chunk
    if sess.measure_from <= f < min(sess.sent, sess.measure_to):
        sess.latencies.append(now - sess.sent_at[f])


def _check_error(sess: Session, payload: bytes) -> None:
    if b'"type":"error"' in payload[:40]:
        sess.errors += 1
        if len(sess.error_samples) < 5:
            sess.error_samples.append(payload[:300].decode(errors="replace"))


async def _open(sess: Session, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    sess.ready = loop.create_future()
    await loop.create_connection(
        lambda: WsClient(sess, f"{host}:{port}", path_of(sess.protocol), on_message), host, port
    )
    await asyncio.wait_for(sess.ready, 30)


async def run_sessions(spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``spec['sessions']`` sessions, stream until ``spec['start_at'] + duration``,
    and return the books (latencies in ms)."""
    protocol = spec["protocol"]
    n = spec["sessions"]
    warm, measure, tail = spec["warmup_s"], spec["measure_s"], spec.get("tail_s", 1.0)
    total = int((warm + measure) * 1000 / FRAME_MS)
    chunk_frames = spec.get("engine_chunk_ms", 100) // FRAME_MS
    base = spec.get("seed", 0)
    sessions = [
        Session(
            i,
            protocol,
            build_frames(protocol, base + i % 8),
            total,
            int(warm * 1000 / FRAME_MS),
            total,
            chunk_frames,
        )
        for i in range(n)
    ]
    for s in sessions:
        s.sent_at = np.zeros(total)
    opened = 0
    for i in range(0, n, 20):  # connect in small waves: the server's accept queue stays short
        results = await asyncio.gather(
            *(_open(s, spec["host"], spec["port"]) for s in sessions[i : i + 20]),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                print(f"loadgen: a session failed to open: {r!r}", file=sys.stderr)
            else:
                opened += 1
    # Tell the driver, then wait for the common start (every generator process streams
    # from the same moment, given on stdin as a time.time() value).
    print(f"opened {opened}", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start_at = float(line) if line.strip() else time.time()
    delay = start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.perf_counter()
    period = FRAME_MS / 1000
    order = [(i * period / max(1, n), s) for i, s in enumerate(sessions)]
    lag: list[float] = []
    for k in range(total):
        cycle = t0 + k * period
        for offset, s in order:
            due = cycle + offset
            wait = due - time.perf_counter()
            if wait > 0.0005:
                await asyncio.sleep(wait)
            if s.closed or s.transport is None:
                continue
            now = time.perf_counter()
            if k % 50 == 0:
                lag.append(now - due)
            s.sent_at[k] = now
            s.transport.write(s.frames[k % len(s.frames)])
            s.sent = k + 1
    await asyncio.sleep(tail)
    expected = sum(s.sent for s in sessions) * FRAME_SAMPLES
    received = sum(s.out_samples for s in sessions)
    for s in sessions:
        if s.transport is not None and not s.closed and not s.transport.is_closing():
            s.transport.write(client_frame_op(0x88, b"\x03\xe8"))
            s.transport.close()
    lat = np.concatenate([np.asarray(s.latencies) for s in sessions]) * 1000 if sessions else np.zeros(0)
    dec = np.concatenate([np.asarray(s.decision_lat) for s in sessions]) * 1000 if sessions else np.zeros(0)
    return {
        "opened": opened,
        "latency_ms": lat.tolist(),
        "decision_ms": dec.tolist(),
        "expected_samples": expected,
        "received_samples": received,
        "errors": sum(s.errors for s in sessions),
        "error_samples": [e for s in sessions for e in s.error_samples][:5],
        "closed_early": sum(1 for s in sessions if s.closed),
        "send_lag_ms": (np.asarray(lag) * 1000).tolist(),
    }


def main() -> None:
    """``python -m tests.bench.loadgen SPEC_JSON OUT_JSON`` (what the sweep starts)."""
    spec = json.loads(sys.argv[1])
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - the server venv has it
        pass
    t_cpu = time.process_time()
    res = asyncio.run(run_sessions(spec))
    res["cpu_s"] = time.process_time() - t_cpu
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
