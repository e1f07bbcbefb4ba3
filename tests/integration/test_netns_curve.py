"""Roles in separate network namespaces over tcp with CURVE: a full turn crosses a veth,
and a stage with an unauthorized key is refused at the ZeroMQ handshake."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from duplexd.bus.curve import keygen
from tests.cluster import Cluster, NetnsPair, netns_unavailable
from tests.harness import NativeClient, free_port, tone

pytestmark = pytest.mark.timeout(120)

_WHY = netns_unavailable()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("curve")
    for name in ("host", "stage0", "stage1", "adapter", "intruder"):
        keygen(str(d / "keys"), name)
    (d / "authorized").mkdir()
    for name in ("stage0", "stage1", "adapter"):
        (d / "authorized" / f"{name}.key").write_bytes((d / "keys" / f"{name}.key").read_bytes())
    return d


def _peer(keys: Path, name: str) -> dict[str, Any]:
    return {
        "enabled": True,
        "secret_key_file": str(keys / "keys" / f"{name}.key_secret"),
        "server_key_file": str(keys / "keys" / "host.key"),
    }


@pytest.fixture(scope="module")
def split_cluster(keys: Path) -> Iterator[tuple[Cluster, NetnsPair]]:
    if _WHY is not None:
        pytest.skip(_WHY)
    with NetnsPair() as ns:
        ctl, data = free_port(), free_port()
        bus = {
            "control": f"tcp://{ns.inner_ip}:{ctl}",
            "data": f"tcp://{ns.inner_ip}:{data}",
            "handshake_timeout_s": 20.0,
        }
        c = Cluster(sections={"bus": bus, "host": {"vad": "energy"}, "engines.scripted": {"reply_ms": 800}})
        try:
            host_curve = {
                "enabled": True,
                "secret_key_file": str(keys / "keys" / "host.key_secret"),
                "authorized_keys_dir": str(keys / "authorized"),
            }
            # The host alone in the namespace; every other role reaches it over the veth.
            c.start("host", "host", {"bus.curve": host_curve}, netns=ns.name)
            for role in ("stage0", "stage1", "adapter"):
                c.start(role, role, {"bus.curve": _peer(keys, role)})
            c.wait_health(lambda code, body: code == 200)
            yield c, ns
        except BaseException:
            print(c.logs())
            raise
        finally:
            c.stop()


async def test_a_turn_crosses_the_namespace_encrypted(split_cluster: tuple[Cluster, NetnsPair]) -> None:
    c, ns = split_cluster
    before = ns.rx_bytes()
    client = await _connect(c)
    await client.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await client.wait_for("session.updated")
    await client.stream(tone(500))
    await client.send({"type": "input_audio_buffer.commit"})
    await client.send({"type": "response.create"})
    try:
        done = await client.wait_for("response.done", within_s=30)
    except ConnectionError:
        print(client.of("error"), c.logs())
        raise
    assert done["response"]["status"] == "completed"
    audio = [f for f in client.audio if f.header["response_id"] == done["response"]["id"]]
    assert sum(len(f.pcm) for f in audio) == 24000 * 800 // 1000
    await client.close()
    # The input audio (500 ms of pcm16 at 16 kHz is 16 kB) went through the veth to the host.
    assert ns.rx_bytes() - before > 16_000


def test_a_stage_with_an_unauthorized_key_is_refused(split_cluster: tuple[Cluster, NetnsPair], keys: Path) -> None:
    c, _ = split_cluster
    bad = c.start(
        "stage0",
        "stage0-intruder",
        {"bus.curve": _peer(keys, "intruder"), "bus": {"handshake_timeout_s": 3.0}},
        wait=False,
    )
    # Its handshake never completes: the worker gives up with "handshake failed" (exit 3).
    assert bad.proc.wait(timeout=60) == 3, bad.logs()[-3000:]
    assert "handshake failed" in bad.logs()
    assert "bus peer refused" in c.roles["host"].logs()
    # The cluster never saw it: one stage0, still serving.
    code, body = c.health()
    assert code == 200, (body, c.logs())
    assert sum(1 for r in body["roles"] if r["role"] == "stage0") == 1
    asyncio.run(_one_turn(c))


async def _one_turn(c: Cluster) -> None:
    client = await _connect(c)
    await client.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await client.wait_for("session.updated")
    await client.stream(tone(300))
    await client.send({"type": "input_audio_buffer.commit"})
    await client.send({"type": "response.create"})
    done = await client.wait_for("response.done", within_s=30)
    assert done["response"]["status"] == "completed"
    await client.close()


async def _connect(c: Cluster) -> NativeClient:
    try:
        return await NativeClient.connect(c)  # type: ignore[arg-type]
    except ConnectionError:
        print(c.logs())
        raise
