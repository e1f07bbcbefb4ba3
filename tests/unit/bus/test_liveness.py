"""The sans-IO peer-liveness rules (bus/liveness.py) the host, the stage workers and the
adapter link all drive; time is passed in, so every deadline is exact."""

from __future__ import annotations

import pytest

from duplexd.bus.liveness import (
    Handshake,
    HandshakeError,
    HelloVerdict,
    HostWatch,
    PeerBook,
    version_refusal,
)
from duplexd.bus.messages import (
    PROTOCOL_VERSION,
    ClusterStatus,
    EpochAdvance,
    Goodbye,
    Heartbeat,
    Hello,
    HelloRequired,
    Ready,
    Refused,
    Role,
)


def test_version_refusal_names_both_versions() -> None:
    assert version_refusal(PROTOCOL_VERSION) is None
    reason = version_refusal(PROTOCOL_VERSION + 1)
    assert reason is not None and str(PROTOCOL_VERSION + 1) in reason and str(PROTOCOL_VERSION) in reason


def test_handshake_retries_hello_until_ready_or_deadline() -> None:
    hs = Handshake(now=100.0, timeout_s=3.0, retry_s=1.0)
    assert hs.hello_due(100.0) and not hs.hello_due(100.5)
    assert hs.wait_s(100.5) == pytest.approx(0.5)
    assert hs.hello_due(101.0)
    assert hs.on_control(Heartbeat(1, "host")) is None  # anything before Ready is ignored
    ready = Ready(PROTOCOL_VERSION, "inst1")
    assert hs.on_control(ready) is ready
    with pytest.raises(HandshakeError, match="within 3.0s"):
        hs.hello_due(103.0)


@pytest.mark.parametrize(
    "answer", [Refused("protocol version 9 unsupported", protocol_version=9), Ready(PROTOCOL_VERSION + 1, "x")]
)
def test_handshake_refusal_and_mismatch_are_errors(answer: Refused | Ready) -> None:
    with pytest.raises(HandshakeError, match="protocol"):
        Handshake(0.0, 5.0).on_control(answer)


def test_host_watch_detects_restart_departure_and_silence() -> None:
    w = HostWatch(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0, metrics_interval_s=2.0)
    w.connected(Ready(PROTOCOL_VERSION, "inst1"), now=10.0)
    assert w.on_control(Heartbeat(1, "host", host_instance="inst1"), 10.2) is None
    assert w.on_control(EpochAdvance("s", 1), 11.0) is None  # any message shows it alive
    assert w.silent(12.9) is None and w.silent(13.1) is not None
    assert w.on_control(ClusterStatus("inst2", (), 0), 13.2) == "the session host restarted"
    assert w.on_control(Heartbeat(2, "host", host_instance="inst2"), 13.3) == "the session host restarted"
    assert w.on_control(HelloRequired("inst2"), 13.4) == "the session host restarted"
    assert w.on_control(Goodbye("host", reason="shutdown"), 13.5) == "the session host left: shutdown"


def test_heartbeats_are_due_every_interval_with_metrics_less_often() -> None:
    w = HostWatch(heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0, metrics_interval_s=2.0)
    beats = [(t / 10, w.heartbeat_due(t / 10)) for t in range(0, 41)]
    sent = [(t, b) for t, b in beats if b is not None]
    assert [t for t, _ in sent] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert [b.seq for _, b in sent] == list(range(1, 10))
    assert [t for t, b in sent if b.with_metrics] == [0.0, 2.0, 4.0]
    assert w.wait_s(4.1) == pytest.approx(0.4)


def _hello(pid: int = 42, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(Role.STAGE0, "stage0-a", pid, version, hostname="here")


def test_peer_book_handshake_on_both_planes_then_retries() -> None:
    book = PeerBook(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0)
    ident = b"stage0-a"
    assert book.hello(ident, _hello(), "control", 1.0).verdict == HelloVerdict.WAITING
    out = book.hello(ident, _hello(), "data", 1.1)
    assert out.verdict == HelloVerdict.READY and out.peer is not None and out.peer.ready
    assert book.hello(ident, _hello(), "control", 1.2).verdict == HelloVerdict.READY_AGAIN
    assert book.hello(ident, _hello(), "data", 1.2).verdict == HelloVerdict.ALREADY
    # The same identity from a new process replaces the old record and starts over.
    again = book.hello(ident, _hello(pid=43), "control", 2.0)
    assert again.verdict == HelloVerdict.WAITING and again.replaced is out.peer and again.peer is not out.peer
    refused = book.hello(b"old", _hello(version=PROTOCOL_VERSION + 5), "control", 2.0)
    assert refused.verdict == HelloVerdict.REFUSED and refused.peer is None and "unsupported" in refused.reason
    assert b"old" not in book.peers


def test_peer_book_declares_exited_and_silent_peers_dead() -> None:
    book = PeerBook(heartbeat_interval_s=0.5, heartbeat_timeout_s=2.0)
    for ident, pid, host in ((b"a", 1, "here"), (b"b", 2, "here"), (b"c", 3, "elsewhere")):
        h = Hello(Role.STAGE1, ident.decode(), pid, PROTOCOL_VERSION, hostname=host)
        book.hello(ident, h, "control", 0.0)
        book.hello(ident, h, "data", 0.0)
    book.hello(b"d", Hello(Role.STAGE1, "d", 4, PROTOCOL_VERSION, hostname="elsewhere"), "control", 0.0)
    exited = {2}
    assert book.seen(b"c", 1.5) is not None and book.seen(b"zzz", 1.5) is None
    dead = {(p.identity, why) for p, why in book.dead(2.5, "here", exited.__contains__)}
    # a: silent too long; b: its process exited; c: heard at 1.5; d: never ready, never timed out
    assert dead == {(b"a", "heartbeat timeout"), (b"b", "process exited")}
    assert book.heartbeat_due(0.0) is not None and book.heartbeat_due(0.2) is None
