"""``make bench``: run every tests/bench/bench_*.py module's ``main()`` in turn.

``python -m tests.bench [--quick] [NAME ...]`` runs only the named ones (e.g. ``bus``);
``--quick`` (CI smoke, ``make bench QUICK=1``) runs the benchmarks that have a quick mode
(their ``main`` takes ``quick``), each in seconds, and skips the others.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    here = Path(__file__).parent
    names = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    chosen = argv or names
    unknown = set(chosen) - set(names)
    if unknown:
        print(f"unknown benchmarks {sorted(unknown)}; have {names}", file=sys.stderr)
        return 2
    for name in chosen:
        t0 = time.perf_counter()
        entry = importlib.import_module(f"tests.bench.bench_{name}").main
        if quick:
            if "quick" not in inspect.signature(entry).parameters:
                continue
            entry(quick=True)
        else:
            entry()
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
