"""One bus hop vs raw pyzmq.

A 20 ms frame of assistant audio (pcm16 at 24 kHz: 960 bytes) travels as an ``AudioOut``
through duplexd's real path (Encoder → Channel.send → ipc → Channel.poll/recv → Decoder)
to an echo process that decodes it, re-encodes it and sends it back. The baseline
sends the same number of raw bytes over the same socket types and transport and echoes
them without any codec. One hop = round trip / 2.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time

import numpy as np
import zmq

from duplexd.bus.addresses import ipc_addresses
from duplexd.bus.messages import AudioOut
from duplexd.bus.sockets import DATA, bind_host, connect_peer
from tests.bench.table import percentiles, print_table

WARMUP = 2000
ITERATIONS = 20000


def _frame() -> AudioOut:
    pcm = (np.sin(np.arange(480) / 7.0) * 8000).astype(np.int16)  # 20 ms at 24 kHz
    return AudioOut("sess_bench0000000000000", 3, "resp_bench000000000000", "item_bench000000000000", 17, pcm,
                    text="hello", start_ms=340)


def _echo_bus(run_dir: str, n: int) -> None:
    chan = connect_peer(ipc_addresses(run_dir), "echo")
    chan.send(DATA, _frame())  # announce ourselves to the ROUTER
    for _ in range(n):
        while True:
            chan.poll(1000)
            r = chan.recv_nowait(DATA)
            if r is not None:
                break
        chan.send(DATA, r.msg)
    chan.close()


def _echo_raw(addr: str, n: int, poll: bool) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"echo")
    s.connect(addr)
    s.send(b"hi")
    for _ in range(n):
        if poll:
            s.poll(1000)
            s.send(s.recv(zmq.NOBLOCK))
        else:
            s.send(s.recv())
    s.close(linger=100)
    ctx.term()


def bench_bus(n: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="dxb-") as d:
        addrs = ipc_addresses(d)
        host = bind_host(addrs)
        p = mp.get_context("spawn").Process(target=_echo_bus, args=(d, n + WARMUP))
        p.start()
        host.poll(10000)
        first = host.recv_nowait(DATA)
        assert first is not None
        ident = first.identity
        msg = _frame()
        hops: list[float] = []
        for i in range(n + WARMUP):
            t0 = time.perf_counter_ns()
            host.send(DATA, msg, ident)
            while True:
                host.poll(1000)
                r = host.recv_nowait(DATA)
                if r is not None:
                    break
            dt = time.perf_counter_ns() - t0
            assert r.msg.pcm.shape == (480,)
            if i >= WARMUP:
                hops.append(dt / 2 / 1000)
        p.join()
        host.close()
        return hops


def bench_raw(n: int, size: int, poll: bool = False) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="dxr-") as d:
        addr = f"ipc://{d}/raw.sock"
        ctx = zmq.Context()
        s = ctx.socket(zmq.ROUTER)
        s.bind(addr)
        p = mp.get_context("spawn").Process(target=_echo_raw, args=(addr, n + WARMUP, poll))
        p.start()
        ident, _ = s.recv_multipart()
        payload = bytes(size)
        hops: list[float] = []
        for i in range(n + WARMUP):
            t0 = time.perf_counter_ns()
            s.send_multipart([ident, payload])
            if poll:
                s.poll(1000)
                s.recv_multipart(zmq.NOBLOCK)
            else:
                s.recv_multipart()
            dt = time.perf_counter_ns() - t0
            if i >= WARMUP:
                hops.append(dt / 2 / 1000)
        p.join()
        s.close()
        ctx.term()
        return hops


def main() -> None:
    from duplexd.bus.codec import Encoder

    size = sum(len(memoryview(f)) for f in Encoder().encode(_frame()))
    raw = bench_raw(ITERATIONS, size)
    raw_poll = bench_raw(ITERATIONS, size, poll=True)
    bus = bench_bus(ITERATIONS)
    r50, r99 = percentiles(raw, 50, 99)
    p50, p99 = percentiles(raw_poll, 50, 99)
    b50, b99 = percentiles(bus, 50, 99)
    print_table(
        f"Bus hop: 20 ms pcm16 frame ({size} bytes on the wire), ipc, {ITERATIONS} round trips, one hop = RTT/2",
        ["path", "p50 µs", "p99 µs"],
        [
            ["raw pyzmq bytes, blocking recv", f"{r50:.1f}", f"{r99:.1f}"],
            ["raw pyzmq bytes, poll + recv (how our loops wait)", f"{p50:.1f}", f"{p99:.1f}"],
            ["duplexd bus (AudioOut encode+send+poll+recv+decode)", f"{b50:.1f}", f"{b99:.1f}"],
            ["ratio bus / raw blocking (target ≤ 1.2)", f"{b50 / r50:.2f}", f"{b99 / r99:.2f}"],
            ["ratio bus / raw poll", f"{b50 / p50:.2f}", f"{b99 / p99:.2f}"],
        ],
    )


if __name__ == "__main__":
    main()
