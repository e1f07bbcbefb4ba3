"""Summarise a py-spy raw profile: ``python -m tests.bench.profile_top FILE [K]``.

Prints the K hottest frames by self time and by inclusive time (percent of samples); the
sweep's ``--profile`` writes such files under bench-results/profiles/.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path


def summarise(path: Path, k: int = 25) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, hottest self frames, hottest inclusive frames), shares in percent."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    share = 100.0 / max(1, total)
    return total, [(f, c * share) for f, c in own.most_common(k)], [(f, c * share) for f, c in incl.most_common(k)]


def main(argv: list[str]) -> None:
    total, own, incl = summarise(Path(argv[0]), int(argv[1]) if len(argv) > 1 else 25)
    print(f"samples {total}")
    print("--- self")
    for f, pct in own:
        print(f"{pct:5.1f}% {f}")
    print("--- inclusive")
    for f, pct in incl:
        print(f"{pct:5.1f}% {f}")


if __name__ == "__main__":
    main(sys.argv[1:])
