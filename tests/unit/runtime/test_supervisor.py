"""Supervisor restart decisions, without starting processes."""

from __future__ import annotations

import subprocess
import sys

from duplexd.runtime.config import Config
from duplexd.runtime.preflight import EXIT_NO_RESTART
from duplexd.runtime.supervisor import Child, Supervisor


def _exited(code: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    proc.wait()
    return proc


def test_a_role_that_cannot_start_is_not_restarted() -> None:
    sup = Supervisor(Config())
    child = Child("adapter", _exited(EXIT_NO_RESTART))
    spawned: list[str] = []
    sup._spawn = lambda c, *a: spawned.append(c.role)  # type: ignore[method-assign]
    assert sup._on_exit(child, None, "") is False  # type: ignore[arg-type]
    assert spawned == []


def test_a_role_that_crashed_is_restarted() -> None:
    sup = Supervisor(Config())
    child = Child("adapter", _exited(1))
    spawned: list[str] = []
    sup._spawn = lambda c, *a: spawned.append(c.role)  # type: ignore[method-assign]
    assert sup._on_exit(child, None, "") is True  # type: ignore[arg-type]
    assert spawned == ["adapter"]
