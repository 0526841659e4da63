"""A shared budget of CPU cores: each tool call holds its threads' cores while it runs.

Proteins are started freely; their tools wait here for cores, so the machine is never
oversubscribed and a core freed by one protein's finished search goes at once to another's.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["CpuBudget", "threads_per_search", "default_cpus", "SEARCHES_PER_PROTEIN"]

# uniref90 (then pdb70), mgnify and bfd/uniref30 run at the same time.
SEARCHES_PER_PROTEIN = 3


def default_cpus() -> int:
    """Cores this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_search(cpus: int, proteins: int, requested: int = 0) -> int:
    """Threads for each search: the budget split over the proteins' concurrent searches.

    Many proteins get one thread per search (the search tools scale sub-linearly, so more
    proteins at once is the better use of cores); a single protein gets its share of all cores.
    """
    if requested > 0:
        return min(requested, cpus)
    return max(1, min(8, cpus // (SEARCHES_PER_PROTEIN * max(1, proteins))))


class CpuBudget:
    """A counting semaphore of cores, taken and given back in any amount; `alone()` takes all
    of them, ahead of the holds asked for after it."""

    def __init__(self, cpus: int) -> None:
        if cpus < 1:
            raise ValueError(f"CPU budget must be >= 1, got {cpus}")
        self.total = cpus
        self._free = cpus
        self._alone_waiting = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, cores: int) -> Iterator[int]:
        """Wait for `cores` free cores (capped at the total), hold them for the block."""
        cores = max(1, min(cores, self.total))
        with self._cond:
            self._cond.wait_for(lambda: self._free >= cores and not self._alone_waiting)
            self._free -= cores
        try:
            yield cores
        finally:
            self._give_back(cores)

    @contextlib.contextmanager
    def alone(self) -> Iterator[int]:
        """Hold every core: the block runs when nothing else of this budget does (a search
        killed for want of memory runs again so). No hold asked for while this one waits is
        granted before it: the holds already running finish, and it starts."""
        with self._cond:
            self._alone_waiting += 1
            try:
                self._cond.wait_for(lambda: self._free == self.total)
            finally:
                self._alone_waiting -= 1
                self._cond.notify_all()  # holds waiting behind this one (if it gave up)
            self._free = 0
        try:
            yield self.total
        finally:
            self._give_back(self.total)

    def _give_back(self, cores: int) -> None:
        with self._cond:
            self._free += cores
            self._cond.notify_all()

    @property
    def free(self) -> int:
        with self._cond:
            return self._free
