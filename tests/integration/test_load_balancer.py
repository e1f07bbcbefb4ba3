"""The shipped HAProxy config in front of two adapters: websockets pass through, new
connections spread over the adapters, a turn completes through the balancer."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from tests.cluster import Cluster
from tests.harness import REPO, NativeClient, free_port, tone

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"),
]


class _Front:
    def __init__(self, port: int) -> None:
        self.port = port

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def balanced() -> Iterator[tuple[Cluster, _Front, dict[str, int]]]:
    c = Cluster(sections={"host": {"vad": "energy"}, "engines.scripted": {"reply_ms": 400}})
    proc: subprocess.Popen[bytes] | None = None
    try:
        c.start("host", "host")
        c.start("stage0", "stage0")
        c.start("stage1", "stage1")
        ports = {"adapter-a": free_port(), "adapter-b": free_port()}
        for name, port in ports.items():
            c.start("adapter", name, {"server": {"port": port}})
            c.wait_health(lambda code, body: code == 200, port=port)
        lb = free_port()
        text = (REPO / "configs" / "haproxy" / "duplexd.cfg").read_text()
        text = text.replace("bind 0.0.0.0:8080", f"bind 127.0.0.1:{lb}")
        text = text.replace("10.0.0.5:8000", f"127.0.0.1:{ports['adapter-a']}")
        text = text.replace("10.0.0.6:8000", f"127.0.0.1:{ports['adapter-b']}")
        assert f"127.0.0.1:{ports['adapter-b']}" in text
        cfg = c.dir / "haproxy.cfg"
        cfg.write_text(text)
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        log = (c.dir / "haproxy.log").open("wb")
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        # Through the balancer, /health is an adapter's answer.
        try:
            c.wait_health(lambda code, body: code == 200, port=lb)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(c.dir / 'haproxy.log').read_text(errors='replace')}") from None
        yield c, _Front(lb), ports
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        c.stop()


async def _turn(client: NativeClient) -> str:
    await client.send({"type": "session.update", "session": {"turn_mode": "manual"}})
    await client.wait_for("session.updated")
    await client.stream(tone(300))
    await client.send({"type": "input_audio_buffer.commit"})
    await client.send({"type": "response.create"})
    done = await client.wait_for("response.done", within_s=30)
    assert done["response"]["status"] == "completed"
    assert any(f.header["response_id"] == done["response"]["id"] for f in client.audio)
    return str(client.of("session.created")[0]["session"]["id"])


async def test_websockets_spread_over_adapters_through_haproxy(
    balanced: tuple[Cluster, _Front, dict[str, int]],
) -> None:
    c, front, ports = balanced
    # Both open at once: least-connections sends the second where the first is not.
    first = await NativeClient.connect(front)  # type: ignore[arg-type]
    second = await NativeClient.connect(front)  # type: ignore[arg-type]
    await _turn(first)
    await _turn(second)
    # Asked of each adapter directly: one of the two websockets is open on each.
    assert {name: _open_websockets(port) for name, port in ports.items()} == {"adapter-a": 1, "adapter-b": 1}
    await first.close()
    await second.close()


def _open_websockets(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(r'^duplexd_ws_connections\{[^}]*endpoint="([^"]+)"[^}]*\} ([0-9.]+)$', text, re.M)
    return int(sum(float(v) for _, v in found))
