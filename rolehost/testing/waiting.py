"""Waiting in a test for what a service does: a condition polled up to a deadline, and
the error that says what it did instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL = 0.02  # seconds between looks at a condition that has no event to wait on


class HarnessError(AssertionError):
    """The service did not do what the test waited for; the message says what it did."""


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll `condition` until it returns something truthy; HarnessError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise HarnessError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(POLL)
