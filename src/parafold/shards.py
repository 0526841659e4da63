"""One slice of a target set, for job arrays (Slurm, PBS, LSF) without a Ray cluster.

Each task of an array runs the same command with `--shard K/N` and takes its own disjoint part
of the input; together the N tasks cover every target exactly once. A shard is decided by the
targets alone, never by which other tasks run or finished, so a rerun of one task (after a
preemption) takes the same targets and resumes them.

Two ways to cut:

* `by_hash` (searches): a target goes where a hash of its key (its sequence) sends it. Identical
  sequences land in one shard and are searched once; a record added to the input moves nobody
  else.
* `cut_by_work` (GPU stage, `costs.cut_by_cost`): targets sorted by shape, cut into N runs of
  about equal modelled device work. Each GPU task then compiles only the few shapes of its own
  range instead of every shape of the set. The cuts depend on the whole set, so the first task
  to start pins them in a plan file that every later task reads (`pinned`): a set that grew in
  between (a features task rerun late) cannot leave a target between two tasks' ranges;
  targets the plan does not know go by hash.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from parafold.errors import InputError
from parafold.inputs import Target
from parafold.store import create_json_once, file_lock, read_json

__all__ = ["Shard", "cut_by_work"]

T = TypeVar("T")
_PATTERN = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True, slots=True)
class Shard:
    """Part `index` (0-based) of `count` parts."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InputError(f"--shard: the number of shards must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise InputError(
                f"--shard {self.index}/{self.count}: K must be 0..{self.count - 1} "
                "(for an array numbered from 1, pass $((SLURM_ARRAY_TASK_ID - 1)))")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`K/N` as the command line gives it.

        Raises:
            InputError: not two integers, or K out of range.
        """
        match = _PATTERN.fullmatch(text)
        if not match:
            raise InputError(f"--shard {text!r}: expected K/N, e.g. --shard 0/10 "
                             "($SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"shard {self.index}/{self.count}"

    @property
    def reports_shared(self) -> bool:
        """Whether this shard reports what belongs to no target (bad input records, unreadable
        feature folders): one task does, so each problem is told once."""
        return self.index == 0

    def problems_to_tell(self, problems: Sequence[T]) -> list[T]:
        """The problems this shard reports: all of them in shard 0, none elsewhere."""
        return list(problems) if self.reports_shared else []

    def own_targets(self, targets: Sequence[Target]) -> list[Target]:
        """This shard's targets of the input: split by sequence, so twins stay together."""
        return self.by_hash(targets, key=lambda t: t.sequence_hash)

    def by_hash(self, items: Sequence[T], key: Callable[[T], str]) -> list[T]:
        """The items whose key hashes to this shard, in their order."""
        return [item for item in items if _bucket(key(item), self.count) == self.index]

    def pinned(self, plan_file: Path, items: Sequence[T], *, name: Callable[[T], str],
               cut: Callable[[], list[list[T]]]) -> tuple[list[T], str]:
        """This shard's items by the plan in `plan_file`, which the first task to get here
        writes from `cut()` (all `count` parts, under a lock; where a mount has no locks,
        created only if absent, and every task uses the file, never its own cut, so tasks
        racing there still share one plan). Items the plan does not name go by a hash of
        their name. Returns the items and a line saying what was used."""
        plan_file = Path(plan_file)
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(plan_file.with_name(plan_file.name + ".lock")):
            made = f"the plan in {plan_file}"
            if not plan_file.is_file():
                plan = {"count": self.count, "parts": {
                    name(item): k for k, part in enumerate(cut()) for item in part}}
                if create_json_once(plan_file, plan):
                    made = f"a new plan, {plan_file}"
            plan = read_json(plan_file)
            if plan.get("count") != self.count:
                raise InputError(f"{plan_file}: a plan for {plan.get('count')} shards, not "
                                 f"{self.count}")
        parts: dict[str, int] = plan["parts"]
        mine = [item for item in items
                if parts.get(name(item), _bucket(name(item), self.count)) == self.index]
        unplanned = sum(1 for item in items if name(item) not in parts)
        note = f"; {unplanned} not in it go by hash" if unplanned else ""
        return mine, f"{self}: {len(mine)} of {len(items)} by {made}{note}"


def cut_by_work(items: Sequence[T], count: int, *, order: Callable[[T], Any],
                work: Callable[[T], float]) -> list[list[T]]:
    """`items` sorted by `order` and cut into `count` runs of about equal `work` (each item
    goes to the run its midpoint falls in). Work that is not a finite positive number for
    every item makes every item weigh the same."""
    ranked = sorted(items, key=order)
    weights = [work(item) for item in ranked]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        weights = [1.0] * len(ranked)
    total = sum(weights)
    parts: list[list[T]] = [[] for _ in range(count)]
    before = 0.0
    for item, weight in zip(ranked, weights, strict=True):
        parts[min(count - 1, int((before + weight / 2) * count / total))].append(item)
        before += weight
    return parts


def _bucket(key: Hashable, count: int) -> int:
    """A stable shard number for `key` (Python's `hash` of a string changes per process)."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count
