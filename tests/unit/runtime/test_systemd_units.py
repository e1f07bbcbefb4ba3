"""The shipped systemd units pass ``systemd-analyze verify`` and run our roles."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import REPO

UNITS = REPO / "configs" / "systemd"
ROLES = ("host", "stage0", "stage1", "adapter")


def _unit(role: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / f"duplexd-{role}.service")
    return cp


@pytest.mark.parametrize("role", ROLES)
def test_unit_runs_the_role_with_notify_readiness(role: str) -> None:
    u = _unit(role)
    assert u["Service"]["Type"] == "notify"
    assert u["Service"]["ExecStart"].split()[1:3] == ["run", role]
    assert u["Unit"]["StartLimitBurst"] == "3" and u["Unit"]["StartLimitIntervalSec"] == "5"


def test_adapter_stops_first() -> None:
    # systemd stops units in reverse After= order: the adapter (After= everything) drains first.
    after = _unit("adapter")["Unit"]["After"].split()
    assert {"duplexd-host.service", "duplexd-stage0.service", "duplexd-stage1.service"} <= set(after)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "duplexd"
    for src in UNITS.iterdir():
        text = src.read_text().replace("/opt/duplexd/.venv/bin/duplexd", str(exe))
        (tmp_path / src.name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stderr.strip() == "" and out.stdout.strip() == "", out.stderr


@pytest.mark.parametrize("role", ROLES)
def test_unit_does_not_restart_a_role_that_cannot_start(role: str) -> None:
    from duplexd.runtime.preflight import EXIT_NO_RESTART

    assert _unit(role)["Service"]["RestartPreventExitStatus"] == str(EXIT_NO_RESTART)


def _template(role: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / f"duplexd-{role}@.service")
    return cp


@pytest.mark.parametrize(
    ("role", "instance_use"),
    [
        ("host", "--shard %i"),
        ("adapter", "--port %i"),
        ("stage0", "Environment=CUDA_VISIBLE_DEVICES=%i"),
        ("stage1", "Environment=CUDA_VISIBLE_DEVICES=%i"),
    ],
)
def test_multihost_templates_run_one_role_per_instance(role: str, instance_use: str) -> None:
    u = _template(role)
    svc = u["Service"]
    assert svc["Type"] == "notify" and svc["ExecStart"].split()[1:3] == ["run", role]
    lines = (UNITS / f"duplexd-{role}@.service").read_text().splitlines()
    assert any(instance_use in ln for ln in lines if ln.startswith(("ExecStart=", "Environment=")))
    # Roles of other machines are not pulled in; each instance has its own runtime dir.
    assert "Wants" not in u["Unit"] or u["Unit"]["Wants"] == "network-online.target"
    assert svc["RuntimeDirectory"] == "duplexd-%i"
    assert u["Install"]["WantedBy"] == "duplexd-multihost.target"


@pytest.mark.parametrize("role", ROLES)
def test_every_ordering_on_network_online_also_wants_it(role: str) -> None:
    # After= alone orders against a target nobody pulls in: it is then reached at once.
    u = _unit(role)["Unit"]
    after, wants = u.get("After", "").split(), u.get("Wants", "").split()
    assert "network-online.target" not in after or "network-online.target" in wants
    if role in ("host", "adapter"):  # they bind sockets on configured addresses
        assert "network-online.target" in after


@pytest.mark.parametrize("role", ROLES)
def test_unit_has_a_watchdog(role: str) -> None:
    # The role pings at a quarter of WATCHDOG_USEC (runtime/watchdog.py); systemd sets it from this.
    assert int(_unit(role)["Service"]["WatchdogSec"]) >= 5


def _security_offline_supported() -> bool:
    if shutil.which("systemd-analyze") is None:
        return False
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.split()[1]) >= 250  # --offline= came with 250
    except (IndexError, ValueError):
        return False


@pytest.mark.skipif(not _security_offline_supported(), reason="systemd-analyze security --offline needs systemd >= 250")
@pytest.mark.parametrize(
    "unit",
    [f"duplexd-{r}.service" for r in ROLES]  # one machine
    + ["duplexd-host@0.service", "duplexd-adapter@8000.service"]  # several machines: templates
    + ["duplexd-stage0@0.service", "duplexd-stage1@1.service"],
)
def test_unit_is_rated_ok_by_systemd_analyze_security(unit: str, tmp_path: Path) -> None:
    for src in UNITS.iterdir():
        (tmp_path / src.name).write_text(src.read_text())
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", unit],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    last = out.stdout.strip().splitlines()[-1]
    score = float(last.split(":")[1].split()[0])
    assert score <= 3.0, out.stdout[-3000:]
