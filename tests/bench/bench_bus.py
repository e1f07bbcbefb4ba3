"""One bus hop vs raw pyzmq, interleaved in the same run.

Three payloads travel through duplexd's real path (Encoder → Channel.send → socket →
Channel.poll/recv_nowait → Decoder) to an echo process that decodes, re-encodes and sends
them back: a 20 ms frame of assistant audio (``AudioOut``, pcm16 24 kHz), a 1 s float32
chunk of input audio (``AudioIn``, 16 kHz), and a 32×3584 float16 hidden-state tensor
(``Handoff``). The baseline sends the very same wire frames (pre-encoded) over raw pyzmq
ROUTER/DEALER sockets of the same transport to a second echo process that bounces them
without any codec, waiting the way our loops wait (poll, then a non-blocking recv).

Round trips alternate raw, bus, raw, bus... so both see the same machine at the same
moment (timing them at different moments once reported 4.47× on this shared machine).
One hop = round trip / 2. Both transports: ipc and tcp on 127.0.0.1.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tempfile
import time
from typing import Any

import numpy as np
import zmq

from duplexd.bus.addresses import BusAddresses, ipc_addresses
from duplexd.bus.codec import Encoder
from duplexd.bus.messages import AudioIn, AudioOut, DataMessage, Handoff
from duplexd.bus.sockets import DATA, bind_host, connect_peer
from tests.bench.table import percentiles, print_table
from tests.harness import REPO, free_port

RESULTS = REPO / "bench-results"


def payloads() -> dict[str, DataMessage]:
    pcm = (np.sin(np.arange(480) / 7.0) * 8000).astype(np.int16)
    rng = np.random.default_rng(0)
    return {
        "20 ms pcm16 (AudioOut)": AudioOut(
            "sess_bench0000000000000", 3, "resp_bench000000000000", "item_bench000000000000", 17, pcm,
            text="hello", start_ms=340,
        ),
        "1 s float32 (AudioIn)": AudioIn(
            "sess_bench0000000000000", 3, 9, rng.standard_normal(16000).astype(np.float32)
        ),
        "32x3584 float16 (Handoff)": Handoff(
            "sess_bench0000000000000", 3, "resp_bench000000000000", "item_bench000000000000", 4,
            hidden=rng.standard_normal((32, 3584)).astype(np.float16),
        ),
    }


def _echo_bus(addrs: BusAddresses) -> None:
    chan = connect_peer(addrs, "echo")
    chan.send(DATA, next(iter(payloads().values())))  # announce ourselves to the ROUTER
    while True:
        chan.poll(1000)
        r = chan.recv_nowait(DATA)
        if r is not None:
            chan.send(DATA, r.msg)


def _echo_raw(addr: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IDENTITY, b"echo")
    s.connect(addr)
    s.send(b"hi")
    while True:
        s.poll(1000)
        try:
            s.send_multipart(s.recv_multipart(zmq.NOBLOCK), copy=False)
        except zmq.Again:
            continue


def _addresses(transport: str, run_dir: str) -> tuple[BusAddresses, str]:
    if transport == "ipc":
        return ipc_addresses(run_dir), f"ipc://{run_dir}/raw.sock"
    return (
        BusAddresses(control=f"tcp://127.0.0.1:{free_port()}", data=f"tcp://127.0.0.1:{free_port()}"),
        f"tcp://127.0.0.1:{free_port()}",
    )


def measure(transport: str, iterations: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Interleaved raw/bus round trips for every payload over ``transport``."""
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dxb-") as d:
        addrs, raw_addr = _addresses(transport, d)
        host = bind_host(addrs)
        ctx = zmq.Context()
        raw = ctx.socket(zmq.ROUTER)
        raw.bind(raw_addr)
        spawn = mp.get_context("spawn")
        procs = [spawn.Process(target=_echo_bus, args=(addrs,), daemon=True),
                 spawn.Process(target=_echo_raw, args=(raw_addr,), daemon=True)]
        for p in procs:
            p.start()
        try:
            host.poll(20000)
            first = host.recv_nowait(DATA)
            assert first is not None, "the bus echo process did not connect"
            ident = first.identity
            raw_ident, _ = raw.recv_multipart()
            enc = Encoder()
            for name, msg in payloads().items():
                wire = [bytes(memoryview(f)) for f in enc.encode(msg)]
                size = sum(len(f) for f in wire)
                bus_hops: list[float] = []
                raw_hops: list[float] = []
                for i in range(iterations + warmup):
                    t0 = time.perf_counter_ns()
                    raw.send_multipart([raw_ident, *wire], copy=False)
                    while not raw.poll(1000):
                        pass
                    raw.recv_multipart(zmq.NOBLOCK, copy=False)
                    t1 = time.perf_counter_ns()
                    host.send(DATA, msg, ident)
                    while True:
                        host.poll(1000)
                        r = host.recv_nowait(DATA)
                        if r is not None:
                            break
                    t2 = time.perf_counter_ns()
                    assert type(r.msg) is type(msg)
                    if i >= warmup:
                        raw_hops.append((t1 - t0) / 2000)
                        bus_hops.append((t2 - t1) / 2000)
                out[name] = {"bytes": size, "raw_us": raw_hops, "bus_us": bus_hops}
        finally:
            for p in procs:
                p.terminate()
                p.join(5)
            host.close()
            raw.close(linger=0)
            ctx.term()
    return out


def main(quick: bool = False) -> dict[str, Any]:
    iterations, warmup = (200, 50) if quick else (5000, 500)
    rows = []
    results: dict[str, Any] = {"iterations": iterations, "points": []}
    for transport in ("ipc", "tcp"):
        for name, m in measure(transport, iterations, warmup).items():
            r50, r99 = percentiles(m["raw_us"], 50, 99)
            b50, b99 = percentiles(m["bus_us"], 50, 99)
            rows.append([f"{transport} {name}", str(m["bytes"]), f"{r50:.1f}", f"{b50:.1f}", f"{b50 / r50:.2f}",
                         f"{r99:.1f}", f"{b99:.1f}", f"{b99 / r99:.2f}"])
            results["points"].append({"transport": transport, "payload": name, "bytes": m["bytes"],
                                      "raw_p50_us": r50, "bus_p50_us": b50, "raw_p99_us": r99, "bus_p99_us": b99,
                                      "ratio_p50": b50 / r50, "ratio_p99": b99 / r99})
    print_table(
        f"Bus hop vs raw pyzmq, interleaved, {iterations} round trips each, one hop = RTT/2 (µs)",
        ["transport payload", "bytes", "raw p50", "bus p50", "ratio", "raw p99", "bus p99", "ratio"],
        rows,
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("bus-quick.json" if quick else "bus.json")).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
