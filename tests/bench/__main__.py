"""``make bench``: run every tests/bench/bench_*.py module's ``main()`` in turn.

``python -m tests.bench [NAME ...]`` runs only the named ones (e.g. ``bus``).
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = sorted(p.stem.removeprefix("bench_") for p in here.glob("bench_*.py"))
    chosen = argv or names
    unknown = set(chosen) - set(names)
    if unknown:
        print(f"unknown benchmarks {sorted(unknown)}; have {names}", file=sys.stderr)
        return 2
    for name in chosen:
        t0 = time.perf_counter()
        importlib.import_module(f"tests.bench.bench_{name}").main()
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
