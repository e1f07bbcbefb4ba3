"""Configuration: TOML (or JSON) decoded into typed msgspec Structs.

Unknown keys and bad values are errors that name the file and the key path (with a
"did you mean" for typos); every key's value rule is in :mod:`config_rules`.
``configs/default.toml`` documents every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from duplexd.actors.engines.registry import EngineOptions, engine_names
from duplexd.adapters.server import ServerSettings, check_bind
from duplexd.bus.addresses import BusAddresses, default_run_dir, ipc_addresses
from duplexd.bus.curve import CurveConfig
from duplexd.bus.messages import SessionConfig
from duplexd.runtime import config_rules

_STRICT = {"frozen": True, "forbid_unknown_fields": True}


class HostEndpoints(msgspec.Struct, **_STRICT):
    """One session host of ``[bus] hosts``: its two ROUTER endpoints."""

    control: str
    data: str


class BusConfig(msgspec.Struct, **_STRICT):
    """``[bus]``: where the session host listens and how peers keep in touch."""

    run_dir: str = ""  # ipc sockets, config, lock; "" = serve makes a private one per instance
    control: str = ""  # explicit endpoints (e.g. tcp://10.0.0.5:7001) override run_dir
    data: str = ""
    # Sharded session hosts: every process lists all of them, in the same order; a host binds
    # entry [host] shard and the stages of that shard serve it; adapters reach every host and
    # send each session to its owner by id (bus/shards.py).
    hosts: tuple[HostEndpoints, ...] = ()
    data_hwm: int = 2000
    handshake_timeout_s: float = 30.0
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 0.75  # a peer silent this long is dead (beats come from a thread)
    curve: CurveConfig = CurveConfig()  # [bus.curve]: encryption + authentication of the links


class HostConfig(msgspec.Struct, **_STRICT):
    """``[host]``: session host knobs that are not per-session protocol settings."""

    vad: str = "silero"  # silero | energy
    max_input_buffer_ms: int = 15 * 60 * 1000
    continuation_pace: float = 1.0
    shard: int = 0  # the entry of [bus] hosts a host binds and a stage serves (run ROLE --shard N)
    max_sessions: int = 0  # admission: sessions this node holds (0: no node limit; stage limits still apply)
    backlog_audio_ms: int = 3000  # a session's audio waiting for a full adapter queue before its response fails
    backlog_events: int = 2000  # ... or its events, before the session (with no response) is closed


class Stage0Config(msgspec.Struct, **_STRICT):
    max_batch: int = 64
    max_sessions: int = 0  # admission: sessions one stage0 process takes (0: its engine's slots, else none)


class Stage1Config(msgspec.Struct, **_STRICT):
    max_batch: int = 64
    max_lead_ms: int = 1500  # generate at most this far ahead of real time (0: unbounded)
    max_sessions: int = 0  # admission: sessions one stage1 process takes (0: no limit)


class EngineConfig(msgspec.Struct, **_STRICT):
    name: str = "cascade"  # the CPU speech engine; "scripted" is the tone engine for tests


class SupervisorConfig(msgspec.Struct, **_STRICT):
    restart_max: int = 3  # restarts of one role allowed within restart_window_s...
    restart_window_s: float = 5.0  # ...before the supervisor gives up loudly
    start_timeout_s: float = 300.0  # model loading included
    stop_timeout_s: float = 15.0
    watchdog_s: float = 15.0  # a ready role whose main loop sends no WATCHDOG=1 this long is killed, restarted


class LoggingConfig(msgspec.Struct, **_STRICT):
    level: str = "INFO"
    format: str = "json"  # json | text


class Config(msgspec.Struct, **_STRICT):
    server: ServerSettings = ServerSettings()
    bus: BusConfig = BusConfig()
    host: HostConfig = HostConfig()
    session: SessionConfig = SessionConfig()
    stage0: Stage0Config = Stage0Config()
    stage1: Stage1Config = Stage1Config()
    engine: EngineConfig = EngineConfig()
    engines: EngineOptions = EngineOptions()
    supervisor: SupervisorConfig = SupervisorConfig()
    logging: LoggingConfig = LoggingConfig()

    def host_addresses(self) -> list[BusAddresses]:
        """Every session host's endpoints: ``[bus] hosts``, else the one host."""
        b = self.bus
        if b.hosts:
            return [BusAddresses(h.control, h.data, b.data_hwm, b.curve) for h in b.hosts]
        return [self.addresses()]

    def addresses(self) -> BusAddresses:
        """The session host's endpoints (with ``[bus] hosts``: those of ``[host] shard``)."""
        if self.bus.hosts:
            return self.host_addresses()[min(self.host.shard, len(self.bus.hosts) - 1)]
        if self.bus.control and self.bus.data:
            return BusAddresses(self.bus.control, self.bus.data, self.bus.data_hwm, self.bus.curve)
        return msgspec.structs.replace(ipc_addresses(self.run_dir(), self.bus.data_hwm), curve=self.bus.curve)

    def run_dir(self) -> str:
        return self.bus.run_dir or default_run_dir(self.server.port)


class ConfigError(ValueError):
    """A config file that does not decode or validate."""


def validate(cfg: Config) -> Config:
    if cfg.engine.name not in engine_names():
        raise ConfigError(
            f"engine.name: unknown engine {cfg.engine.name!r}; known: {', '.join(engine_names())}"
            + config_rules.did_you_mean(cfg.engine.name, engine_names())
        )
    if cfg.engine.name == "moshi" and cfg.stage0.max_batch < cfg.engines.moshi.max_sessions:
        # A lockstep step covers every slot: a session left out of the batch would hear silence.
        raise ConfigError(
            f"stage0.max_batch ({cfg.stage0.max_batch}) must be at least engines.moshi.max_sessions "
            f"({cfg.engines.moshi.max_sessions})"
        )
    problems = config_rules.check(cfg)
    if bool(cfg.bus.control) != bool(cfg.bus.data):
        problems.append("bus.control and bus.data must be set together")
    if cfg.bus.hosts and cfg.bus.control:
        problems.append("bus.hosts replaces bus.control/bus.data: set one or the other")
    if cfg.host.shard >= max(1, len(cfg.bus.hosts)):
        problems.append(f"host.shard {cfg.host.shard} is not an entry of bus.hosts ({len(cfg.bus.hosts)} listed)")
    endpoints = [e for h in cfg.bus.hosts for e in (h.control, h.data)]
    if len(set(endpoints)) != len(endpoints):
        problems.append("bus.hosts: every host needs endpoints of its own")
    for i, h in enumerate(cfg.bus.hosts):
        for key, value in (("control", h.control), ("data", h.data)):
            bad = config_rules.ENDPOINT.check(value)
            if bad is not None:
                problems.append(f"bus.hosts[{i}].{key}: {bad}")
    problems += cfg.bus.curve.problems()
    if cfg.bus.heartbeat_timeout_s <= cfg.bus.heartbeat_interval_s:
        problems.append("bus.heartbeat_timeout_s must be longer than bus.heartbeat_interval_s")
    if 0 < cfg.server.max_message_bytes < 1024:
        problems.append("server.max_message_bytes must be 0 (derived from max_audio_bytes) or at least 1024")
    lead = cfg.stage1.max_lead_ms
    if lead and cfg.server.slow_client_audio_ms < lead + 1000:
        # A client that reads in real time has up to max_lead_ms of audio waiting, legitimately.
        problems.append(
            f"server.slow_client_audio_ms ({cfg.server.slow_client_audio_ms}) must be at least "
            f"stage1.max_lead_ms + 1000 ({lead + 1000})"
        )
    if 0 < cfg.supervisor.watchdog_s < 1:
        problems.append("supervisor.watchdog_s must be 0 (off) or at least 1 second")
    if cfg.server.bridge_port and cfg.server.bridge_port == cfg.server.port:
        problems.append("server.bridge_port must differ from server.port")
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        check_bind(cfg.server)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"server: {exc}") from exc
    return cfg


def load(path: str | Path | None, secrets: dict[str, Any] | None = None) -> Config:
    """Decode and validate a config file (TOML, or JSON by extension); None → defaults.

    ``secrets`` (from :func:`duplexd.runtime.secrets.split`) are merged in before validation.
    """
    if path is None:
        return validate(_with_secrets(Config(), secrets))
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror}") from exc
    try:
        if p.suffix == ".json":
            cfg = msgspec.json.decode(data, type=Config)
        else:
            cfg = msgspec.toml.decode(data, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{p}: {config_rules.explain(str(exc), Config)}") from exc
    try:
        return validate(_with_secrets(cfg, secrets))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc


def _with_secrets(cfg: Config, secrets: dict[str, Any] | None) -> Config:
    if not secrets:
        return cfg
    from duplexd.runtime.secrets import merge

    try:
        return merge(cfg, secrets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def with_overrides(
    cfg: Config,
    host: str | None = None,
    port: int | None = None,
    engine: str | None = None,
    log_format: str | None = None,
) -> Config:
    if log_format is not None:
        cfg = msgspec.structs.replace(cfg, logging=msgspec.structs.replace(cfg.logging, format=log_format))
    server = cfg.server
    if host is not None:
        server = msgspec.structs.replace(server, host=host)
    if port is not None:
        server = msgspec.structs.replace(server, port=port)
    eng = cfg.engine if engine is None else EngineConfig(name=engine)
    return validate(msgspec.structs.replace(cfg, server=server, engine=eng))


def dump_json(cfg: Config) -> bytes:
    return msgspec.json.encode(cfg)


def full_builtins(obj: object) -> object:
    """``obj`` as plain data with every field, defaults included (wire structs omit them)."""
    if isinstance(obj, msgspec.Struct):
        return {f: full_builtins(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, list | tuple):
        return [full_builtins(x) for x in obj]
    if isinstance(obj, dict):
        return {k: full_builtins(v) for k, v in obj.items()}
    return msgspec.to_builtins(obj)
