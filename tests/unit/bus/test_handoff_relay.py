"""A speak's handoff arrays cross stage0 → host → stage1 without a copy: the host relays
the arrays of the Stage0Result it received (views of its frames) in a new Handoff, and
stage1 receives views of its own frames (what ``frame_backed`` checks in production)."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import zmq

from duplexd.actors.stage1 import frame_backed
from duplexd.bus.addresses import ipc_addresses
from duplexd.bus.messages import Action, Handoff, Stage0Result
from duplexd.bus.sockets import DATA, Channel, bind_host, connect_peer


def _recv(chan: Channel) -> Any:
    for _ in range(100):
        chan.poll(100)
        r = chan.recv_nowait(DATA)
        if r is not None:
            return r
    raise AssertionError("nothing received")


def test_handoff_rows_are_relayed_and_received_as_views_of_bus_frames() -> None:
    with tempfile.TemporaryDirectory(prefix="dxh-") as d:
        ctx = zmq.Context()
        addrs = ipc_addresses(d)
        host = bind_host(addrs, ctx)
        stage0 = connect_peer(addrs, "stage0-t", ctx)
        stage1 = connect_peer(addrs, "stage1-t", ctx)
        try:
            hidden = np.random.default_rng(0).integers(-(2**15), 2**15, (120, 3584), dtype=np.int16)  # bf16 bits
            tokens = np.arange(480, dtype=np.int32).reshape(120, 4)
            for peer in (stage0, stage1):  # the host learns the peers' routes from what they send
                peer.send(DATA, Stage0Result("s", 0, 0, Action.LISTEN))
            got = {_recv(host).identity for _ in range(2)}
            assert got == {b"stage0-t", b"stage1-t"}
            stage0.send(DATA, Stage0Result("s", 0, 1, Action.SPEAK, text="hi", tokens=tokens, hidden=hidden))
            r = _recv(host)
            res = r.msg
            assert frame_backed(res.hidden)
            assert np.shares_memory(res.hidden, np.frombuffer(r.frames[-1].buffer, np.uint8))
            # The session actor builds the Handoff from the result's arrays; the encoder frames them as they are.
            handoff = Handoff("s", 0, "resp", "item", 0, text=res.text, tokens=res.tokens, hidden=res.hidden)
            frames = host.encode(handoff)
            assert any(np.shares_memory(np.frombuffer(f, np.uint8), res.hidden) for f in frames[1:])
            host.send_frames(DATA, frames, b"stage1-t")
            out = _recv(stage1).msg
            assert isinstance(out, Handoff)
            assert np.array_equal(out.hidden, hidden) and np.array_equal(out.tokens, tokens)
            assert frame_backed(out.hidden) and not out.hidden.flags.owndata
            assert not frame_backed(out.hidden.copy())
        finally:
            for c in (stage0, stage1, host):
                c.close(0)
            ctx.term()
