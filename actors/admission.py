"""Admission control: whether one more session fits, and how many more do.

The session host asks before it opens a session. Limits, each 0 for "none of its own":

* the node: ``[host] max_sessions``, every session this host holds;
* each stage process: its ``[stage0|stage1] max_sessions`` (sent in its Hello) and, for a
  stage0, its engine's model slots (``EngineInfo.max_sessions``); the smaller one counts.

A session needs a stage0 and a stage1 with room. A refusal is immediate and names the
limit; the adapter turns it into one ``error`` event (code ``capacity_exceeded``) and a close
with 1013 ("try again later") on every protocol. Nothing here does IO.
"""

from __future__ import annotations

from dataclasses import dataclass

from duplexd.bus.messages import CAPACITY_EXCEEDED, EngineInfo


@dataclass(frozen=True, slots=True)
class StageLoad:
    """One ready stage process: sessions bound to it and what it admits (0: no limit)."""

    sessions: int
    capacity: int

    @property
    def room(self) -> int | None:
        """Sessions it still takes; None: no limit."""
        return None if self.capacity <= 0 else max(0, self.capacity - self.sessions)


def stage_capacity(configured: int, engine: EngineInfo | None) -> int:
    """A stage process's own limit: the smaller of its configured cap and its engine's model
    slots, ignoring the ones that are 0 (none); 0 when neither limits it."""
    limits = [n for n in (configured, engine.max_sessions if engine is not None else 0) if n > 0]
    return min(limits) if limits else 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a session is not admitted: ``limit`` names it for metrics (node, stage0, stage1)."""

    limit: str
    message: str
    code: str = CAPACITY_EXCEEDED


def _total_room(stages: list[StageLoad]) -> int | None:
    rooms = [s.room for s in stages]
    return None if any(r is None for r in rooms) else sum(r for r in rooms if r is not None)


def _total_capacity(stages: list[StageLoad]) -> int | None:
    return None if any(s.capacity <= 0 for s in stages) else sum(s.capacity for s in stages)


def admit(open_sessions: int, node_max: int, stage0: list[StageLoad], stage1: list[StageLoad]) -> Refusal | None:
    """None when one more session fits (given ready stages of both kinds), else why not."""
    if node_max > 0 and open_sessions >= node_max:
        return Refusal("node", f"the server holds its maximum of {node_max} sessions; try again when one ends")
    for name, stages in (("stage0", stage0), ("stage1", stage1)):
        room = _total_room(stages)
        if room == 0:
            cap = _total_capacity(stages)
            what = "model slots" if name == "stage0" else "speech synthesis slots"
            return Refusal(name, f"all {cap} {what} are in use; try again when a session ends")
    return None


def capacity(open_sessions: int, node_max: int, stage0: list[StageLoad], stage1: list[StageLoad]) -> tuple[int, int]:
    """(sessions admitted in all, sessions admitted now on top of the open ones); -1 for no limit."""
    totals = [node_max if node_max > 0 else None, _total_capacity(stage0), _total_capacity(stage1)]
    rooms = [max(0, node_max - open_sessions) if node_max > 0 else None, _total_room(stage0), _total_room(stage1)]
    known_totals = [t for t in totals if t is not None]
    known_rooms = [r for r in rooms if r is not None]
    return (min(known_totals) if known_totals else -1, min(known_rooms) if known_rooms else -1)
