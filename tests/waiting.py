"""Waiting on events in tests: poll a condition until it holds, with a generous deadline that fails
the test saying what never happened (never a fixed sleep standing for the event)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``cond`` until it is true (returned); fail saying ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < end, f"{what} (waited {timeout:g} s)"
        time.sleep(0.02)
    return got
