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


# ---------------------------------------------------------------------- value rules (issue 11, item 8)
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[logging]\nlevel = 'verbose'\n", "logging.level: 'verbose' is not one of DEBUG, INFO"),
        ("[session.vad]\nthreshold = 1.5\n", "session.vad.threshold: 1.5 is above 1"),
        ("[session.overlap]\nsilence_rms = -0.1\n", "session.overlap.silence_rms: -0.1 is below 0"),
        ("[session]\ntemperature = 3.0\n", "session.temperature: 3.0 is above 2"),
        ("[session]\noutput_modalities = ['video']\n", "'video' is not one of audio, text"),
        ("[server]\nport = 70000\n", "server.port: 70000 is above 65535"),
        ("[bus]\ndata_hwm = 0\n", "bus.data_hwm: 0 is below 1"),
        ("[bus]\nheartbeat_timeout_s = 0.05\n", "heartbeat_timeout_s must be longer"),
        ("[bus]\ncontrol = 'http://x'\ndata = 'tcp://h:1'\n", "bus.control: 'http://x' is not an ipc:// or tcp://"),
        ("[stage1]\nmax_lead_ms = -1\n", "stage1.max_lead_ms"),
        ("[engines.scripted]\nspeech_rms = 2.0\n", "engines.scripted.speech_rms"),
        ("[engines.cascade]\nvad_threshold = 1.2\n", "engines.cascade.vad_threshold"),
        ("[engines.cascade]\nasr_compute_type = 'int4'\n", "'int4' is not one of default"),
        ("[engines.cascade]\nopenai_timeout_s = 0\n", "openai_timeout_s: 0.0 is not above 0"),
        ("[supervisor]\nrestart_window_s = 0\n", "supervisor.restart_window_s"),
        ("[engine]\nname = 'cascad'\n", "did you mean 'cascade'?"),
    ],
)
def test_enums_and_ranges_are_checked_everywhere(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(_write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_logging_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load(_write(tmp_path, "[logging]\nlevel = 'debug'\n")).logging.level == "debug"


def test_every_number_and_text_key_has_a_value_rule() -> None:
    # A new key without a rule would pass any value: refuse to let one in unnoticed.
    from duplexd.runtime.config_rules import leaves, needs_rule, rule_for

    missing = [key for key, value in leaves(Config()) if needs_rule(value) and rule_for(key) is None]
    assert missing == [], f"add a rule in runtime/config_rules.py for: {missing}"
    # ...and every default passes its own rule.
    from duplexd.runtime.config_rules import check

    assert check(Config()) == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[session]\nturn_modee = 'manual'\n", "did you mean 'turn_mode'?"),
        ("[sesion]\n", "did you mean 'session'?"),
        ("[session.vad]\nthreshhold = 0.4\n", "did you mean 'threshold'?"),
        ("[engines.cascade]\npolicyy = 'echo'\n", "did you mean 'policy'?"),
        ("[server]\nzzz = 1\n", "[server] has: host, port"),
        ("[session]\nturn_mode = 'duplx'\n", "one of server_vad, manual, duplex; did you mean 'duplex'?"),
    ],
)
def test_unknown_keys_and_values_suggest_what_was_meant(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(_write(tmp_path, text))
    assert needle in str(e.value)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "duplexd.runtime.cli", *args], check=False, capture_output=True, text=True, env=env
    )


def test_version_flag() -> None:
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("duplexd 0.") and "bus protocol" in out.stdout


def test_the_cli_runs_from_a_source_tree_that_was_never_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU benchmarks run the roles from a plain checkout: no package metadata exists there.
    import importlib.metadata

    from duplexd.runtime import cli

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version_line().startswith("duplexd (not installed) (bus protocol ")
    assert cli._parser().parse_args(["check-config"]).command == "check-config"


def test_check_config_refuses_what_serve_would_crash_on(tmp_path: Path) -> None:
    bad = _cli("check-config", "--config", str(_write(tmp_path, "[logging]\nlevel = 'verbose'\n")))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "logging.level" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---------------------------------------------------------------------- one default engine (item 5)
def test_the_code_default_engine_is_the_documented_one() -> None:
    assert Config().engine.name == "cascade"
    assert load(REPO / "configs" / "default.toml").engine.name == Config().engine.name


# ---------------------------------------------------------------------- secrets (item 7)
def test_check_config_redacts_secrets(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "[server]\nhost = '0.0.0.0'\napi_keys = ['sk-live-123456']\n"
        "[engines.cascade]\npolicy = 'openai-chat'\nopenai_api_key = 'chat-secret-987'\n",
    )
    out = _cli("check-config", "--config", str(p))
    assert out.returncode == 0, out.stderr
    assert "sk-live-123456" not in out.stdout and "chat-secret-987" not in out.stdout
    assert '"api_keys": [\n      "<redacted>"\n    ]' in out.stdout and '"openai_api_key": "<redacted>"' in out.stdout


def test_secrets_split_and_merge_round_trip(tmp_path: Path) -> None:
    from duplexd.runtime import secrets

    text = "[server]\napi_keys = ['k-1234', 'k-5678']\n[engines.cascade]\nopenai_api_key = 'ck-1'\n"
    cfg = load(_write(tmp_path, text))
    public, held = secrets.split(cfg)
    assert public.server.api_keys == [] and public.engines.cascade.openai_api_key == ""
    assert b"k-1234" not in msgspec.json.encode(public)
    assert secrets.merge(public, held) == cfg
    assert secrets.scrub("key k-1234 and k-5678", secrets.values(cfg)) == "key <redacted> and <redacted>"


def test_make_run_takes_port_host_and_config() -> None:
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", "PORT=8123", "HOST=127.0.0.2", "CONFIG=my.toml"],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith("serve --config my.toml --port 8123 --host 127.0.0.2")


def test_sharded_hosts_list_their_endpoints_and_each_host_binds_its_own(tmp_path: Path) -> None:
    text = (
        "[bus]\nhosts = [{control = 'tcp://10.0.0.5:7001', data = 'tcp://10.0.0.5:7002'},"
        " {control = 'tcp://10.0.0.6:7001', data = 'tcp://10.0.0.6:7002'}]\n[host]\nshard = 1\n"
    )
    cfg = load(_write(tmp_path, text))
    assert [a.control for a in cfg.host_addresses()] == ["tcp://10.0.0.5:7001", "tcp://10.0.0.6:7001"]
    assert cfg.addresses().data == "tcp://10.0.0.6:7002"
    with pytest.raises(ConfigError, match="not an entry of bus.hosts"):
        load(_write(tmp_path, text.replace("shard = 1", "shard = 2")))
    with pytest.raises(ConfigError, match="endpoints of its own"):
        load(_write(tmp_path, text.replace("10.0.0.6:7001", "10.0.0.5:7001")))
    with pytest.raises(ConfigError, match=r"bus.hosts\[0\].data"):
        load(_write(tmp_path, text.replace("tcp://10.0.0.5:7002", "udp://x")))
    assert load(None).host_addresses() == [load(None).addresses()]


def test_run_host_shard_flag_is_checked(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "duplexd.runtime.cli", "run", "host", "--shard", "3"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "host.shard 3" in out.stderr
