"""The run's event loop: keep the CPU budget full of searches and every fold worker busy.

One thread, one writer of the ledger. Searches are admitted up to the executor's CPU capacity
(so `searching` in the ledger means running, not waiting in a queue); in MMseqs2 mode every
queued target goes into one batch job with all the CPUs, since MMseqs2 gains from many queries
per database pass. Finished feature sets go to a ready list grouped by shape key; an idle fold
worker gets a full group at once, or a group once it has waited `max_wait_s` or no more
searches are coming, preferring shapes it has compiled already (see `_choose_batch`). A
finished target's plots are drawn by a small CPU job, so the fold worker goes straight on to
its next batch.

Targets with identical features (`fold.twins`) are predicted once: a twin whose source is
ready or being predicted waits for it, and then a small CPU job copies the source's files.
When the source fails for a reason of its own, its first twin is predicted itself and the
others wait for that one; when it fails too, they fail with it.

A fold worker that cannot work (it fails to start, or fails batches in a row for reasons of
its own) is taken out of rotation and its batch goes to another worker; with no worker left,
what remains fails with the cause, so a run never waits for a worker that will not come.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parafold.engine.base import Executor, FoldWorkerHandle, FoldWorkerSpec, Resources
from parafold.engine.jobs import (
    FoldBatchResult,
    SearchOutcome,
    copy_job,
    describe_error,
    plots_job,
    search_batch_job,
    search_job,
)
from parafold.errors import (
    FeatureError,
    InferenceError,
    PipelineError,
    is_storage_full,
    storage_full_advice,
)
from parafold.featureset import FeatureSet
from parafold.fold.reuse import PredictionIndex
from parafold.inputs import Target
from parafold.ledger import Ledger, State
from parafold.lifecycle import DRAIN_ADVICE, drain_requested

if TYPE_CHECKING:
    from parafold.pipeline import RunSettings

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)
_TICK_S = 1.0
# About one compile of a shape on a GPU (25-29 s): a group waits no longer than this for the
# worker that has its shape compiled, since compiling it elsewhere would cost no more.
_COMPILE_S = 30.0
# Groups (of up to `max_batch` each) the last idle fold worker takes in one call.
_GROUPS_PER_CALL = 4
# A worker that fails this many batches in a row, for reasons not the targets' own, is broken.
_RETIRE_AFTER = 2
# Host cores a run's GPU fold worker gives its feature helpers when not configured: the
# searches use the cores (`predict` alone gives a GPU all but 3 of them). 7 -> 4 helpers.
RUN_HELPER_CORES = 7
# A target whose batch failed this many times fails itself: a batch that kills any worker it
# is given (say, a target too large for the host's memory) must not take them all out.
_TRIES = 2


class Scheduler:
    """Drives one run from the plan made at start-up to the last prediction."""

    def __init__(self, settings: RunSettings, ledger: Ledger, run_id: int, executor: Executor,
                 databases: Any, to_search: Sequence[Target], ready: Sequence[FeatureSet], *,
                 total: int, done_before: int, failed_before: int = 0,
                 done_sources: Mapping[str, str] | None = None) -> None:
        """`done_sources`: twin key -> a target with that key predicted before this run."""
        self.settings = settings
        self.ledger = ledger
        self.run_id = run_id
        self.executor = executor
        self.databases = databases
        self.pending: deque[Target] = deque(to_search)
        self.searching: dict[cf.Future[Any], tuple[Target, ...]] = {}
        # Searches that died rather than failed (`_search_again`): a killed tool (most likely
        # out of memory among the searches beside it) is searched again alone, once, with no
        # other search running; a dead worker's targets are queued again, behind the others.
        self._alone: deque[Target] = deque()
        self._searched_alone: set[str] = set()
        self._requeued: set[str] = set()  # queued again once after their worker died
        self._searching_alone: cf.Future[Any] | None = None
        self.ready: dict[str, tuple[FeatureSet, float]] = {}
        # future -> (worker, batch, batch number, when its oldest member became ready)
        self.folding: dict[cf.Future[Any],
                           tuple[FoldWorkerHandle, list[FeatureSet], int, float]] = {}
        self.plotting: dict[cf.Future[Any], str] = {}
        self.copying: dict[cf.Future[Any], tuple[FeatureSet, str]] = {}  # -> (twin, source)
        # Twins (`fold.twins`): twin key -> the target predicting it (ready or predicting) ...
        self._sources: dict[str, str] = {}
        self._source_keys: dict[str, str] = {}  # ... and back
        # ... or the folder holding it: done in this run or before, or in another OUT
        # sharing the cache (`fold.reuse`)
        self._done_paths: dict[str, Path] = {key: settings.out / name
                                             for key, name in (done_sources or {}).items()}
        self._done_stamps: dict[Path, list[int | None]] = {}  # another OUT's, as indexed
        # where the fold workers' writers record their predictions, and this looks them up
        self._prediction_cache = settings.model.prediction_cache_dir or settings.resolved_cache_dir
        self.index = PredictionIndex.for_settings(self._prediction_cache, settings.model,
                                                  settings.params_dir)
        self._parked: dict[str, list[FeatureSet]] = {}  # source name -> twins waiting for it
        self._second_try: set[str] = set()  # twin keys whose first source failed
        self.idle: list[FoldWorkerHandle] = []
        self.retired: dict[str, str] = {}  # worker name -> why it is out of rotation
        self._warming: dict[cf.Future[Any], FoldWorkerHandle] = {}
        self._fold_spec: FoldWorkerSpec | None = None  # set by `run`
        self._fold_workers_started = False
        self._shapes: dict[str, set[Any]] = {}  # worker name -> shapes it has been given
        self._streak: dict[str, set[int]] = {}  # worker name -> batches failed in a row
        self._failed_in: dict[str, int] = {}  # target -> the batch it first failed in
        self._failed_on: dict[str, list[str]] = {}  # target -> workers that failed its batch
        self.total = total
        self.featured = done_before + len(ready)
        self.finished = done_before + failed_before
        self.searched = 0  # features made by a search in this run
        self.from_cache = 0  # features this run took from the (shared) cache: no search
        self.predicted = 0
        self.copied = 0
        self.search_peak: tuple[float, str] = (0.0, "")  # the most memory a search tool took
        self.failed = failed_before
        self.search_failed = 0
        self.search_cpus = settings.search_cpus
        self._stats: dict[str, dict[str, Any]] = {}
        self._batches = 0
        self._key_cache: dict[str, Any] = {}
        # Why the run stops early (a disk full, a quota spent, a drain asked for with
        # SIGUSR1): nothing new starts, the work in flight finishes, and what waits stays
        # queued or ready for a rerun; `stop_advice` says what to do first.
        self.stopped: str | None = None
        self.stop_advice = ""
        self._draining = False  # stopped by a drain: copies of finished sources still go on
        now = time.time()
        for fs in ready:
            self._admit(fs, now)

    # --- the loop ---

    def run(self) -> None:
        model = self.settings.model
        if model.helper_cores is None:  # the searches use the cores: a few feature helpers
            model = replace(model, helper_cores=RUN_HELPER_CORES)
        model = replace(model, prediction_cache_dir=self._prediction_cache)
        self._fold_spec = FoldWorkerSpec(self.settings.params_dir, model)
        if self.ready or self.pending or self._parked:
            self._start_fold_workers()
        capacity = self.executor.cpu_capacity()
        # Never ask for more CPUs per search than one job can get (on Ray: on one node, less
        # what a fold actor holds there), or the search could never start.
        self.search_cpus = max(1, min(self.settings.search_cpus, self.executor.max_job_cpus()))
        slots = max(1, capacity // self.search_cpus)
        with _Progress(self) as progress:
            while self._work_left():
                drain = drain_requested()
                if drain is not None:
                    self._drain(drain)
                self._submit_searches(slots)
                self._dispatch_folds()
                progress.update()
                futures = [*self.searching, *self.folding, *self.plotting, *self.copying,
                           *self._warming]
                timeout = self._timeout()
                if not futures:
                    time.sleep(timeout)
                    continue
                done, _ = cf.wait(futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
                # Start failures first: a batch the worker failed meanwhile is then its fault.
                for future in sorted(done, key=lambda f: f not in self._warming):
                    if future in self._warming:
                        self._warm_finished(future)
                    elif future in self.searching:
                        self._search_finished(future)
                    elif future in self.plotting:
                        self._plots_finished(future)
                    elif future in self.copying:
                        self._copy_finished(future)
                    else:
                        self._fold_finished(future)
        self._fail_stranded_twins()

    def _fail_stranded_twins(self) -> None:
        """Twins still waiting for a source once nothing runs (a path that forgot to release
        them): failed with the reason, never left features_ready without a word. A stopped
        run keeps them ready for the rerun."""
        if self.stopped is not None:
            return
        for source, twins in self._parked.items():
            self._fail_twins(twins, f"same features as {source}, which never finished")
        self._parked.clear()

    def _fail_twins(self, twins: list[FeatureSet], why: str) -> None:
        for fs in twins:
            logger.warning("%s: %s", fs.name, why)
            self.ledger.fail(fs.name, "predict", why)
            self.failed += 1
            self.finished += 1

    def _start_fold_workers(self) -> None:
        """Once, when the run first has something to predict: at the start, or later when
        it started with copies only and one failed (its target is then predicted itself)."""
        if self._fold_spec is None or self._fold_workers_started:
            return
        self._fold_workers_started = True
        self.idle = list(self.executor.start_fold_workers(self._fold_spec))
        for worker in self.idle:  # imports and weights load while the first searches run
            self._warming[worker.warm().future] = worker

    def _work_left(self) -> bool:
        if self.stopped is not None:  # only what is in flight
            return bool(self.searching or self.folding or self.plotting or self.copying)
        return bool(self.pending or self._alone or self.searching or self.ready
                    or self.folding or self.plotting or self.copying)

    def _stop(self, reason: str, advice: str) -> None:
        """Start nothing more: a disk full or a quota spent would fail every target after;
        a drain leaves the job's time to the work in flight."""
        if self.stopped is None:
            self.stopped, self.stop_advice = reason, advice
            logger.error("stopping the run: %s. The work in flight finishes; the rest waits "
                         "for a rerun", reason)

    def _drain(self, reason: str) -> None:
        """SIGUSR1: stop as `_stop` does, but let the copies of sources that finish go on."""
        if self.stopped is None:
            self._draining = True
        self._stop(reason, DRAIN_ADVICE)

    def compiles(self) -> int | None:
        counts = [v for s in self._stats.values() for k, v in s.items()
                  if isinstance(v, int) and k in ("compiles", "compile_count", "n_compiles")]
        return sum(counts) if counts else None

    # --- searches ---

    @property
    def _batch_searches(self) -> bool:
        """MMseqs2 mode: every queued target goes into one search job with every CPU."""
        return getattr(self.settings.search, "msa_mode", "classic") == "mmseqs"

    @property
    def _searches_left(self) -> bool:
        """Whether more feature sets may still come from searches."""
        return bool(self.pending or self._alone or self.searching)

    def _search_again(self, target: Target, outcome: SearchOutcome) -> bool:
        """Queue again a search that died rather than failed; False: it fails.

        A search worker that dies (killed, out of memory) takes every search of its process
        pool with it, most of them innocent: each is queued again, once. A search tool killed
        by SIGKILL, or a target whose worker died twice, is searched again alone (the memory
        of the searches beside it is the likely cause), once; dying alone, it fails. An MMseqs2
        batch (every CPU already) is queued again once, on a worker's death only.
        """
        name = target.name
        fresh = name not in self._searched_alone  # else it died alone: it fails
        if outcome.worker_died and name not in self._requeued and fresh:
            logger.warning("%s: %s; it is searched again", name, outcome.error)
            self._requeued.add(name)
            self.pending.append(target)
        elif outcome.died and fresh and not self._batch_searches:
            logger.warning("%s: search killed, most likely for want of memory among the "
                           "searches beside it; it runs again alone: %s", name, outcome.error)
            self._searched_alone.add(name)
            self._alone.append(target)
        else:
            return False
        self.ledger.reconcile(name, State.QUEUED)
        return True

    @property
    def n_searching(self) -> int:
        """Targets whose search job is running (a batch job counts all of its targets)."""
        return sum(len(targets) for targets in self.searching.values())

    def _submit_searches(self, slots: int) -> None:
        if self.stopped is not None:
            return
        if self.retired and not self._live_workers():  # its features could never be folded
            return
        if self._batch_searches:
            self._submit_search_batch()
            return
        if self._alone or self._searching_alone:
            if self._alone and not self.searching:
                self._submit_search(self._alone.popleft(), alone=True)
            return
        while self.pending and len(self.searching) < slots:
            self._submit_search(self.pending.popleft())

    def _submit_search(self, target: Target, *, alone: bool = False) -> None:
        s = self.settings
        self.ledger.start_search(target.name)
        # Alone, the job asks for every CPU, so that no other job shares its node's memory
        # on an engine that places jobs by their CPUs (Ray).
        cpus = self.executor.max_job_cpus() if alone else self.search_cpus
        handle = self.executor.submit(
            search_job, target, s.out, self.databases, s.search, self.search_cpus,
            s.resolved_cache_dir, resources=Resources(cpus=cpus))
        self.searching[handle.future] = (target,)
        if alone:
            self._searching_alone = handle.future
            logger.info("%s: searching again, alone", target.name)

    def _submit_search_batch(self) -> None:
        """Every queued target in one MMseqs2 job sized with the largest CPU share a job can get."""
        if not self.pending or self.searching:
            return
        s = self.settings
        targets = tuple(self.pending)
        self.pending.clear()
        for target in targets:
            self.ledger.start_search(target.name)
        cpus = self.executor.max_job_cpus()
        logger.info("mmseqs: %d targets in one search batch on %d CPUs", len(targets), cpus)
        handle = self.executor.submit(
            search_batch_job, targets, s.out, self.databases, s.search, cpus,
            s.resolved_cache_dir, s.shard, resources=Resources(cpus=cpus))
        self.searching[handle.future] = targets

    def _search_finished(self, future: cf.Future[Any]) -> None:
        targets = self.searching.pop(future)
        if future is self._searching_alone:
            self._searching_alone = None
        now = time.time()
        try:
            result = future.result()
            outcomes = {o.name: o for o in (result if isinstance(result, list) else [result])}
        except Exception as exc:  # the worker itself died (killed, out of memory)
            reason = f"search worker died: {describe_error(exc)}"
            result = None
            outcomes = {t.name: SearchOutcome(t.name, None, reason, "?", now, now,
                                              worker_died=True) for t in targets}
        # One batch number on every event of a batch job: the timeline shows it as one job.
        batch_no = self._next_batch() if isinstance(result, list) or len(targets) > 1 else None
        for target in targets:
            outcome = outcomes.get(target.name) or SearchOutcome(
                target.name, None, "no result from the search job", "?", now, now)
            self._target_searched(target, outcome, batch_no)

    def _target_searched(self, target: Target, outcome: SearchOutcome,
                         batch_no: int | None) -> None:
        now = time.time()
        self.ledger.add_event(run_id=self.run_id, worker=outcome.worker, kind="search",
                              target=target.name, start=outcome.start, end=outcome.end,
                              ok=outcome.ok, batch=batch_no)
        if outcome.stopped_early:  # not the target's fault: it waits for the rerun
            self.ledger.reconcile(target.name, State.QUEUED)
            self._stop(outcome.error, storage_full_advice(self.settings.out))
            return
        if outcome.feature_set is None and self._search_again(target, outcome):
            return
        if outcome.feature_set is None:
            error = outcome.error
            if outcome.died and target.name in self._searched_alone:
                error = f"killed again when searching alone (too little memory?): {error}"
            logger.warning("%s: search failed: %s", target.name, error)
            self.ledger.fail(target.name, "search", error)
            self.failed += 1
            self.search_failed += 1
            self.finished += 1
            return
        fs = outcome.feature_set
        peak = fs.extra.get("search_max_rss_mib")
        self.ledger.features_ready(target.name, {
            "wall_s": round(outcome.end - outcome.start, 3), "worker": outcome.worker,
            "tool_calls": fs.extra.get("tool_calls"), "reused": fs.extra.get("reused"),
            "max_rss_mib": peak})
        if peak and peak > self.search_peak[0]:
            self.search_peak = (peak, target.name)
        if fs.extra.get("reused"):
            self.from_cache += 1
        else:
            self.searched += 1
        self.featured += 1
        self._admit(fs, now)

    # --- predictions ---

    def _shape(self, fs: FeatureSet) -> Any:
        key = self._key_cache.get(fs.name)
        if key is None:
            from parafold.fold.buckets import shape_key

            model = self.settings.model
            key = shape_key(fs.length, fs.msa_depth, model.model_names[0], model,
                            templates=fs.num_templates > 0)
            self._key_cache[fs.name] = key
        return key

    @property
    def starve_s(self) -> float:
        """How long a group may wait for the worker that has its shape compiled (at least
        twice `max_wait_s`, so that groups waiting to fill are not all "starved")."""
        return max(_COMPILE_S, 2 * self.settings.max_wait_s)

    def _live_workers(self) -> list[FoldWorkerHandle]:
        """Workers in rotation: idle ones, and busy ones not retired meanwhile."""
        busy = [w for w, *_ in self.folding.values() if w.name not in self.retired]
        return [*self.idle, *busy]

    def _may_take(self, worker: FoldWorkerHandle, name: str, live: set[str]) -> bool:
        """A target whose batch failed on `worker` goes to another live worker if there is one
        (else the same worker may try again)."""
        failed = self._failed_on.get(name)
        return not failed or worker.name not in failed or live <= set(failed)

    def _choose_batch(self) -> tuple[FoldWorkerHandle, list[FeatureSet]] | None:
        """The idle worker to use now and the group it takes, or None to wait for groups to fill.

        A group may go once it is full, has waited `max_wait_s`, or nothing more is coming.
        Compiling a shape costs each worker ~25-29 s on a GPU, so a worker prefers a group of
        a shape it has run (or one its worker will run in a bigger shape it has run, because
        the padding costs less than a compile: `buckets.merge_groups`), then one of a shape no
        other live worker has run, then the oldest (it never idles while a group may go); a
        group that has waited `starve_s` goes to the first idle worker regardless.
        """
        s, now = self.settings, time.time()
        more_coming = self._searches_left
        live = self._live_workers()
        live_names = {w.name for w in live}
        best: tuple[tuple[Any, ...], FoldWorkerHandle, list[tuple[FeatureSet, float]], int] | None
        best = None
        due: set[Any] = set()  # shapes with a group that may go now
        for i, worker in enumerate(self.idle):
            for shape, group in self._ready_groups(worker, live_names).items():
                oldest = min(since for _, since in group)
                if not self._may_go(group, now, more_coming):
                    continue
                due.add(shape)
                affinity = self._affinity(worker, shape, group, live)
                # Starved groups first, oldest first; then by affinity, then by age.
                rank = ((0, oldest, affinity, i) if now - oldest >= self.starve_s
                        else (1, affinity, oldest, i))
                if best is None or rank < best[0]:
                    best = (rank, worker, group, affinity)
        if best is None:
            return None
        _, worker, chosen, affinity = best
        size = s.max_batch
        if len(chosen) < size and affinity > 0:
            # Nothing more of this shape soon and no worker has it compiled: share it out
            # over the idle workers that no other group due now will occupy.
            size = math.ceil(len(chosen) / max(1, len(self.idle) - len(due) + 1))
        chosen.sort(key=lambda item: item[1])
        return worker, [fs for fs, _ in chosen[:size]]

    def _companions(self, worker: FoldWorkerHandle, batch: list[FeatureSet]
                    ) -> list[FeatureSet]:
        """Other groups that may go now, for the last idle worker to take in the same fold call
        (oldest first, up to `_GROUPS_PER_CALL` x `max_batch` targets in all, each group at most
        `max_batch`): planned together, the worker merges their shapes into fewer (a compile
        costs a GPU ~25-30 s) and compiles the next while it runs the first. With another
        worker idle, each takes its own group instead; a group of a shape another live worker
        has compiled waits for that worker, as in `_choose_batch` (unless starved). Targets of
        a batch that failed before go without companions, and are no one's companion: a batch
        that kills its worker fails all of its targets at their second try."""
        s, now = self.settings, time.time()
        if len(self.idle) != 1 or any(fs.name in self._failed_on for fs in batch):
            return []
        taken = {fs.name for fs in batch}
        chosen = self._shape(batch[0])  # more of its shape: the next call (or another worker)
        live = self._live_workers()
        more_coming = self._searches_left
        groups = self._ready_groups(
            worker, {w.name for w in live},
            keep=lambda fs: (fs.name not in taken and fs.name not in self._failed_on
                             and self._shape(fs) != chosen))
        room = s.max_batch * _GROUPS_PER_CALL - len(batch)
        extra: list[FeatureSet] = []
        for shape, group in sorted(groups.items(), key=lambda g: min(t for _, t in g[1])):
            oldest = min(since for _, since in group)
            if not self._may_go(group, now, more_coming):
                continue  # still filling
            if (now - oldest < self.starve_s
                    and self._affinity(worker, shape, group, live) == 2):
                continue  # another worker has it compiled
            group.sort(key=lambda item: item[1])
            extra.extend(fs for fs, _ in group[:min(s.max_batch, room - len(extra))])
            if len(extra) >= room:
                break
        return extra

    def _ready_groups(self, worker: FoldWorkerHandle, live_names: set[str],
                      keep: Callable[[FeatureSet], bool] | None = None
                      ) -> dict[Any, list[tuple[FeatureSet, float]]]:
        """Ready targets `worker` may take (and `keep` keeps), with their ready times, by
        shape."""
        groups: dict[Any, list[tuple[FeatureSet, float]]] = {}
        for fs, since in self.ready.values():
            if self._may_take(worker, fs.name, live_names) and (keep is None or keep(fs)):
                groups.setdefault(self._shape(fs), []).append((fs, since))
        return groups

    def _may_go(self, group: list[tuple[FeatureSet, float]], now: float,
                more_coming: bool) -> bool:
        """A group goes once it is full, has waited `max_wait_s`, or nothing more is coming."""
        s = self.settings
        return (not more_coming or len(group) >= s.max_batch
                or now - min(since for _, since in group) >= s.max_wait_s)

    def _affinity(self, worker: FoldWorkerHandle, shape: Any,
                  group: list[tuple[FeatureSet, float]], live: list[FoldWorkerHandle]) -> int:
        """0: the worker runs the group warm (its shape, or a bigger shape it has compiled that
        the group rides in); 1: no other live worker has the shape; 2: another one has."""
        own = self._shapes.get(worker.name, set())
        if shape in own or self._runs_in(worker, shape, group, own):
            return 0
        others = set().union(*(self._shapes.get(w.name, ()) for w in live if w is not worker))
        return 2 if shape in others else 1

    def _runs_in(self, worker: FoldWorkerHandle, shape: Any,
                 group: list[tuple[FeatureSet, float]], compiled: set[Any]) -> bool:
        """The worker would run this group in a bigger shape it has compiled (it decides the
        same way, `FoldWorker.group`)."""
        from parafold.fold.buckets import plan_merges
        from parafold.fold.costs import shape_costs

        if not compiled:
            return False
        costs = shape_costs(self.settings.model, getattr(worker, "platform", "cpu"))
        _, dest = plan_merges([(fs.length, fs.msa_depth, fs.num_templates > 0)
                               for fs, _ in group], self.settings.model,
                              compile_s=costs.group_compile_s, run_s=costs.run_s,
                              available=compiled)
        return dest.get(shape, shape) != shape

    def _dispatch_folds(self) -> None:
        if self.stopped is not None:
            return
        if self.ready:
            self._start_fold_workers()
        if self.retired and not self._live_workers():
            self._fail_without_workers()
            return
        while self.idle and self.ready:
            choice = self._choose_batch()
            if choice is None:
                return
            worker, batch = choice
            batch += self._companions(worker, batch)
            self.idle.remove(worker)
            since = min(self.ready.pop(fs.name)[1] for fs in batch)
            self._shapes.setdefault(worker.name, set()).add(self._shape(batch[0]))
            self.ledger.start_predict([fs.name for fs in batch])
            batch_no = self._next_batch()
            try:
                future = worker.fold(batch, self.settings.out).future
            except Exception as exc:  # e.g. its process died while idle (BrokenProcessPool):
                future = cf.Future()  # handled as a failed batch, so the worker is restarted
                future.set_exception(exc)
            self.folding[future] = (worker, batch, batch_no, since)
            logger.debug("batch %d (%d targets) to %s", batch_no, len(batch), worker.name)

    def _fold_finished(self, future: cf.Future[Any]) -> None:
        worker, batch, batch_no, since = self.folding.pop(future)
        now = time.time()
        try:
            result: FoldBatchResult = future.result()
        except Exception as exc:  # the batch failed as a whole
            if is_storage_full(exc):  # not the batch's fault: it waits for the rerun
                self._back_in_rotation(worker)
                self.ledger.requeue_predict([fs.name for fs in batch])
                self._stop(describe_error(exc), storage_full_advice(self.settings.out))
            elif _is_target_error(exc):
                reason = describe_error(exc)
                logger.error("a batch of %d failed on %s: %s", len(batch), worker.name, reason)
                self._back_in_rotation(worker)
                for fs in batch:
                    self._fold_failed(fs.name, reason, worker.name, now, batch_no)
            else:
                self._worker_failed(worker, batch, batch_no, since, exc)
            return
        self._streak.pop(worker.name, None)
        self._back_in_rotation(worker)
        self._stats[worker.name] = result.stats
        if result.shapes:  # what it really compiled: a merged group ran in a bigger shape
            self._shapes[worker.name] = set(result.shapes)
        by_name = {getattr(o, "name", None): o for o in result.outcomes}
        for fs in batch:
            o = by_name.get(fs.name)
            if getattr(o, "stopped_early", False):  # predicted, not written: for the rerun
                self.ledger.requeue_predict([fs.name])
                self._stop(getattr(o, "error", "") or "a disk is full",
                           storage_full_advice(self.settings.out))
                continue
            if o is None or not getattr(o, "ok", False):
                reason = getattr(o, "error", "") or "no result from the fold worker"
                self._fold_failed(fs.name, reason, result.worker, result.start, batch_no,
                                  end=result.end)
                continue
            self.ledger.done(fs.name, _outcome_timings(o))
            self.ledger.add_event(run_id=self.run_id, worker=result.worker, kind="predict",
                                  target=fs.name, start=result.start, end=result.end, ok=True,
                                  batch=batch_no)
            if not getattr(o, "skipped", False):  # not predicted before (only relaxed now)
                self.predicted += 1
            self.finished += 1
            self._submit_plots(fs.name)
            self._source_done(fs.name)

    def _back_in_rotation(self, worker: FoldWorkerHandle) -> None:
        if worker.name not in self.retired:
            self.idle.append(worker)
        else:  # retired while this batch ran
            self._release(worker)

    # --- workers that cannot work ---

    def _warm_finished(self, future: cf.Future[Any]) -> None:
        worker = self._warming.pop(future)
        try:
            future.result()
        except Exception as exc:  # it would fail every batch it is given
            self._retire(worker, f"failed to start: {describe_error(exc)}")

    def _worker_failed(self, worker: FoldWorkerHandle, batch: list[FeatureSet], batch_no: int,
                       since: float, exc: Exception) -> None:
        """The worker failed (died, lost its device), not the targets: the batch goes back to
        the ready list, for another worker if there is one. A batch that failed before is not
        held against the worker (it may be the batch's fault), and its targets fail at their
        `_TRIES`th failure."""
        reason = describe_error(exc)
        logger.error("fold worker %s failed on a batch of %d: %s", worker.name, len(batch),
                     reason)
        if worker.name in self.retired:  # it failed to start meanwhile: its fault, not theirs
            self._requeue(batch, since)
            self._release(worker)
            return
        again = any(fs.name in self._failed_on for fs in batch)
        if again:  # failing again makes it the batch's fault: its earlier failure is no
            # longer held against the worker it happened on (else killer batches retire all)
            earlier = {self._failed_in[fs.name] for fs in batch if fs.name in self._failed_in}
            for held in self._streak.values():
                held -= earlier
        for fs in batch:
            self._failed_in.setdefault(fs.name, batch_no)
            failed_on = self._failed_on.setdefault(fs.name, [])
            failed_on.append(worker.name)
            if len(failed_on) >= _TRIES:
                on = ", ".join(dict.fromkeys(failed_on))
                self._fold_failed(fs.name, f"its batch failed {len(failed_on)} times (on {on}): "
                                  f"{reason}", worker.name, time.time(), batch_no)
            else:
                self._requeue([fs], since)
        if not again:
            held = self._streak.setdefault(worker.name, set())
            held.add(batch_no)
            if len(held) >= _RETIRE_AFTER:
                self._retire(worker, f"failed {_RETIRE_AFTER} batches in a row: {reason}")
                return
        if not isinstance(exc, PipelineError):  # its process or actor died: a new one
            worker.restart()
            self._shapes.pop(worker.name, None)  # ... has compiled nothing yet
        self.idle.append(worker)

    def _requeue(self, batch: list[FeatureSet], since: float) -> None:
        """Back to the ready list with their old age, so they are not passed over."""
        self.ledger.requeue_predict([fs.name for fs in batch])
        for fs in batch:
            self.ready[fs.name] = (fs, since)

    def _retire(self, worker: FoldWorkerHandle, reason: str) -> None:
        """Out of rotation for the rest of the run, so the healthy workers run its share."""
        if worker.name in self.retired:
            return
        self.retired[worker.name] = reason
        if worker in self.idle:
            self.idle.remove(worker)
        logger.error("fold worker %s is out of rotation: %s", worker.name, reason)
        self.ledger.add_worker_event(run_id=self.run_id, worker=worker.name, kind="retired",
                                     reason=reason)
        if not any(w is worker for w, *_ in self.folding.values()):
            self._release(worker)  # else once its batch is back

    @staticmethod
    def _release(worker: FoldWorkerHandle) -> None:
        """Stop a retired worker's process or actor now, so its GPU and memory are free for
        the rest of the run (not only at its end)."""
        release = getattr(worker, "release", None)
        if release is None:
            return
        try:
            release()
        except Exception as exc:  # best effort: the run goes on without it either way
            logger.warning("could not stop fold worker %s: %s", worker.name, exc)

    def _fail_without_workers(self) -> None:
        """No worker left: fail what is queued or ready (searches running finish, and their
        targets fail here next), rather than wait for a worker that will never come."""
        names = [t.name for t in (*self.pending, *self._alone)] + list(self.ready) + [
            fs.name for twins in self._parked.values() for fs in twins]
        self._parked.clear()
        if not names:
            return
        reason = "no fold worker left: " + "; ".join(
            f"{name} {why}" for name, why in self.retired.items())
        logger.error("%s; %d targets fail", reason, len(names))
        for name in names:
            self.ledger.fail(name, "predict", reason)
        self.failed += len(names)
        self.finished += len(names)
        self.pending.clear()
        self._alone.clear()
        self.ready.clear()

    def _next_batch(self) -> int:
        """A run-unique number tying together the events of one batch job."""
        self._batches += 1
        return self.run_id * 1_000_000 + self._batches

    # --- plots ---

    def _submit_plots(self, name: str) -> None:
        if not getattr(self.settings, "plots", True):
            return
        handle = self.executor.submit(plots_job, self.settings.out / name,
                                      resources=Resources(cpus=1))
        self.plotting[handle.future] = name

    def _plots_finished(self, future: cf.Future[Any]) -> None:
        """Plots are for triage: a failure is logged (the report draws missing ones again)."""
        name = self.plotting.pop(future)
        try:
            logger.debug("%s: %d plots drawn", name, future.result())
        except Exception as exc:  # never fails the target: its prediction is done
            logger.warning("%s: plots not drawn: %s", name, describe_error(exc))

    def _fold_failed(self, name: str, reason: str, worker: str, start: float, batch_no: int,
                     *, end: float | None = None) -> None:
        logger.warning("%s: prediction failed: %s", name, reason)
        self.ledger.fail(name, "predict", reason)
        self.ledger.add_event(run_id=self.run_id, worker=worker, kind="predict", target=name,
                              start=start, end=end or time.time(), ok=False, batch=batch_no)
        self.failed += 1
        self.finished += 1
        self._source_failed(name, reason)

    # --- twins: identical features, predicted once ---

    def _admit(self, fs: FeatureSet, since: float) -> None:
        """Features ready: to the ready list; or, when the same features were predicted (in
        this run, before it, or in another OUT sharing the cache), to a copy of those files;
        or, when a target with them (its source) is ready or predicting, to wait for it."""
        key = fs.twin_key
        if key is None:
            self.ready[fs.name] = (fs, since)
            return
        own = self.settings.out / fs.name
        done = self._done_paths.get(key)
        if done is None and key not in self._sources:
            hit = self.index.find_stamped(key, not_in=own)
            if hit is not None:  # another OUT's: its copies check it has not changed since
                done, self._done_stamps[done] = hit
                self._done_paths[key] = done
        if done is not None and done != own:
            self._submit_copy(fs, done)
            return
        self._source_or_wait(fs, key, since)

    def _source_or_wait(self, fs: FeatureSet, key: str, since: float) -> None:
        """`fs` is its key's source (ready to predict), or waits for the source there is."""
        source = self._sources.setdefault(key, fs.name)
        if source == fs.name:
            self._source_keys[fs.name] = key
            self.ready[fs.name] = (fs, since)
        else:
            self._parked.setdefault(source, []).append(fs)

    def _submit_copy(self, fs: FeatureSet, folder: Path) -> None:
        # stopped, it stays features_ready for the rerun; but a drain lets a copy of a
        # finished source go on (milliseconds of work, or the job is requeued for it alone)
        if self.stopped is not None and not self._draining:
            return
        out = self.settings.out
        handle = self.executor.submit(copy_job, folder, out / fs.name, fs.name,
                                      self._done_stamps.get(folder),
                                      resources=Resources(cpus=1))
        # the ledger names a source in this OUT by its name, any other by its folder
        self.copying[handle.future] = (fs, folder.name if folder.parent == out else str(folder))

    def _source_done(self, name: str) -> None:
        key = self._source_keys.pop(name, None)
        if key is None:
            return
        if self._sources.get(key) == name:
            del self._sources[key]
        self._done_paths[key] = self.settings.out / name
        for fs in self._parked.pop(name, []):
            self._submit_copy(fs, self.settings.out / name)

    def _source_failed(self, name: str, reason: str) -> None:
        """A source's own failure is not its twins' (a damaged feature file, say): the first
        is predicted itself and the rest wait for it; a second failure fails them all."""
        key = self._source_keys.pop(name, None)
        if key is None or self._sources.get(key) != name:
            return
        del self._sources[key]
        twins = self._parked.pop(name, [])
        if not twins:
            return
        if key in self._second_try:
            self._fail_twins(twins, f"same features as {name}, which failed: {reason}")
            return
        self._second_try.add(key)
        logger.warning("%s: its twin %s failed; predicting it itself", twins[0].name, name)
        for fs in twins:  # the first becomes the source and the rest wait for it, or all are
            self._admit(fs, time.time())  # copies (another run predicted them meanwhile)

    def _copy_finished(self, future: cf.Future[Any]) -> None:
        fs, source = self.copying.pop(future)
        try:
            copied = future.result()
        except Exception as exc:
            if is_storage_full(exc):  # it stays features_ready for the rerun
                self._stop(describe_error(exc), storage_full_advice(self.settings.out))
                return
            logger.warning("%s: copying the prediction of %s failed (%s); predicting it "
                           "itself", fs.name, source, describe_error(exc))
            self._copy_failed(fs, self._copy_source(source))
            return
        key, folder = fs.twin_key, self._copy_source(source)
        if key is not None and self._done_paths.get(key) == folder \
                and folder.parent != self.settings.out:
            self._done_paths[key] = self.settings.out / fs.name  # ours now: copy from it
        self.ledger.done(fs.name, {"copied_from": source, "copy_s": round(copied.seconds, 3),
                                   "mean_plddt": copied.mean_plddt, "ptm": copied.ptm})
        self.copied += 1
        self.finished += 1
        self._submit_plots(fs.name)

    def _copy_source(self, label: str) -> Path:
        """The folder a copy's ledger label names: a name in OUT, or another OUT's folder."""
        path = Path(label)
        return path if path.is_absolute() else self.settings.out / label

    def _copy_failed(self, fs: FeatureSet, folder: Path) -> None:
        """A twin whose copy failed is predicted itself, as the source of the twins still to
        come (they wait for it, rather than each being predicted), and `folder` is not
        offered to them again (another OUT's, predicted or relaxed since it was indexed)."""
        key = fs.twin_key
        if key is not None and self._done_paths.get(key) == folder:
            del self._done_paths[key]
            self._done_stamps.pop(folder, None)
        if key is None:
            self.ready[fs.name] = (fs, time.time())
        else:
            self._source_or_wait(fs, key, time.time())

    def _timeout(self) -> float:
        """Until the next thing to do: a group's wait running out, or a progress tick. (Waits
        already over do not count: what is left of them waits for a worker, not the clock.)"""
        if not (self.idle and self.ready) or not self._searches_left:
            return _TICK_S
        now = time.time()
        left = [since + self.settings.max_wait_s - now for _, since in self.ready.values()]
        return min(_TICK_S, max(0.05, min((t for t in left if t > 0), default=_TICK_S)))


def _outcome_timings(outcome: Any) -> dict[str, Any]:
    """A prediction's entries for the ledger; None removes a copy's, left by an earlier run
    (the ledger merges them as a JSON merge patch)."""
    timings: dict[str, Any] = {"copied_from": None, "copy_s": None,
                               **(getattr(outcome, "timings", None) or {})}
    for key in ("mean_plddt", "ptm"):
        value = getattr(outcome, key, None)
        if value is not None:
            timings[key] = value
    return timings


def _is_target_error(exc: BaseException) -> bool:
    """Whether a batch's error is its targets' own (the model or their features failed), not
    the worker's (it died, lost its device, could not load its weights)."""
    cause = getattr(exc, "cause", None)  # Ray wraps a task's own exception
    if isinstance(cause, BaseException) and cause is not exc:
        return _is_target_error(cause)
    return isinstance(exc, InferenceError | FeatureError)


class _Progress:
    """Two bars (features, structures) on a terminal; a log line now and then otherwise."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self._bars: Any = None
        self._redirected: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._last_log = 0.0

    def __enter__(self) -> _Progress:
        if self.sched.settings.progress and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bars = Progress(TextColumn("{task.description:<10}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("{task.fields[note]}"), transient=False)
            self._search = self._bars.add_task("features", total=self.sched.total, note="")
            self._fold = self._bars.add_task("structures", total=self.sched.total, note="")
            self._bars.start()
            self._redirect_logs(sys.stderr)  # rich's proxy: log lines print above the bars
        self.update()
        return self

    def update(self) -> None:
        s = self.sched
        if self._bars is not None:
            self._bars.update(self._search, completed=s.featured + s.search_failed,
                              note=f"{s.n_searching} searching")
            self._bars.update(self._fold, completed=s.finished,
                              note=f"{len(s.folding)} batches on {len(s.folding) + len(s.idle)}"
                                   f" workers, {s.failed} failed")
            return
        now = time.time()
        if now - self._last_log >= s.settings.log_every_s:
            self._last_log = now
            logger.info("progress: features %d/%d (%d searching), structures %d/%d, %d failed",
                        s.featured, s.total, s.n_searching, s.finished, s.total, s.failed)

    def _redirect_logs(self, stream: Any) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                self._redirected.append((handler, handler.setStream(stream)))

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self.update()
            self._bars.stop()
            for handler, stream in self._redirected:
                handler.setStream(stream)

