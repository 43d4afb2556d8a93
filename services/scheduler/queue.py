"""The wait queue: higher priority first, FIFO (by submission order) within a priority.

Jobs are kept in one heap per (priority, amount, user) class, so the scheduler looks at no
more than one candidate per class when it backfills (whether a job can be placed depends only
on its amount and on its user's share limit, policy.max_share), however long the queue is; a
job put back after a failed placement keeps its original place. Empty classes are dropped.
Per priority, a sorted list of submission orders answers "how many are ahead" in O(log n).
Removal from the heaps is lazy: a removed job is skipped when it reaches the top of its class.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator

Key = tuple[int, int]
"""(-priority, submission order): smaller goes first."""


class JobQueue:
    def __init__(self) -> None:
        self._classes: dict[tuple[int, int, str], list[tuple[int, str]]] = {}
        self._keys: dict[str, Key] = {}
        self._orders: dict[int, list[int]] = {}
        """priority -> sorted submission orders of its queued jobs."""

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._keys

    def push(self, job_id: str, priority: int, tenths: int, order: int, user: str = "") -> None:
        if job_id in self._keys:
            return
        self._keys[job_id] = (-priority, order)
        heapq.heappush(self._classes.setdefault((priority, tenths, user), []), (order, job_id))
        bisect.insort(self._orders.setdefault(priority, []), order)

    def remove(self, job_id: str) -> None:
        key = self._keys.pop(job_id, None)
        if key is not None:
            orders = self._orders[-key[0]]
            del orders[bisect.bisect_left(orders, key[1])]

    def _head_of(self, heap: list[tuple[int, str]]) -> str | None:
        while heap and heap[0][1] not in self._keys:
            heapq.heappop(heap)
        return heap[0][1] if heap else None

    def candidates(self) -> Iterator[str]:
        """The head of every class, best first: the only jobs worth trying to place."""
        heads = []
        empty = []
        for cls, heap in self._classes.items():
            head = self._head_of(heap)
            if head is not None:
                heads.append((self._keys[head], head))
            else:
                empty.append(cls)
        for cls in empty:  # classes come and go with users: keep only those with jobs
            del self._classes[cls]
        heads.sort()
        for _, job_id in heads:
            yield job_id

    def head(self) -> str | None:
        return next(self.candidates(), None)

    def ahead_of(self, priority: int, order: int) -> int:
        """How many queued jobs go before a job of this priority and submission order."""
        ahead = sum(len(o) for p, o in self._orders.items() if p > priority)
        return ahead + bisect.bisect_left(self._orders.get(priority, []), order)

    def position(self, job_id: str) -> int:
        """1-based place in the queue; 0 if not queued."""
        key = self._keys.get(job_id)
        return 0 if key is None else 1 + self.ahead_of(-key[0], key[1])

    def ordered(self) -> list[str]:
        return [job_id for _, job_id in sorted((k, j) for j, k in self._keys.items())]
