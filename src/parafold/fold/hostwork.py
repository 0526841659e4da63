"""Host work off the GPU's critical path: feature processing and file writing in background
processes, and a meter of how busy the device was.

At 0.06-0.2 s of device time per protein, `process_features` (~0.15 s) and writing PDB, mmCIF
and JSON files would leave the GPU idle most of the time if they ran between launches. They run
in spawned processes instead (spawn, not fork: the parent holds a CUDA context); the children
are pinned to the CPU backend so none of them touches the GPU. With 0 workers a pool runs its
work inline, which tests and CPU-only runs use.

Imports stay light here: a spawned child imports this module before it is told which backend
it may use.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import multiprocessing
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from parafold.featureset import FeatureSet
from parafold.fold.buckets import ShapeKey
from parafold.fold.settings import ModelSettings
from parafold.lifecycle import starting_processes
from parafold.relax import relax_target

__all__ = ["HostPools", "BusyMeter", "process_job", "write_job", "relax_job", "auto_workers",
           "feature_helpers", "host_cores", "MAX_FEATURE_HELPERS"]

log = logging.getLogger(__name__)


def _child_init() -> None:
    """A feature or writer helper (`lifecycle.helper_process_init`): a killed run leaves no
    writer behind, and Ctrl-C is the worker's to handle."""
    from parafold.lifecycle import helper_process_init

    helper_process_init()


def process_job(fs: FeatureSet, model_name: str, settings: ModelSettings, key: ShapeKey,
                seed: int, trust_pickles: bool) -> tuple[dict[str, np.ndarray], float]:
    """Load one target's raw features and process them for one model at `key`; seconds too."""
    from parafold.fold.config import model_config
    from parafold.fold.processing import process_features

    started = time.perf_counter()
    raw = fs.load(trust_pickles=trust_pickles)
    cfg = model_config(model_name, settings, clusters=key.clusters, extra=key.extra,
                       templates=key.templates, pallas={"use_pallas": False},
                       low_memory=key.low_memory)
    feats = process_features(raw, cfg, key, seed)
    return feats, time.perf_counter() - started


def write_job(folder: Path, name: str, predictions: list[Any], timings: dict[str, float],
              save_raw: bool, relax: str = "none", index: Any = None,
              feature_set: Any = None, fingerprint: str | None = None) -> list[str]:
    """Every output file of one target (atomic writes), then the relaxation `relax` asks for
    (`parafold.relax`; its failure raises `RelaxError` after the prediction's files are
    complete), then its entry in the prediction `index` (`fold.reuse`) when there is one;
    prediction names best first."""
    from parafold.fold.outputs import write_target_outputs

    ranked = write_target_outputs(folder, name, predictions, timings, save_raw=save_raw,
                                  fingerprint=fingerprint)
    if relax != "none":
        relax_target(folder, relax)
    if index is not None:
        index.record(feature_set, folder)
    return ranked


def relax_job(folder: Path, relax: str, index: Any = None, feature_set: Any = None) -> Any:
    """Relax a target predicted before (`parafold.relax`), then record it in the prediction
    `index` when there is one: the index is keyed by settings that include the relaxation,
    so only now does it hold what a later run with these settings would copy."""
    outcome = relax_target(folder, relax)
    if index is not None:
        index.record(feature_set, folder)
    return outcome


def auto_workers(configured: int | None, platform: str, *, gpu_default: int) -> int:
    """The configured count, else `gpu_default` on an accelerator (bounded by the cores the
    GPU-stage process leaves), else 0 (inline) on the CPU, where helpers only steal cores."""
    if configured is not None:
        return configured
    if platform == "cpu":
        return 0
    return max(1, min(gpu_default, host_cores() - 2))


MAX_FEATURE_HELPERS = 16  # each holds a target's features (~0.1-0.5 GB with a deep MSA)


def feature_helpers(cores: int) -> int:
    """Feature-processing helpers for one GPU that has `cores` host cores: all but 3 (the
    fold loop, the file writers, the rest of the system), at most `MAX_FEATURE_HELPERS`.
    Processing one protein for one model takes 0.3 s with a shallow MSA and 1.5-7 s with a
    deep one (`benchmarks/host_features.py`, one core) while the GPU takes 0.1-0.5 s, so a
    GPU fed by a few helpers waits on deep MSAs."""
    return max(1, min(MAX_FEATURE_HELPERS, cores - 3))


def host_cores() -> int:
    """Cores this process may run on (a Slurm or container CPU set, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 2


class _Inline(cf.Executor):
    """An executor that runs each call at submit time (0 workers)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # delivered through the future, as a pool would
            future.set_exception(exc)
        return future


def _marked(marker: str, fn: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
    """In a helper: note that the job started (`_RestartingPool` blames only started jobs for
    a helper's death), then run it."""
    Path(marker).touch()
    return fn(*args, **kwargs)


class _RestartingPool(cf.Executor):
    """A spawn process pool that replaces itself once broken.

    A helper killed (say by the OOM killer) breaks the whole pool: every job in it fails, not
    only the killed one's. A job that had not started is simply run again in fresh helpers; a
    job that had started (the killed one, or one beside it) runs once more, and fails if that
    pool breaks too: the job that kills its helper each time fails alone. Whether a job started
    is a marker file it touches first (a few microseconds)."""

    _MAX_SUBMITS = 6  # a pool that breaks before any job starts (bad helper start-up) ends too

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._lock = threading.Lock()  # the pool is replaced from its callbacks' threads too
        self._markers = Path(tempfile.mkdtemp(prefix="parafold-jobs-"))
        self._count = itertools.count()
        self._pool = self._new()

    def _new(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self._workers, initializer=_child_init,
                                      mp_context=multiprocessing.get_context("spawn"))

    def _submit_to_pool(self, *args: Any) -> cf.Future[Any]:
        with self._lock, starting_processes():  # the pool starts its helpers in submit
            try:
                return self._pool.submit(_marked, *args)
            except BrokenProcessPool:
                log.warning("a helper process died; starting new helpers")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new()
                return self._pool.submit(_marked, *args)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        job: cf.Future[Any] = cf.Future()
        marker = self._markers / str(next(self._count))
        started_before = submits = 0

        def attempt() -> None:
            nonlocal submits
            submits += 1
            self._submit_to_pool(str(marker), fn, args, kwargs).add_done_callback(settle)

        def settle(done: cf.Future[Any]) -> None:
            nonlocal started_before
            started = marker.is_file()
            marker.unlink(missing_ok=True)
            if done.cancelled():
                job.cancel()
                return
            exc = done.exception()
            if (isinstance(exc, BrokenProcessPool) and started_before + started < 2
                    and submits < self._MAX_SUBMITS):
                started_before += started
                try:  # its helper, or another's, died: in fresh helpers
                    attempt()
                except Exception as again:  # e.g. the pool was shut down meanwhile
                    job.set_exception(again)
            elif exc is not None:
                job.set_exception(exc)
            else:
                job.set_result(done.result())

        attempt()
        return job

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pool = self._pool
        pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            shutil.rmtree(self._markers, ignore_errors=True)


class HostPools:
    """A feature-processing pool and a file-writing pool, started on first use."""

    def __init__(self, feature_workers: int, write_workers: int) -> None:
        self.feature_workers = feature_workers
        self.write_workers = write_workers
        self._features: cf.Executor | None = None
        self._writes: cf.Executor | None = None

    @staticmethod
    def _make(workers: int) -> cf.Executor:
        if workers == 0:
            return _Inline()
        return _RestartingPool(workers)

    def features(self) -> cf.Executor:
        if self._features is None:
            self._features = self._make(self.feature_workers)
            log.info("feature processing: %s", self.feature_workers or "inline")
        return self._features

    def writes(self) -> cf.Executor:
        if self._writes is None:
            self._writes = self._make(self.write_workers)
            log.info("output writing: %s", self.write_workers or "inline")
        return self._writes

    def close(self) -> None:
        for pool in (self._features, self._writes):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._features = self._writes = None


class BusyMeter:
    """Device busy time: the union of [dispatch, ready] over launches.

    A watcher thread waits for each launch's outputs in dispatch order (the device runs them in
    that order), so a ready time is when the device finished, not when the host looked. A launch
    queued behind another starts counting when the one before it was ready.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[float, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._spans: list[tuple[float, float]] = []  # [begin, ready], disjoint, in order
        self._last_ready = 0.0

    def watch(self, started: float, outputs: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="busy-meter", daemon=True)
            self._thread.start()
        self._queue.put((started, outputs))

    def _run(self) -> None:
        import jax

        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                started, outputs = item
                try:
                    jax.block_until_ready(outputs)
                except Exception:  # the fetch reports the failure; here only time counts
                    log.debug("a watched launch failed", exc_info=True)
                ready = time.perf_counter()
                with self._lock:
                    begin = max(started, self._last_ready)
                    if ready > begin:
                        self._spans.append((begin, ready))
                    self._last_ready = max(ready, self._last_ready)
            finally:
                self._queue.task_done()

    def busy_s(self, until: float | None = None) -> float:
        """Busy seconds so far, after every watched launch is ready; with `until` (a
        `perf_counter` time), only those before it (a run stopped there: the launches in
        flight then still finish, but after the wall time it is measured over)."""
        self._queue.join()
        end = float("inf") if until is None else until
        with self._lock:
            return sum(max(0.0, min(ready, end) - begin) for begin, ready in self._spans)
