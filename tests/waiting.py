"""Waiting on events, never on the clock: tests that drive a real subprocess poll a file the process
writes (its lock, its stats rows) and check the process is still alive, so they hold on any machine
speed. ``HANG_GUARD_S`` only turns a hang into a failure; a machine 10x slower than the slowest seen
still finishes every wait well inside it."""

from __future__ import annotations

import subprocess
import time
from typing import Callable, TypeVar

T = TypeVar("T")

HANG_GUARD_S = 3600.0
POLL_S = 0.02


def wait_for(predicate: Callable[[], T], proc: subprocess.Popen | None = None, what: str = "the event") -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail if ``proc`` exits first."""
    start = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}: {str(err)[-2000:]}")
        if time.monotonic() - start > HANG_GUARD_S:
            raise AssertionError(f"hang guard: no {what} after {HANG_GUARD_S:.0f} s")
        time.sleep(POLL_S)
