"""Start-up as a new user meets it: a second server, secrets, a missing engine extra.

Real servers (supervisor + four role processes) on free ports. A second ``duplexd serve``
on a busy port must fail in one line and leave the first one serving; the run dir is
private to one instance, locked, and gone after exit; API keys never reach a file, a
log line or ``/health``; a missing engine extra is one line naming it, not a restart loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import REPO, NativeClient, ServerProcess, free_port, tone, write_config

pytestmark = pytest.mark.timeout(180)


def _serve(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "duplexd.runtime.cli", "serve", "--config", str(config), *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def _scripted_config(path: Path, port: int, **sections: dict[str, object]) -> Path:
    write_config(
        path,
        {"server": {"port": port}, "engine": {"name": "scripted"}, "host": {"vad": "energy"}, **sections},
    )
    return path


async def _one_turn(server: ServerProcess) -> str:
    c = await NativeClient.connect(server)
    try:
        await c.send({"type": "session.update", "session": {"turn_mode": "manual"}})
        await c.wait_for("session.updated")
        await c.append_b64(tone(300))
        await c.send({"type": "input_audio_buffer.commit"})
        await c.send({"type": "response.create"})
        done = await c.wait_for("response.done", within_s=20)
        return str(done["response"]["status"])
    finally:
        await c.close()


def _run_dirs(base: Path, port: int) -> list[Path]:
    return sorted(base.glob(f"duplexd-{port}-*"))


async def test_a_second_server_on_a_busy_port_fails_in_one_line_and_the_first_keeps_serving(tmp_path: Path) -> None:
    with ServerProcess(sections={"host": {"vad": "energy"}}) as first:
        pids_before = {r["role"]: r["pid"] for r in first.health()[1]["roles"]}
        # The second one uses the default (private) run dir: the first one's explicit run
        # dir and its sockets are none of its business either way.
        runtime = tmp_path / "xdg"
        runtime.mkdir(mode=0o700)
        env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
        second = _serve(_scripted_config(tmp_path / "second.toml", first.port), env=env)
        assert second.returncode != 0
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert f"port {first.port}" in lines[0] and "already in use" in lines[0]
        assert "Traceback" not in second.stderr and second.stdout == ""
        assert _run_dirs(runtime, first.port) == []  # nothing of it is left behind
        # The first server is untouched: healthy, same processes, sessions still work.
        code, body = first.health()
        assert code == 200 and body["status"] == "ok"
        assert {r["role"]: r["pid"] for r in body["roles"]} == pids_before
        assert await _one_turn(first) == "completed"
        assert "role died" not in first.logs()


async def test_a_second_server_on_the_same_run_dir_is_refused_by_its_lock(tmp_path: Path) -> None:
    with ServerProcess(sections={"host": {"vad": "energy"}}) as first:
        assert first.tmp is not None
        run_dir = Path(first.tmp.name) / "run"
        config_before = (run_dir / "effective-config.json").read_bytes()
        cfg = _scripted_config(tmp_path / "second.toml", free_port(), bus={"run_dir": str(run_dir)})
        second = _serve(cfg)
        assert second.returncode != 0
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "is in use by another duplexd" in lines[0], second.stderr
        assert (run_dir / "effective-config.json").read_bytes() == config_before
        assert (run_dir / "control.sock").exists()
        assert first.health()[0] == 200
        assert await _one_turn(first) == "completed"


def test_the_default_run_dir_is_private_and_removed_on_exit(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="dx-", dir="/tmp"))  # short: socket paths must fit
    port = free_port()
    cfg = _scripted_config(
        tmp_path / "c.toml",
        port,
        server={"port": port, "api_keys": ["sk-test-7d1f0c2b9e"]},
        **{"engines.cascade": {"openai_api_key": "chat-key-55aa11"}},
    )
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "duplexd.runtime.cli", "serve", "--config", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime), DUPLEXD_CHAT_API_KEY="env-chat-key-0f0f"),
    )
    try:
        body = _wait_health(port, proc, tmp_path / "server.log")
        (run_dir,) = _run_dirs(runtime, port)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        config_file = run_dir / "effective-config.json"
        assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
        on_disk = b"".join(p.read_bytes() for p in run_dir.iterdir() if p.is_file())
        assert b"sk-test-7d1f0c2b9e" not in on_disk and b"chat-key-55aa11" not in on_disk
        assert json.loads(config_file.read_bytes())["bus"]["run_dir"] == str(run_dir)
        assert "sk-test" not in json.dumps(body)
        # The children still got the key: the server wants it.
        assert _http_status(port, "/metrics") == 401
        assert _http_status(port, "/metrics", "sk-test-7d1f0c2b9e") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
    assert _run_dirs(runtime, port) == []
    runtime.rmdir()
    text = (tmp_path / "server.log").read_text()
    assert "sk-test-7d1f0c2b9e" not in text and "chat-key-55aa11" not in text and "env-chat-key-0f0f" not in text
    assert "started role" in text  # (the log was captured: the keys are absent from real lines)


def test_a_taken_port_stops_the_adapter_role_without_restarts(tmp_path: Path) -> None:
    # The race the supervisor's port check cannot close (or a role run alone, under
    # systemd): the adapter says why in one line and exits with the no-restart code.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        cfg = _scripted_config(tmp_path / "c.toml", port, bus={"run_dir": str(tmp_path / "run")})
        out = subprocess.run(
            [sys.executable, "-m", "duplexd.runtime.cli", "run", "adapter", "--config", str(cfg)]
            + ["--log-format", "text"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert out.returncode == 78, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERRO " in line or "Traceback" in line]
    assert len(errors) == 1 and "adapter cannot start" in errors[0] and str(port) in errors[0], out.stderr


HIDE = """
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"faster_whisper", "piper"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Hide())
"""


def test_a_missing_engine_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    # faster-whisper and piper hidden, as on a machine without the cascade extra.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HIDE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    port = free_port()
    write_config(tmp_path / "c.toml", {"server": {"port": port}})  # no engine: the default, cascade
    t0 = time.monotonic()
    out = _serve(tmp_path / "c.toml", env=env)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "'cascade' extra" in lines[0] and "faster_whisper" in lines[0] and "piper" in lines[0]
    assert "pip install 'duplexd[cascade]'" in lines[0] and "--engine scripted" in lines[0]
    assert time.monotonic() - t0 < 30  # refused up front, no model loading, no restarts


def _wait_health(port: int, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(log.read_text()[-3000:])


def _http_status(port: int, path: str, key: str = "") -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_scripted_engine_says_what_it_is() -> None:
    # Every engine tells clients how it answers (the demo page shows it).
    with ServerProcess(sections={"host": {"vad": "energy"}}) as server:
        code, body = server.health()
        assert code == 200 and body["engine"]["notice"].startswith("scripted test engine")
        c = await NativeClient.connect(server)
        created = c.of("session.created")[0]
        assert created["engine"]["notice"] == body["engine"]["notice"]
        await c.close()


def test_a_run_dir_whose_socket_paths_do_not_fit_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    cfg = _scripted_config(tmp_path / "c.toml", free_port(), bus={"run_dir": str(deep)})
    out = _serve(cfg)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1 and "ipc path too long" in lines[0], out.stderr
    assert not (deep / "effective-config.json").exists()
