"""``duplexd`` command line.

duplexd serve [--config FILE] [--host H] [--port P] [--engine NAME]
duplexd run ROLE [--config FILE] [...]      (ROLE: host, stage0, stage1, adapter)
duplexd check-config [--config FILE]
duplexd prepare-models [--config FILE]     (convert the local reply model now, not at first start)
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from duplexd.bus.messages import PROTOCOL_VERSION
from duplexd.runtime import logging as runtime_logging
from duplexd.runtime.config import ConfigError, full_builtins, load, with_overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="duplexd", description="Full-duplex spoken conversation server")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML (or JSON) config file; defaults apply without one")
        sp.add_argument("--host", help="override server.host")
        sp.add_argument("--port", type=int, help="override server.port")
        sp.add_argument("--engine", help="override engine.name")
        sp.add_argument("--log-format", choices=("json", "text"), help="override logging.format")

    common(sub.add_parser("serve", help="run all four roles under the built-in supervisor"))
    run = sub.add_parser("run", help="run one role (for systemd or multi-host)")
    run.add_argument("role", choices=("host", "stage0", "stage1", "adapter"))
    common(run)
    common(sub.add_parser("check-config", help="validate a config and print it as JSON"))
    common(sub.add_parser("prepare-models", help="convert the cascade's local reply model into the cache now"))
    sub.add_parser("version", help="print versions")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        from importlib.metadata import version

        print(f"duplexd {version('duplexd')} (bus protocol {PROTOCOL_VERSION})")
        return 0
    try:
        cfg = with_overrides(load(args.config), args.host, args.port, args.engine, args.log_format)
    except ConfigError as exc:
        print(f"duplexd: config error: {exc}", file=sys.stderr)
        return 2
    fmt = cfg.logging.format
    if args.command == "check-config":
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(full_builtins(cfg)).decode(), indent=2) + "\n")
        return 0
    if args.command == "prepare-models":
        from duplexd.actors.engines.cascade.model_cache import prepare_command

        c = cfg.engines.cascade
        return prepare_command(c.policy, c.local_model, c.local_cache_dir, lambda m: print(m, file=sys.stderr))
    if args.command == "serve":
        from duplexd.runtime.supervisor import Supervisor

        runtime_logging.setup("supervisor", cfg.logging.level, fmt)
        return Supervisor(cfg).run()
    from duplexd.runtime.roles import RUNNERS

    runtime_logging.setup(args.role, cfg.logging.level, fmt)
    return RUNNERS[args.role](cfg)


if __name__ == "__main__":
    sys.exit(main())
