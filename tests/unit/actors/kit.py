"""Helpers shared by the session actor tests."""

from __future__ import annotations


class Ids:
    """Deterministic ids (``resp_1``, ``item_2``, ...), so runs replay exactly."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"
