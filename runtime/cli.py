"""``duplexd`` command line.

duplexd serve [--config FILE] [--host H] [--port P] [--engine NAME]
duplexd run ROLE [--config FILE] [...]      (ROLE: host, stage0, stage1, adapter)
duplexd check-config [--config FILE]        (secrets are printed as "<redacted>")
duplexd prepare-models [--config FILE]      (convert the local reply model now, not at first start)
duplexd curve-keygen DIR NAME               (a CURVE certificate pair for [bus.curve]: DIR/NAME.key{,_secret})
duplexd --version
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from duplexd.bus.messages import PROTOCOL_VERSION
from duplexd.runtime import logging as runtime_logging
from duplexd.runtime import secrets as config_secrets
from duplexd.runtime.config import ConfigError, full_builtins, load, validate, with_overrides


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("duplexd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        release = "(not installed)"
    return f"duplexd {release} (bus protocol {PROTOCOL_VERSION})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duplexd", description="Full-duplex spoken conversation server")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML (or JSON) config file; defaults apply without one")
        sp.add_argument("--host", help="override server.host")
        sp.add_argument("--port", type=int, help="override server.port (default 8000)")
        sp.add_argument("--engine", help="override engine.name")
        sp.add_argument("--log-format", choices=("json", "text"), help="override logging.format")

    common(sub.add_parser("serve", help="run all four roles under the built-in supervisor"))
    run = sub.add_parser("run", help="run one role (for systemd or multi-host)")
    run.add_argument("role", choices=("host", "stage0", "stage1", "adapter"))
    run.add_argument(
        "--shard", type=int, help="override host.shard: the entry of bus.hosts a host binds, or a stage serves"
    )
    common(run)
    common(sub.add_parser("check-config", help="validate a config and print it as JSON (secrets redacted)"))
    common(sub.add_parser("prepare-models", help="convert the cascade's local reply model into the cache now"))
    keygen = sub.add_parser("curve-keygen", help="write a CURVE certificate pair for [bus.curve]")
    keygen.add_argument("dir", help="directory for NAME.key (public) and NAME.key_secret (mode 0600)")
    keygen.add_argument("name", help="e.g. host, stage0-gpu1, adapter-a")
    sub.add_parser("version", help="print versions")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(version_line())
        return 0
    if args.command == "curve-keygen":
        from duplexd.bus.curve import keygen

        public, secret = keygen(args.dir, args.name)
        print(f"public: {public}\nsecret: {secret}")
        return 0
    # Children of `serve` get the secrets in their environment, not in their config file.
    passed = config_secrets.take_from_env() if args.command == "run" else {}
    try:
        cfg = with_overrides(load(args.config, passed), args.host, args.port, args.engine, args.log_format)
        if getattr(args, "shard", None) is not None:
            cfg = validate(msgspec.structs.replace(cfg, host=msgspec.structs.replace(cfg.host, shard=args.shard)))
    except ConfigError as exc:
        print(f"duplexd: config error: {exc}", file=sys.stderr)
        return 2
    fmt = cfg.logging.format
    if args.command == "check-config":
        shown = full_builtins(config_secrets.redacted(cfg))
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(shown).decode(), indent=2) + "\n")
        return 0
    if args.command == "prepare-models":
        from duplexd.actors.engines.cascade.model_cache import prepare_command

        c = cfg.engines.cascade
        return prepare_command(c.policy, c.local_model, c.local_cache_dir, lambda m: print(m, file=sys.stderr))
    secret_values = config_secrets.values(cfg)
    if args.command == "serve":
        from duplexd.runtime.preflight import StartupError
        from duplexd.runtime.supervisor import Supervisor

        supervisor = Supervisor(cfg)
        try:
            supervisor.prepare()
        except StartupError as exc:
            print(f"duplexd: {exc}", file=sys.stderr)
            return 1
        runtime_logging.setup("supervisor", cfg.logging.level, fmt, secret_values)
        return supervisor.run()
    from duplexd.runtime.roles import RUNNERS

    runtime_logging.setup(args.role, cfg.logging.level, fmt, secret_values)
    return RUNNERS[args.role](cfg)


if __name__ == "__main__":
    sys.exit(main())
