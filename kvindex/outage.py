"""Logging a dependency's outages without flooding: one line per state change, a reminder.

A Redis outage used to log two warnings per KV-event batch (~65 a second) from the gateway's
subscriber and nothing at all from ``kvgate indexer`` or from a gateway that only looks up.
``StateLog`` is the one place that says "X went away" and "X is back": every caller reports
each failure (``down``) and each success (``up``) — cheap, no I/O unless a line is due — and
the object decides what is worth a line:

* the first failure after a success: ``X unavailable: <detail>``;
* while it stays down: ``X still unavailable after N s (M failed calls; last: <detail>)``,
  at most once per ``remind_s``;
* the first success after that: ``X answers again after N s (M failed calls)``;
* a service that flaps (down and up again within ``remind_s`` of the last line) is not
  reported outage by outage: the short outages are counted, and the next line that is due says
  how many there were.

``RateLimited`` covers the other repetitive warnings (one per bad batch from a misbehaving
replica, say): the first line of each kind at once, then at most one per ``every_s``, telling
how many were held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class StateLog:
    """Up/down state of one dependency, logged one line per change (see the module docstring)."""

    def __init__(self, logger: logging.Logger, what: str, *, remind_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.what = what
        self.remind_s = remind_s
        self.clock = clock
        self.is_up = True
        self._since = 0.0  # when the current outage began
        self._failures = 0  # failed calls in the current outage
        self._reported = False  # the current outage has had a line
        self._last_line: float | None = None
        self._held_back = 0  # short outages not reported since the last line

    def _due(self, now: float) -> bool:
        return self._last_line is None or now - self._last_line >= self.remind_s

    def _emit(self, now: float, msg: str, *args: object) -> None:
        if self._held_back:
            msg += " (%d short outages since the last report)"
            args = (*args, self._held_back)
            self._held_back = 0
        self._last_line = now
        self.log.warning(msg, *args)

    def down(self, detail: object = "") -> None:
        """A call failed (``detail``: the error, for the line if one is due)."""
        now = self.clock()
        if self.is_up:
            self.is_up = False
            self._since, self._failures, self._reported = now, 0, False
        self._failures += 1
        if not self._due(now):
            return
        if not self._reported:
            self._reported = True
            if self._failures == 1:
                self._emit(now, "%s unavailable: %s", self.what, detail)
            else:
                self._emit(now, "%s unavailable for %.1f s (%d failed calls; last: %s)", self.what, now - self._since, self._failures, detail)
        else:
            self._emit(now, "%s still unavailable after %.0f s (%d failed calls; last: %s)", self.what, now - self._since, self._failures, detail)

    def up(self) -> None:
        """A call succeeded."""
        if self.is_up:
            return
        now = self.clock()
        self.is_up = True
        if self._reported:
            self._emit(now, "%s answers again after %.1f s (%d failed calls)", self.what, now - self._since, self._failures)
        else:
            self._held_back += 1


class RateLimited:
    """At most one line per key every ``every_s``; the next one says how many were held back."""

    def __init__(self, logger: logging.Logger, *, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.every_s = every_s
        self.clock = clock
        self._last: dict[object, tuple[float, int]] = {}  # key -> (when logged, held back since)

    def log_at(self, level: int, key: object, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless a line of ``key`` went out less than
        ``every_s`` ago (then count it); True if it was logged."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, last[1], now - last[0])
        if len(self._last) > 4096:  # keys are few (replica × kind); never grow without bound
            self._last.clear()
        self._last[key] = (now, 0)
        self.log.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: object, msg: str, *args: object) -> bool:
        return self.log_at(logging.WARNING, key, msg, *args)
