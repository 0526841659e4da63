"""One machine: searches in a process pool under the CPU budget, one fold process per GPU.

Each fold process is a single-worker pool that lives for the whole run and keeps one
`FoldWorker` (weights, compiled functions) warm; CUDA_VISIBLE_DEVICES pins it to its GPU
before jax is imported there. Without a GPU, one fold process runs on the CPU. Processes are
spawned (never forked: the parent holds the run lock and SQLite handles) and die with the
parent, so a killed run leaves nothing running behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from parafold.engine.base import (
    Executor,
    FoldWorkerHandle,
    FoldWorkerSpec,
    JobHandle,
    Resources,
    detect_gpus,
)
from parafold.engine.jobs import fold_in_process, init_worker_process, warm_in_process
from parafold.errors import InputError
from parafold.lifecycle import run_job, starting_processes

__all__ = ["LocalExecutor"]

logger = logging.getLogger(__name__)
R = TypeVar("R")


def _worker_log_level() -> int:
    """The parent's level; on a terminal at least WARNING, so workers' lines do not break up
    the progress bars (their output does not go through rich)."""
    level = logging.getLogger().getEffectiveLevel()
    return max(level, logging.WARNING) if sys.stderr.isatty() else level


class _ProcessFoldWorker(FoldWorkerHandle):
    def __init__(self, spec: FoldWorkerSpec, kind: str, env: dict[str, str]) -> None:
        self.name = kind
        self.platform = "cpu" if kind == "cpu" else "gpu"
        self._spec = spec
        self._env = env
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker_process,
            initargs=(self._env, _worker_log_level()),
        )

    def warm(self) -> JobHandle[Any]:
        with starting_processes():
            future = self._pool.submit(warm_in_process, self._spec.params_dir,
                                       self._spec.settings, self.name, self._spec.trust_pickles)
        return JobHandle(future, label=self.name)

    def fold(self, feature_sets: Sequence[Any], out_root: Path) -> JobHandle[Any]:
        with starting_processes():
            future = self._pool.submit(fold_in_process, self._spec.params_dir,
                                       self._spec.settings, self.name, list(feature_sets),
                                       out_root, self._spec.trust_pickles)
        return JobHandle(future, label=self.name)

    def restart(self) -> None:
        logger.warning("fold worker %s died; starting a new one", self.name)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def release(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LocalExecutor(Executor):
    """CPU jobs in a spawn process pool of `cpus` slots; fold workers per visible GPU.

    Args:
        cpus: the CPU budget for search jobs.
        gpus: device ids to use; None detects them, () means no GPU (one CPU fold worker).
    """

    name = "local"

    def __init__(self, *, cpus: int, gpus: tuple[str, ...] | None = None) -> None:
        if cpus < 1:
            raise InputError(f"--cpus must be >= 1, got {cpus}")
        self._cpus = cpus
        self._gpus = detect_gpus() if gpus is None else gpus
        self._pool: cf.ProcessPoolExecutor | None = None
        self._fold_workers: list[_ProcessFoldWorker] = []

    @property
    def gpus(self) -> tuple[str, ...]:
        return self._gpus

    def _cpu_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self._cpus, mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker_process,
                initargs=({}, _worker_log_level()),
            )
        return self._pool

    def submit(self, fn: Callable[..., R], *args: Any, resources: Resources) -> JobHandle[R]:
        with starting_processes():  # a pool starts its processes in submit
            try:
                future = self._cpu_pool().submit(run_job, fn, *args)
            except BrokenProcessPool:
                # A worker died (killed, out of memory): its jobs failed; later ones get a
                # new pool.
                logger.warning("a search worker died; starting a new process pool")
                assert self._pool is not None
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                future = self._cpu_pool().submit(run_job, fn, *args)
        return JobHandle(future, label=getattr(fn, "__name__", "job"))

    def cpu_capacity(self) -> int:
        return self._cpus

    def start_fold_workers(self, spec: FoldWorkerSpec) -> list[FoldWorkerHandle]:
        if self._gpus:
            for gpu in self._gpus:
                self._fold_workers.append(
                    _ProcessFoldWorker(spec, f"gpu{gpu}", {"CUDA_VISIBLE_DEVICES": gpu}))
        else:
            self._fold_workers.append(_ProcessFoldWorker(
                spec, "cpu", {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}))
        return list(self._fold_workers)

    def describe(self) -> str:
        where = f"GPUs {','.join(self._gpus)}" if self._gpus else "no GPU (CPU fold worker)"
        return f"local engine: {self._cpus} CPUs for searches, {where}"

    def shutdown(self) -> None:
        for worker in self._fold_workers:
            worker.shutdown()
        self._fold_workers.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
