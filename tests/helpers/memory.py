"""Resident memory of this process, read from /proc/self/statm, and a guard against runaway work."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size (the second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RunawayWork(Exception):
    """Raised by :func:`rss_guard` inside whatever Python code is running when it trips."""


@dataclass
class RssWatch:
    base: int
    peak: int
    tripped: int = 0

    @property
    def growth(self) -> int:
        return self.peak - self.base


@contextlib.contextmanager
def rss_guard(limit_bytes: int, *, every_cpu_s: float = 0.005) -> Iterator[RssWatch]:
    """Sample RSS every ``every_cpu_s`` of CPU time this process spends (SIGPROF, so it also
    runs while the event loop is stuck in a long loop, between two bytecodes) and keep the peak.

    If RSS grows by more than ``limit_bytes`` over the starting value, raise ``RunawayWork``
    in the running code (it shows up wherever the main thread is, usually a task that logs
    it): a test of bounded work then fails on its own assertions instead of eating the
    machine's memory. SIGPROF, not SIGALRM: pytest-timeout owns the real-time alarm.
    """
    watch = RssWatch(base=rss_bytes(), peak=0)
    watch.peak = watch.base

    def on_tick(signum, frame) -> None:
        now = rss_bytes()
        if now > watch.peak:
            watch.peak = now
        if now - watch.base > limit_bytes:
            watch.tripped += 1
            raise RunawayWork(f"RSS grew by {(now - watch.base) / 2**20:.0f} MiB")

    old = signal.signal(signal.SIGPROF, on_tick)
    signal.setitimer(signal.ITIMER_PROF, every_cpu_s, every_cpu_s)
    try:
        yield watch
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, old)
        now = rss_bytes()
        watch.peak = max(watch.peak, now)
