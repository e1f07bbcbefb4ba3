"""Config decoding: defaults, the documented default.toml, clear errors, bind safety."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from duplexd.runtime.config import Config, ConfigError, load, with_overrides
from tests.harness import REPO


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_default_toml_documents_exactly_the_defaults() -> None:
    cfg = load(REPO / "configs" / "default.toml")
    defaults = Config()
    text = (REPO / "configs" / "default.toml").read_text()

    def documented(struct: msgspec.Struct, path: str) -> None:
        plain = [k for k in struct.__struct_fields__ if not isinstance(getattr(struct, k), msgspec.Struct)]
        if plain:
            assert f"[{path}]" in text, path
            section = text.split(f"[{path}]", 1)[1].split("\n[", 1)[0]
            for key in plain:
                assert f"\n{key} = " in section, f"{path}.{key}"
        for k in struct.__struct_fields__:
            if isinstance(getattr(struct, k), msgspec.Struct):
                documented(getattr(struct, k), f"{path}.{k}")

    # Every section and key of the config struct appears in default.toml...
    for name in defaults.__struct_fields__:
        documented(getattr(defaults, name), name)
    # ...and the file's values are the built-in defaults, except the engine it selects.
    assert msgspec.structs.replace(cfg, engine=defaults.engine) == defaults


def test_unknown_key_is_an_error_naming_file_and_path(tmp_path: Path) -> None:
    p = _write(tmp_path, "[session]\nturn_mode = 'manual'\nturn_modee = 1\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert str(p) in str(e.value) and "turn_modee" in str(e.value) and "$.session" in str(e.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[session]\nturn_mode = 'sometimes'\n", "turn_mode"),
        ("[server]\nport = 'eighty'\n", "port"),
        ("[engine]\nname = 'nope'\n", "unknown engine 'nope'"),
        ("[host]\nvad = 'webrtc'\n", "host.vad"),
        ("[bus]\ncontrol = 'tcp://127.0.0.1:7001'\n", "set together"),
        ("[server\n", "Expected ']'"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(_write(tmp_path, text))
    assert needle in str(e.value)


def test_non_loopback_bind_needs_keys_or_explicit_consent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no API keys"):
        load(_write(tmp_path, "[server]\nhost = '0.0.0.0'\n"))
    assert load(_write(tmp_path, "[server]\nhost = '0.0.0.0'\napi_keys = ['k']\n")).server.host == "0.0.0.0"
    keys = tmp_path / "keys"
    keys.write_text("# comment\nsecret\n")
    assert load(_write(tmp_path, f"[server]\nhost = '0.0.0.0'\napi_key_file = '{keys}'\n"))
    assert load(_write(tmp_path, "[server]\nhost = '::'\nallow_insecure_bind = true\n"))
    with pytest.raises(ConfigError):
        with_overrides(load(None), host="10.1.2.3")


def test_addresses_default_to_ipc_under_run_dir(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, f"[bus]\nrun_dir = '{tmp_path}'\n"))
    assert cfg.addresses().control == f"ipc://{tmp_path}/control.sock"
    tcp = load(_write(tmp_path, "[bus]\ncontrol = 'tcp://10.0.0.5:7001'\ndata = 'tcp://10.0.0.5:7002'\n"))
    assert tcp.addresses().data == "tcp://10.0.0.5:7002"


def test_cli_check_config_exit_codes(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "duplexd.runtime.cli",
            "check-config",
            "--config",
            str(REPO / "configs" / "default.toml"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and '"turn_mode": "server_vad"' in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "duplexd.runtime.cli", "check-config", "--config", str(_write(tmp_path, "[nope]\n"))],
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "config error" in bad.stderr
