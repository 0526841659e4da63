"""Everything in the calling process, one job at a time: for tests and debugging."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from parafold.engine.base import Executor, FoldWorkerHandle, FoldWorkerSpec, JobHandle, Resources
from parafold.engine.jobs import FoldSlot

__all__ = ["InlineExecutor"]

R = TypeVar("R")


def _run_now(fn: Callable[..., R], *args: Any) -> cf.Future[R]:
    future: cf.Future[R] = cf.Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # handed to the caller through the future, as other engines do
        future.set_exception(exc)
    return future


class _InlineFoldWorker(FoldWorkerHandle):
    def __init__(self, spec: FoldWorkerSpec) -> None:
        self.name = "inline"
        self._slot = FoldSlot(spec.params_dir, spec.settings, "inline")

    def warm(self) -> JobHandle[Any]:
        return JobHandle(_run_now(self._slot.warm), label=self.name)

    def fold(self, feature_sets: Sequence[Any], out_root: Path) -> JobHandle[Any]:
        return JobHandle(_run_now(self._slot.fold, feature_sets, out_root), label=self.name)


class InlineExecutor(Executor):
    """Runs each job when it is submitted; the handle is already complete."""

    name = "inline"

    def submit(self, fn: Callable[..., R], *args: Any, resources: Resources) -> JobHandle[R]:
        return JobHandle(_run_now(fn, *args), label=getattr(fn, "__name__", "job"))

    def cpu_capacity(self) -> int:
        return 1

    def start_fold_workers(self, spec: FoldWorkerSpec) -> list[FoldWorkerHandle]:
        return [_InlineFoldWorker(spec)]
