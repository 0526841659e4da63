"""The job functions every engine runs: one protein's search, one batch of predictions.

These are the per-target boundary: a target's failure comes back as a value with its reason,
never as an exception that would stop the run. They are top-level and their arguments and
results are plain picklable values, so a process pool or Ray can ship them anywhere.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parafold.errors import PipelineError, is_storage_full, was_killed
from parafold.featureset import FeatureSet
from parafold.inputs import Target
from parafold.lifecycle import die_with_parent, exit_interrupted, quiet_interrupt_when_idle

__all__ = ["SearchOutcome", "FoldBatchResult", "FoldSlot", "search_job", "search_batch_job",
           "copy_job", "plots_job", "describe_error", "worker_label"]

logger = logging.getLogger(__name__)


def worker_label(kind: str = "") -> str:
    """'host:pid' (plus a kind such as 'gpu0'): who ran a piece of work, for the timeline."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return f"{kind}@{base}" if kind else base


def describe_error(exc: BaseException) -> str:
    """One line for the ledger: our errors speak for themselves, others get their type."""
    cause = getattr(exc, "cause", None)  # Ray wraps a task's own exception
    if isinstance(cause, BaseException) and cause is not exc:
        return describe_error(cause)
    if isinstance(exc, PipelineError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """One target's CPU stage: its feature set, or why there is none (`stopped_early`: a full
    disk or a spent quota, which stops the run instead of failing the target; `killed`: a
    search tool died of SIGKILL, most likely out of memory, so the scheduler may run it alone;
    `worker_died`: the process running the job died, so there is no outcome of its own)."""

    name: str
    feature_set: FeatureSet | None
    error: str
    worker: str
    start: float
    end: float
    stopped_early: bool = False
    killed: bool = False
    worker_died: bool = False

    @property
    def ok(self) -> bool:
        return self.feature_set is not None

    @property
    def died(self) -> bool:
        """Whether its search died (a tool or the worker killed) rather than failed."""
        return self.killed or self.worker_died


def search_job(target: Target, out_dir: Path, databases: Any, settings: Any, cpus: int,
               cache_dir: Path) -> SearchOutcome:
    """Featurize one target; a failure is returned with its reason."""
    from parafold.search import featurize_target

    start = time.time()
    try:
        fs = featurize_target(target, out_dir=out_dir, databases=databases, settings=settings,
                              cpus=cpus, cache_dir=cache_dir)
    except Exception as exc:  # the per-target boundary: record and go on
        full = is_storage_full(exc)
        if not isinstance(exc, PipelineError) and not full:
            logger.exception("%s: unexpected error in the search stage", target.name)
        return SearchOutcome(target.name, None, describe_error(exc), worker_label(), start,
                             time.time(), stopped_early=full, killed=was_killed(exc))
    return SearchOutcome(target.name, fs, "", worker_label(), start, time.time())


def search_batch_job(targets: Sequence[Target], out_dir: Path, databases: Any, settings: Any,
                     cpus: int, cache_dir: Path, shard: Any = None) -> list[SearchOutcome]:
    """Featurize many targets in one MMseqs2 batch (one database pass for all of them).

    Outcomes follow `targets`; a failure of the whole batch is every target's outcome.
    """
    from parafold.search.budget import CpuBudget
    from parafold.search.runner import featurize_batch

    start = time.time()
    try:
        results: list[Any] = featurize_batch(
            list(targets), out_dir=out_dir, databases=databases, settings=settings,
            budget=CpuBudget(max(1, cpus)), cache_dir=cache_dir, shard=shard)
    except Exception as exc:  # the batch boundary: every target gets the reason
        if not isinstance(exc, PipelineError) and not is_storage_full(exc):
            logger.exception("unexpected error in a search batch of %d", len(targets))
        results = [exc] * len(targets)
    end, worker = time.time(), worker_label()
    return [SearchOutcome(t.name, None, describe_error(r), worker, start, end,
                          stopped_early=is_storage_full(r))
            if isinstance(r, BaseException) else SearchOutcome(t.name, r, "", worker, start, end)
            for t, r in zip(targets, results, strict=True)]


def copy_job(source_dir: Path, twin_dir: Path, twin_name: str,
             expect: list[int | None] | None = None) -> Any:
    """Give a twin the files of its source's prediction (`fold.twins.copy_prediction`)."""
    from parafold.fold.twins import copy_prediction

    return copy_prediction(source_dir, twin_dir, twin_name, expect=expect)


def plots_job(target_dir: Path) -> int:
    """Draw a finished target's plots (off the GPU worker); returns how many were written."""
    from parafold.report import write_target_plots

    return len(write_target_plots(target_dir))


@dataclass(frozen=True, slots=True)
class FoldBatchResult:
    """What a fold worker did with one batch: per-target outcomes, its counters, and the
    shapes it has compiled so far (`FoldWorker.shapes_run`: what the scheduler's affinity
    needs, merged shapes included)."""

    outcomes: tuple[Any, ...]
    worker: str
    start: float
    end: float
    stats: dict[str, Any] = field(default_factory=dict)
    shapes: tuple[Any, ...] = ()


class FoldSlot:
    """Holds one `FoldWorker` for the life of a process or actor (weights and compiles warm).

    The worker is built on the first batch, so building it (importing jax, loading weights)
    happens in the process that owns the device, never in the parent.
    """

    def __init__(self, params_dir: Path, settings: Any, kind: str, *,
                 trust_pickles: bool = False) -> None:
        self.params_dir = Path(params_dir)
        self.settings = settings
        self.kind = kind
        self.trust_pickles = trust_pickles
        self._worker: Any = None

    def warm(self) -> str:
        """Build the worker now (imports, weights) so the first batch does not wait for it."""
        from parafold.fold.worker import FoldWorker

        if self._worker is None:
            worker = FoldWorker(self.params_dir, self.settings, trust_pickles=self.trust_pickles)
            worker.load_params()  # a bad params folder fails here, before any target waits
            self._worker = worker
        return worker_label(self.kind)

    def close(self) -> None:
        """Stop the worker's helper processes (feature processing, file writing)."""
        if self._worker is not None:
            self._worker.close()

    def fold(self, feature_sets: Sequence[FeatureSet], out_root: Path) -> FoldBatchResult:
        start = time.time()
        self.warm()
        outcomes = self._worker.fold(list(feature_sets), Path(out_root))
        return FoldBatchResult(tuple(outcomes), worker_label(self.kind), start, time.time(),
                               _stats_dict(self._worker),
                               tuple(getattr(self._worker, "shapes_run", ())))


def _stats_dict(worker: Any) -> dict[str, Any]:
    stats = getattr(worker, "stats", None)
    if stats is None:
        return {}
    if callable(stats):
        stats = stats()
    if isinstance(stats, dict):
        return dict(stats)
    try:
        from dataclasses import asdict

        return asdict(stats)
    except TypeError:
        return {"repr": repr(stats)}


# A process-wide slot for engines whose workers are plain processes (the local engine).
_PROCESS_SLOT: FoldSlot | None = None


def init_worker_process(env: dict[str, str], log_level: int = logging.WARNING) -> None:
    """Process-pool initializer: pin the device (before anything imports jax), log like the
    parent (a spawned process starts with no logging set up), die with the parent, and end
    quietly on Ctrl-C while idle."""
    os.environ.update(env)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s")
    logging.getLogger("absl").setLevel(max(log_level, logging.WARNING))
    die_with_parent()
    quiet_interrupt_when_idle()


def _process_slot(params_dir: Path, settings: Any, kind: str,
                  trust_pickles: bool = False) -> FoldSlot:
    global _PROCESS_SLOT
    if _PROCESS_SLOT is None:
        _PROCESS_SLOT = FoldSlot(params_dir, settings, kind, trust_pickles=trust_pickles)
        # A pool process's exit joins its child processes before any atexit handler runs:
        # the worker's helpers, idle and waiting for work, would hold that exit for ever (and
        # the run's shutdown with it). A finalizer of priority >= 0 runs before that join,
        # and above 10 before those that close multiprocessing's queues (the pool's own).
        multiprocessing.util.Finalize(_PROCESS_SLOT, _PROCESS_SLOT.close, exitpriority=100)
    return _PROCESS_SLOT


def warm_in_process(params_dir: Path, settings: Any, kind: str,
                    trust_pickles: bool = False) -> str:
    return _process_slot(params_dir, settings, kind, trust_pickles).warm()


def fold_in_process(params_dir: Path, settings: Any, kind: str,
                    feature_sets: Sequence[FeatureSet], out_root: Path,
                    trust_pickles: bool = False) -> FoldBatchResult:
    """Run a batch on this process's long-lived slot (made on first use). Interrupted (Ctrl-C
    reaches the whole process group), the process ends at once: an exit would wait for a
    compile thread still running, ~30 s on a GPU."""
    try:
        return _process_slot(params_dir, settings, kind, trust_pickles).fold(feature_sets,
                                                                             out_root)
    except KeyboardInterrupt:
        exit_interrupted()
