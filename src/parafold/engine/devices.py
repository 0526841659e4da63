"""`parafold predict` on every GPU of one machine: one fold process per device.

With one device (or none) the stage runs in this process, as it always did (`predict_on`).

The feature sets are sorted by shape and cut into runs of about equal modelled device work
(`costs.cut_by_cost`), a few runs per device, and each device takes the runs next to each
other, so it compiles only the shapes of its stretch of the order. A device whose runs are done
takes the last queued run of the device with the most modelled work left (stealing from the end
keeps both stretches contiguous) when the compiles that run needs there cost less than the
work the busy device has queued before it, so a model that misjudged some shapes costs little.

A run that fails as a whole (its process died) is given to another device once; a device whose
process dies twice in a row is retired and its queue shared out. Failures of targets (a bad
feature file, out of memory twice) come back as outcomes, as in one process.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from parafold.engine.base import FoldWorkerHandle, FoldWorkerSpec
from parafold.engine.jobs import FoldBatchResult
from parafold.errors import PipelineError
from parafold.featureset import FeatureSet
from parafold.fold.buckets import ShapeKey
from parafold.fold.costs import cut_by_cost, shape_costs
from parafold.fold.hostwork import host_cores
from parafold.fold.settings import ModelSettings
from parafold.fold.worker import FoldOutcome
from parafold.lifecycle import drain_requested
from parafold.search.scheduler import describe_error

__all__ = ["DevicesResult", "predict_on", "plan_predict", "fold_on_devices", "RUNS_PER_DEVICE"]

log = logging.getLogger(__name__)

RUNS_PER_DEVICE = 4  # enough to steal from; few enough that each fold call plans a long run
_DEATHS_TO_RETIRE = 2


@dataclass(slots=True)
class _Run:
    sets: list[FeatureSet]
    work: float  # modelled device seconds
    shapes: frozenset[ShapeKey]  # the first model's own shapes of its sets
    tries: int = 0
    failed_on: set[str] = field(default_factory=set)  # devices whose process died on it


@dataclass(slots=True)
class _Lane:
    worker: FoldWorkerHandle
    queue: deque[_Run] = field(default_factory=deque)
    compiled: set[ShapeKey] = field(default_factory=set)  # what its process reported
    deaths: int = 0
    retired: bool = False

    @property
    def work_left(self) -> float:
        return sum(run.work for run in self.queue)


@dataclass(frozen=True, slots=True)
class DevicesResult:
    """One outcome per feature set (in their order) and each device's last counters."""

    outcomes: list[FoldOutcome]
    stats: dict[str, dict[str, Any]]


def predict_on(devices: tuple[str, ...], feature_sets: Sequence[FeatureSet], out_root: Path,
               *, params_dir: Path, settings: ModelSettings, trust_pickles: bool = False,
               pin: bool = True) -> DevicesResult:
    """Fold `feature_sets` on `devices` (GPU ids; none: the CPU). Several devices get a fold
    process each (`fold_on_devices`); one device, or the CPU, runs in this process, pinned to
    it when `pin` (the user named it: a GPU that `detect_gpus` missed stays usable otherwise).

    Sets with identical features are predicted once: the others get copies of the files
    (`fold.twins`), as do sets predicted before in another OUT (`fold.reuse`, when
    `settings.prediction_cache_dir` is set). A twin whose source failed is predicted
    itself, in a second pass.

    Raises:
        PipelineError: the params folder is unusable (found before any target is folded).
    """
    from parafold.fold.twins import TwinPlan, copy_twins, plan_twins, second_sources

    def predict(sets: Sequence[FeatureSet]) -> DevicesResult:
        return _predict(devices, sets, out_root, params_dir=params_dir, settings=settings,
                        trust_pickles=trust_pickles, pin=pin)

    plan, made = plan_predict(feature_sets, out_root, params_dir=params_dir, settings=settings)
    if not plan.copies:
        return predict(feature_sets)
    log.info("%d targets have the features of another or were predicted before: their files "
             "are copied", plan.copies)
    # Predictions made before (in another OUT) are copied first: they need no device, and one
    # whose folder went away since it was indexed (cleaned up, predicted again) is predicted
    # in this pass instead of failing after it.
    outcomes = copy_twins(TwinPlan([], found=plan.found, stamps=plan.stamps), {}, out_root)
    lost = [fs for sets in plan.found.values() for fs in sets
            if not outcomes[fs.name].ok and not outcomes[fs.name].stopped_early]
    for fs in lost:
        del outcomes[fs.name]
    replanned = plan_twins(lost, out_root, fingerprint=made)
    plan = TwinPlan([*plan.fold, *replanned.fold], {**plan.twins, **replanned.twins})
    result = predict(plan.fold)
    outcomes.update((o.name, o) for o in result.outcomes)
    stats = dict(result.stats)
    plan, second = second_sources(plan, outcomes)
    outcomes.update(copy_twins(plan, outcomes, out_root))
    if second.fold:
        log.warning("%d targets whose twin failed are predicted themselves",
                    len(second.fold))
        again = predict(second.fold)
        outcomes.update((o.name, o) for o in again.outcomes)
        stats.update((f"{where} (second pass)", s) for where, s in again.stats.items())
        outcomes.update(copy_twins(second, outcomes, out_root))
    return DevicesResult([outcomes[fs.name] for fs in feature_sets], stats)


def plan_predict(feature_sets: Sequence[FeatureSet], out_root: Path, *, params_dir: Path,
                 settings: ModelSettings) -> tuple[Any, str]:
    """What `predict_on` copies and predicts (`twins.TwinPlan`: in-run twins, and earlier
    predictions in the shared cache), and the settings fingerprint a finished target of
    `out_root` must record to count as done: the plan `predict --dry-run` shows too."""
    from parafold.fold.reuse import PredictionIndex, prediction_fingerprint
    from parafold.fold.twins import plan_twins

    index = None
    if settings.prediction_cache_dir is not None:
        index = PredictionIndex.for_settings(settings.prediction_cache_dir, settings,
                                             params_dir)
    made = prediction_fingerprint(settings, params_dir, relaxation=False)
    return plan_twins(feature_sets, out_root, index, fingerprint=made), made


def _predict(devices: tuple[str, ...], feature_sets: Sequence[FeatureSet], out_root: Path,
             *, params_dir: Path, settings: ModelSettings, trust_pickles: bool,
             pin: bool) -> DevicesResult:
    if len(devices) >= 2:
        from parafold.engine.local import LocalExecutor

        if settings.helper_cores is None:  # the host's cores shared out between the devices
            settings = replace(settings, helper_cores=max(1, host_cores() // len(devices)))
        with LocalExecutor(cpus=1, gpus=devices) as executor:
            workers = executor.start_fold_workers(
                FoldWorkerSpec(params_dir, settings, trust_pickles=trust_pickles))
            if feature_sets:
                workers = _started(workers)
            return fold_on_devices(feature_sets, out_root, workers, settings)
    from parafold.fold.worker import FoldWorker

    if pin:
        _pin_this_process(devices)
    with FoldWorker(params_dir, settings, trust_pickles=trust_pickles) as worker:
        if feature_sets:
            worker.load_params()
        outcomes = worker.fold(list(feature_sets), out_root)
        return DevicesResult(outcomes, {"this process": worker.stats})


def _started(workers: list[FoldWorkerHandle]) -> list[FoldWorkerHandle]:
    """The workers that loaded their weights (all at once). A bad params folder fails them
    all and is raised; a device that fails on its own is left out.

    Raises:
        PipelineError: the params are unusable, or no device started.
    """
    handles = [(w, w.warm()) for w in workers]
    started, reasons = [], []
    for worker, handle in handles:
        try:
            handle.result()
        except PipelineError:
            raise
        except Exception as exc:  # this device's own trouble (a CUDA error, a dead process)
            log.error("fold worker %s failed to start, left out: %s", worker.name,
                      describe_error(exc))
            worker.release()
            reasons.append(f"{worker.name}: {describe_error(exc)}")
            continue
        started.append(worker)
    if not started:
        raise PipelineError("no device could start a fold worker: " + "; ".join(reasons))
    return started


def _pin_this_process(devices: tuple[str, ...]) -> None:
    """Make jax use the one device chosen (or the CPU): only possible before it is imported."""
    env = {"CUDA_VISIBLE_DEVICES": devices[0]} if devices else {"JAX_PLATFORMS": "cpu"}
    if "jax" in sys.modules:
        log.debug("jax already imported: %s not applied", env)
        return
    os.environ.update(env)


def fold_on_devices(feature_sets: Sequence[FeatureSet], out_root: Path,
                    workers: Sequence[FoldWorkerHandle], settings: ModelSettings, *,
                    runs_per_device: int = RUNS_PER_DEVICE) -> DevicesResult:
    """Fold every set on `workers` (one per device); see the module docstring."""
    if not workers:
        raise ValueError("no fold workers")
    platform = workers[0].platform
    compile_s = shape_costs(settings, platform).group_compile_s
    lanes = [_Lane(w) for w in workers]
    cut = cut_by_cost(feature_sets, len(workers) * runs_per_device, settings, platform)
    for i, part in enumerate(cut):  # equal work per lane, as cut
        if part.sets:
            lanes[i // runs_per_device].queue.append(
                _Run(list(part.sets), part.seconds, part.shapes))
    log.info("%d feature sets in %d runs of the shape order on %d devices", len(feature_sets),
             sum(len(lane.queue) for lane in lanes), len(lanes))
    outcomes: dict[str, FoldOutcome] = {}
    stats: dict[str, dict[str, Any]] = {}
    running: dict[cf.Future[Any], tuple[_Lane, _Run]] = {}
    orphans: deque[_Run] = deque()  # runs of retired devices and runs to try again
    try:
        while True:
            for lane in lanes:
                if lane.retired or any(lane is ln for ln, _ in running.values()):
                    continue
                run = _next_run(lane, lanes, orphans, compile_s)
                if run is not None:
                    running[_submit(lane, run, out_root)] = (lane, run)
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                lane, run = running.pop(future)
                _finished(future, lane, run, outcomes, stats, orphans, lanes)
            _stop_if_asked(lanes, orphans, outcomes)
    except BaseException:
        for future in running:
            future.cancel()
        raise
    for fs in feature_sets:  # nothing left to run them on: every device retired
        outcomes.setdefault(fs.name, FoldOutcome(
            name=fs.name, ok=False, length=fs.length,
            error=f"{fs.name}: no device left to fold it (each fold process died "
                  f"{_DEATHS_TO_RETIRE} times)"))
    return DevicesResult([outcomes[fs.name] for fs in feature_sets], stats)


def _stop_if_asked(lanes: list[_Lane], orphans: deque[_Run],
                   outcomes: dict[str, FoldOutcome]) -> None:
    """After a target met a full disk or a spent quota (each run would fail writing too), or
    once a drain is asked for (SIGUSR1), start no run more; the runs not started get outcomes
    that say so, for a rerun. The runs under way finish: their processes never see SIGUSR1."""
    reason = next((o.error for o in outcomes.values() if o.stopped_early), None) \
        or drain_requested()
    if reason is None:
        return
    waiting = [run for lane in lanes for run in lane.queue] + list(orphans)
    for run in waiting:
        for fs in run.sets:
            outcomes[fs.name] = FoldOutcome(name=fs.name, ok=False, length=fs.length,
                                            error=f"{fs.name}: not predicted: {reason}",
                                            stopped_early=True)
    for lane in lanes:
        lane.queue.clear()
    orphans.clear()


def _next_run(lane: _Lane, lanes: list[_Lane], orphans: deque[_Run],
              compile_s: Callable[[ShapeKey], float]) -> _Run | None:
    """The lane's next run; else a run nobody holds (not one this device died on while
    another device is live: its second try goes elsewhere); else the last queued run of the
    lane with the most modelled work left, if the compiles it needs here cost less than the
    work queued before it there (that device's running run not counted: a safe side)."""
    if lane.queue:
        return lane.queue.popleft()
    live = {ln.worker.name for ln in lanes if not ln.retired}
    for i, orphan in enumerate(orphans):
        if lane.worker.name not in orphan.failed_on or live <= orphan.failed_on:
            del orphans[i]
            return orphan
    victim = max((ln for ln in lanes if ln.queue), key=lambda ln: ln.work_left, default=None)
    if victim is None:
        return None
    run = victim.queue[-1]
    compiles = sum(compile_s(shape) for shape in run.shapes - lane.compiled)
    if compiles >= victim.work_left - run.work:
        return None
    victim.queue.pop()
    log.info("%s takes a run of %d targets from %s", lane.worker.name, len(run.sets),
             victim.worker.name)
    return run


def _submit(lane: _Lane, run: _Run, out_root: Path) -> cf.Future[Any]:
    run.tries += 1
    try:
        return lane.worker.fold(run.sets, out_root).future
    except Exception as exc:  # its process died while idle: handled as a failed run
        future: cf.Future[Any] = cf.Future()
        future.set_exception(exc)
        return future


def _finished(future: cf.Future[Any], lane: _Lane, run: _Run,
              outcomes: dict[str, FoldOutcome], stats: dict[str, dict[str, Any]],
              orphans: deque[_Run], lanes: list[_Lane]) -> None:
    try:
        result: FoldBatchResult = future.result()
    except Exception as exc:  # the run failed as a whole
        reason = describe_error(exc)
        log.error("fold worker %s failed on a run of %d targets: %s", lane.worker.name,
                  len(run.sets), reason)
        if isinstance(exc, PipelineError) or run.tries >= 2:  # the run's own fault
            for fs in run.sets:
                outcomes[fs.name] = FoldOutcome(
                    name=fs.name, ok=False, length=fs.length,
                    error=f"{fs.name}: its run failed {run.tries} time(s): {reason}")
        else:
            run.failed_on.add(lane.worker.name)
            orphans.append(run)  # another device tries it once
        if isinstance(exc, PipelineError):
            return
        lane.deaths += 1  # its process died or lost its device
        lane.compiled.clear()  # a new process has compiled nothing
        if lane.deaths < _DEATHS_TO_RETIRE:
            lane.worker.restart()
            return
        log.error("fold worker %s is out of rotation: its process died %d times in a row",
                  lane.worker.name, lane.deaths)
        lane.retired = True
        orphans.extend(lane.queue)
        lane.queue.clear()
        lane.worker.release()
        if all(ln.retired for ln in lanes):
            orphans.clear()  # nothing will run them: their targets fail at the end
        return
    lane.deaths = 0
    lane.compiled.update(result.shapes)
    stats[lane.worker.name] = result.stats
    for outcome in result.outcomes:
        outcomes[outcome.name] = outcome
    for fs in run.sets:
        outcomes.setdefault(fs.name, FoldOutcome(name=fs.name, ok=False, length=fs.length,
                                                 error=f"{fs.name}: no result from the fold "
                                                       "worker"))
