"""Which session host owns a session: rendezvous hashing of the session id.

Several session host processes share the sessions of one deployment. Every adapter
computes the owner of a session id the same way, from the same ordered list of host
endpoints, so any adapter behind a load balancer reaches the host that holds the session.
Rendezvous (highest-random-weight) hashing: each host scores ``hash(host, session id)``
and the highest live one wins, so a host that is down moves only its own sessions (to
their second choice) and the others keep their owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence


def _score(host: str, session_id: str) -> int:
    h = hashlib.blake2b(f"{host}\0{session_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def ranked(session_id: str, hosts: Sequence[str]) -> list[int]:
    """Indexes of ``hosts``, the session's first choice first."""
    return sorted(range(len(hosts)), key=lambda i: (-_score(hosts[i], session_id), i))


def owner(session_id: str, hosts: Sequence[str], alive: Callable[[int], bool] | None = None) -> int | None:
    """The index of the host that owns ``session_id``: its highest-ranked live host
    (``alive``: by index; None = all live). None when no host is live."""
    for i in ranked(session_id, hosts):
        if alive is None or alive(i):
            return i
    return None
