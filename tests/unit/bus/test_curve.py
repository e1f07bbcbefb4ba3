"""CURVE on the bus with real tcp sockets: authorized peers talk, every other key is refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from duplexd.bus.addresses import BusAddresses
from duplexd.bus.curve import CurveConfig, CurveKeyError, keygen, secure_client, zap_handler
from duplexd.bus.messages import PROTOCOL_VERSION, Hello, Role
from duplexd.bus.sockets import CONTROL, Channel, bind_host, connect_peer
from tests.harness import free_port


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    for name in ("host", "stage0", "intruder", "other-host"):
        keygen(str(tmp_path / "keys"), name)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "stage0.key").write_bytes((tmp_path / "keys" / "stage0.key").read_bytes())
    return tmp_path


def _addrs(curve: CurveConfig) -> BusAddresses:
    return BusAddresses(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", curve=curve)


def _host_curve(d: Path) -> CurveConfig:
    return CurveConfig(True, str(d / "keys" / "host.key_secret"), "", str(d / "authorized"))


def _peer_curve(d: Path, name: str, server: str = "host") -> CurveConfig:
    return CurveConfig(True, str(d / "keys" / f"{name}.key_secret"), str(d / "keys" / f"{server}.key"))


def _hello(name: str) -> Hello:
    return Hello(Role.STAGE0, name, 1, PROTOCOL_VERSION)


def _recv(host: Channel, within_s: float) -> Hello | None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        host.poll(50)
        r = host.recv_nowait(CONTROL)
        if r is not None:
            assert isinstance(r.msg, Hello)
            return r.msg
    return None


def _monitored_client(
    ctx: zmq.Context[zmq.Socket[bytes]], addrs: BusAddresses, curve: CurveConfig
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A DEALER set up as connect_peer does, with its monitor attached before it connects
    (libzmq does not retry a connection the server refused: the first event is the one)."""
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    mon = sock.get_monitor_socket()
    secure_client(sock, curve)
    sock.connect(addrs.control)
    return sock, mon


def _wait_event(mon: zmq.Socket[bytes], events: set[int], within_s: float = 10.0) -> int:
    """The first of ``events`` the monitor reports (an explicit handshake outcome)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if mon.poll(100):
            ev = int(recv_monitor_message(mon)["event"])
            if ev in events:
                return ev
    raise AssertionError(f"none of {events} within {within_s} s")


_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}


def test_authorized_peer_talks_encrypted_and_wrong_keys_are_refused(keys: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    addrs = _addrs(_host_curve(keys))
    host = bind_host(addrs, ctx)
    try:
        zap = zap_handler(ctx)
        assert zap is not None
        # An unauthorized client key: the host's ZAP handler says no; nothing is delivered.
        _, mon = _monitored_client(ctx, addrs, _peer_curve(keys, "intruder"))
        assert _wait_event(mon, _FAILED | {zmq.EVENT_HANDSHAKE_SUCCEEDED}) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        intruder = connect_peer(msgspec_replace(addrs, _peer_curve(keys, "intruder")), "intruder", ctx)
        intruder.send(CONTROL, _hello("intruder"))
        # A client that trusts another server key: the CURVE handshake itself fails.
        misled = connect_peer(msgspec_replace(addrs, _peer_curve(keys, "stage0", server="other-host")), "misled", ctx)
        misled.send(CONTROL, _hello("misled"))
        # A plaintext client: no CURVE, no connection.
        plain = connect_peer(msgspec_replace(addrs, CurveConfig()), "plain", ctx)
        plain.send(CONTROL, _hello("plain"))
        # The authorized stage gets through, and is the only one that ever does.
        good = connect_peer(msgspec_replace(addrs, _peer_curve(keys, "stage0")), "stage0-ok", ctx)
        good.send(CONTROL, _hello("stage0-ok"))
        got = _recv(host, 10.0)
        assert got is not None and got.identity == "stage0-ok"
        assert _recv(host, 1.0) is None
        assert zap.stats.allowed >= 1 and zap.stats.refused >= 1
        assert zap.stats.last_refused_address.startswith("127.0.0.1")
    finally:
        _teardown(ctx)


def test_a_wrong_server_key_fails_the_clients_handshake(keys: Path) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    addrs = _addrs(_host_curve(keys))
    host = bind_host(addrs, ctx)
    try:
        _, mon = _monitored_client(ctx, addrs, _peer_curve(keys, "stage0", server="other-host"))
        # The host cannot decrypt the client's hello (sealed to another key) and drops it: the
        # client sees a failed handshake or a disconnect, never a completed handshake.
        outcome = _wait_event(mon, _FAILED | {zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED})
        assert outcome != zmq.EVENT_HANDSHAKE_SUCCEEDED
        misled = connect_peer(msgspec_replace(addrs, _peer_curve(keys, "stage0", server="other-host")), "m", ctx)
        misled.send(CONTROL, _hello("m"))
        assert _recv(host, 0.5) is None
    finally:
        _teardown(ctx)


def test_missing_or_public_only_keys_are_one_line_errors(keys: Path) -> None:
    with pytest.raises(CurveKeyError, match="no such certificate"):
        connect_peer(_addrs(CurveConfig(True, str(keys / "nope.key_secret"), str(keys / "keys" / "host.key"))), "x")
    public_only = CurveConfig(True, str(keys / "keys" / "stage0.key"), str(keys / "keys" / "host.key"))
    assert any("holds no secret key" in p for p in public_only.problems(binds=False))
    assert any("authorized_keys_dir is required" in p for p in public_only.problems(binds=True))
    assert CurveConfig().problems(binds=True) == []


def _teardown(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    handler = zap_handler(ctx)
    if handler is not None:
        handler.close()
    ctx.destroy(linger=0)  # every socket of the test, also after a failed assertion


def msgspec_replace(addrs: BusAddresses, curve: CurveConfig) -> BusAddresses:
    import msgspec

    return msgspec.structs.replace(addrs, curve=curve)
