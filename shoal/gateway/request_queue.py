"""The requests of one model version waiting for a worker, in priority levels: level 0 is served
first, and within a level the oldest first. What the dispatcher queues, sends again at the head, and
expires; it reads like a deque of requests in the order they will be sent.

Triton's priorities are the model: a request's ``priority`` parameter names its level (1 the highest,
0 the model's default level), levels beyond the last count as the last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any


class RequestQueue:
    __slots__ = ("levels", "n")

    def __init__(self, levels: int = 1) -> None:
        if levels < 1:
            raise ValueError("a queue has at least one priority level")
        self.levels: list[deque[Any]] = [deque() for _ in range(levels)]
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator[Any]:
        for q in self.levels:
            yield from q

    def append(self, p: Any) -> None:
        """At the back of its level (``p.level``)."""
        self.levels[p.level].append(p)
        self.n += 1

    def appendleft(self, p: Any) -> None:
        """At the head of its level: a request sent again goes before those that came after it."""
        self.levels[p.level].appendleft(p)
        self.n += 1

    def head(self) -> Any:
        """The request to send next (the queue must not be empty)."""
        for q in self.levels:
            if q:
                return q[0]
        raise IndexError("the queue is empty")

    def popleft(self) -> Any:
        for q in self.levels:
            if q:
                self.n -= 1
                return q.popleft()
        raise IndexError("the queue is empty")

    def remove(self, p: Any) -> None:
        """Take ``p`` out, wherever it waits (nothing when it is not here)."""
        try:
            self.levels[p.level].remove(p)
        except ValueError:
            return
        self.n -= 1

    def pop_lower(self, level: int) -> Any:
        """The newest request of the lowest non-empty level below ``level``, taken out (None when
        there is none): what a full queue gives up for a request of ``level``."""
        for q in reversed(self.levels[level + 1 :]):
            if q:
                self.n -= 1
                return q.pop()
        return None

    def ahead_of(self, level: int) -> int:
        """How many requests are sent before a new one of ``level``: its level and those above."""
        if level == 0:
            return len(self.levels[0])
        return sum(len(q) for q in self.levels[: level + 1])

    def clear(self) -> None:
        for q in self.levels:
            q.clear()
        self.n = 0

    def keep(self, wanted: Callable[[Any], bool]) -> None:
        """Drop every request ``wanted`` says no to, keeping the order of the others."""
        n = 0
        for i, q in enumerate(self.levels):
            if q:
                kept = deque(p for p in q if wanted(p))
                self.levels[i] = kept
                n += len(kept)
        self.n = n
