"""The service watchdog: ``WATCHDOG=1`` from a role's main loop, so a stuck loop is restarted.

systemd (``WatchdogSec=`` in the units) and our own supervisor (``[supervisor] watchdog_s``)
set ``$WATCHDOG_USEC`` for a role; the role then sends ``WATCHDOG=1`` on ``$NOTIFY_SOCKET``
at least twice per period, from the loop that does its work: the host's and the adapter's
event loop, a stage worker's step loop. A loop stuck in one step stops the pings and the
service manager kills and restarts the role; peer liveness (bus heartbeats from a separate
thread) is a different question, answered within a second (bus/liveness.py).

Loading a model happens before the loop exists and may take minutes: :meth:`Watchdog.covering`
pings from a thread for that phase only, so loading is never mistaken for a hang.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping

from duplexd.runtime import sdnotify


class Watchdog:
    """Rate-limited ``WATCHDOG=1`` pings; inert when no watchdog is configured."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        period = int(usec) / 1e6 if usec.isdigit() else 0.0
        # systemd names the process the watchdog is for; a child that inherited it is not.
        if pid and pid != str(os.getpid()):
            period = 0.0
        self.period_s = period
        self.every_s = period / 4  # well inside the period, even with a busy machine's jitter
        self._last = float("-inf")
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.period_s > 0

    def ping(self) -> None:
        """Call once per loop turn; sends at most every quarter period."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        if sdnotify.notify("WATCHDOG=1"):
            self.sent += 1

    @contextlib.contextmanager
    def covering(self, what: str) -> Iterator[None]:
        """Ping from a thread while ``what`` (model loading) runs outside the loop."""
        if not self.enabled:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.every_s):
                sdnotify.notify("WATCHDOG=1")

        t = threading.Thread(target=beat, name=f"watchdog-{what}", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=1.0)
