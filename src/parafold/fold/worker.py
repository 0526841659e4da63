"""The long-lived GPU-stage object: feature sets in, AlphaFold's output files out.

One `FoldWorker` holds the compiled-model cache and every model's params on the device, so a
run over thousands of targets compiles once per shape. Targets of one shape run as batches
(`parafold.fold.batching`), one forward pass per (batch, model, seed): a *unit*. Work is
software-pipelined: features of the next units are processed in helper processes, the next
unit's inputs are sent to the device and launched behind the running one (JAX dispatch is
asynchronous), and finished targets' files are written by helper processes, so the device
waits for the host as little as possible. Compiles are pipelined too: `fold` knows every shape
it will need up front, and background threads compile them in that order while earlier units
run (`ModelSettings.compile_ahead`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from parafold.errors import GpuOutOfMemoryError, InferenceError, PipelineError, is_storage_full
from parafold.featureset import FeatureSet
from parafold.fold.batching import batch_size, batched_key, next_pow2, stack_members
from parafold.fold.buckets import ShapeKey, plan_merges, shape_key
from parafold.fold.costs import shape_costs
from parafold.fold.hostwork import (
    BusyMeter,
    HostPools,
    auto_workers,
    feature_helpers,
    host_cores,
    process_job,
    relax_job,
    write_job,
)
from parafold.fold.outputs import Prediction, is_complete
from parafold.fold.reuse import PredictionIndex, prediction_fingerprint
from parafold.fold.settings import ModelSettings
from parafold.lifecycle import drain_requested
from parafold.relax import RelaxError, relax_pending

__all__ = ["FoldWorker", "FoldOutcome"]

log = logging.getLogger(__name__)

_LOOKAHEAD = 2  # units whose features are processed while an earlier one waits to launch
_JOBS_PER_HELPER = 2  # and beyond them, jobs submitted but not yet launched, per helper
# Result entries the output files need; the rest (distogram, PAE probabilities, ...) is
# fetched from the device and kept only for `save_raw`.
_WRITTEN = ("plddt", "structure_module", "ptm", "predicted_aligned_error",
            "max_predicted_aligned_error", "num_recycles")
_TARGET_ERRORS = (PipelineError, ValueError, KeyError, RuntimeError, OSError)


def submit_horizon(current: int, submitted: int, sizes: Sequence[int], waiting: int,
                   helpers: int) -> int:
    """Units to have submitted for processing (an index past the last) when unit `current`
    is next to launch: `_LOOKAHEAD` units past it, and more while fewer than
    `_JOBS_PER_HELPER` jobs per helper wait (submitted, not launched), so that every helper
    has work when a unit is small and its targets' MSAs deep. `sizes`: targets per unit."""
    end = max(submitted, min(len(sizes), current + _LOOKAHEAD + 1))
    waiting += sum(sizes[submitted:end])
    while end < len(sizes) and waiting < _JOBS_PER_HELPER * helpers:
        waiting += sizes[end]
        end += 1
    return end


@dataclass(frozen=True, slots=True)
class FoldOutcome:
    """What became of one target; `error` names the failure when `ok` is false, and
    `stopped_early` says a full disk, a spent quota or a drain (SIGUSR1) stopped it, not
    the target itself: a rerun does it."""

    name: str
    ok: bool
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    mean_plddt: float | None = None
    ptm: float | None = None
    ranked_model_names: tuple[str, ...] = ()
    length: int = 0
    bucket: str = ""
    skipped: bool = False
    output_dir: Path | None = None
    relaxed: tuple[str, ...] = ()  # predictions relaxed by this call, when only relaxed
    stopped_early: bool = False
    copied_from: str | None = None  # its twin, whose prediction was copied (`fold.twins`)


@dataclass(frozen=True, slots=True)
class _Run:
    """One prediction of every target: a model and a seed."""

    model_name: str
    pred_name: str
    seed: int


@dataclass(frozen=True, slots=True)
class _Unit:
    """One forward pass: members of one (batch-1) shape key under one run."""

    key: ShapeKey
    run: _Run
    members: tuple[FeatureSet, ...]


@dataclass(slots=True)
class _TargetState:
    fs: FeatureSet
    remaining: int
    predictions: list[Prediction] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    bucket: str = ""
    stopped_early: bool = False  # its files met a full disk or a spent quota


@dataclass(slots=True)
class _Pending:
    """A launched unit whose results are not fetched yet (its inputs kept for an OOM retry)."""

    unit: _Unit
    key: ShapeKey
    members: list[FeatureSet]
    feats: list[dict[str, np.ndarray]]
    launched: Any
    compile_s: float


@dataclass(slots=True)
class _Pass:
    """The state of one `fold` call."""

    out_root: Path
    states: dict[str, _TargetState]
    outcomes: dict[str, FoldOutcome] = field(default_factory=dict)
    writes: dict[str, cf.Future[list[str]]] = field(default_factory=dict)
    # why the loop launches nothing more: a writer met a full disk or a spent quota, or a
    # drain was asked for (SIGUSR1)
    stop_reason: str | None = None
    # predicted before, relaxation still missing: relaxed only
    relaxing: dict[str, tuple[FeatureSet, cf.Future[Any]]] = field(default_factory=dict)


class FoldWorker:
    """Predicts structures for feature sets with compilation shared across models and targets."""

    def __init__(self, params_dir: Path, settings: ModelSettings, *,
                 trust_pickles: bool = False) -> None:
        from parafold.fold.runner import ModelRunner

        self.params_dir = Path(params_dir)
        self.settings = settings
        self.trust_pickles = trust_pickles
        self.runner = ModelRunner(settings)
        self.index = (None if settings.prediction_cache_dir is None else
                      PredictionIndex.for_settings(settings.prediction_cache_dir, settings,
                                                   self.params_dir))
        # what each prediction records it was made with; a folder made otherwise is redone
        self.fingerprint = prediction_fingerprint(settings, self.params_dir, relaxation=False)
        self._params: dict[str, Any] = {}
        self._caps: dict[ShapeKey, int] = {}
        # target -> (length, MSA rows, templates) its merged key is made for (`group`)
        self._merged_into: dict[str, tuple[int, int, bool]] = {}
        self._key_rows: dict[ShapeKey, int] = {}  # keys grouped so far -> their deepest rows
        platform = self.runner.platform
        self.costs = shape_costs(settings, platform)
        # 2 writers: a target's files take 40-60 ms of CPU at 60-150 residues (`fold.mmcif`),
        # a GPU predicts one every ~90 ms in batches. Relaxing takes seconds to minutes of
        # CPU a structure: then writers get half the feature helpers' share as well.
        helpers = feature_helpers(settings.helper_cores or host_cores())
        writers = 2 if settings.models_to_relax == "none" else max(2, helpers // 2)
        self.pools = HostPools(
            auto_workers(settings.host_workers, platform, gpu_default=helpers),
            auto_workers(settings.write_workers, platform, gpu_default=writers))
        self._meter = BusyMeter()
        self._wall_s = 0.0
        # compile-ahead state of the running `fold` call (empty outside one)
        self._compiler: cf.ThreadPoolExecutor | None = None
        self._ahead: dict[ShapeKey, cf.Future[None]] = {}
        self._planned: dict[ShapeKey, str] = {}
        self._compile_wait_s = 0.0
        # where the fold loop's own time goes (`stats`: loop_s), to see what holds the device
        self._loop_s: Counter[str] = Counter()

    @property
    def stats(self) -> dict[str, Any]:
        """Runner counters plus the device's busy time over the wall time of `fold` calls, how
        long the loop waited for compile-ahead threads, and where the rest of the loop's time
        went (`loop_s`): waiting for processed features, launching (stacking, transfers,
        dispatch; and any compile the loop does itself, none with compile-ahead on), waiting
        for results (the device still busy), recording them (unpadding, handing files to the
        writers). Launch and record time the device does not cover holds it up."""
        busy = self._meter.busy_s()
        return {**self.runner.stats.as_dict(), "busy_s": round(busy, 3),
                "fold_wall_s": round(self._wall_s, 3),
                "busy_fraction": round(busy / self._wall_s, 4) if self._wall_s else None,
                "compile_wait_s": round(self._compile_wait_s, 3),
                "loop_s": {k: round(v, 3) for k, v in sorted(self._loop_s.items())}}

    def busy_s(self, until: float | None = None) -> float:
        """The device's busy seconds so far, or before `until` (a `perf_counter` time)."""
        return self._meter.busy_s(until)

    def close(self) -> None:
        """Stop the helper processes (they start again on the next `fold`) and any
        compile-ahead threads."""
        self._stop_compiles()
        self.pools.close()

    def __enter__(self) -> FoldWorker:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def shape_key(self, fs: FeatureSet, model_name: str | None = None) -> ShapeKey:
        """`fs`'s key for a model; a target `group` moved to a bigger shape counts that shape's
        length and the rows of its deepest own target (or its own, if deeper), so every model's
        key moves along; it runs the template models with its templates, or with masked ones
        if it has none and that shape has them (a first model without templates, 3-5, groups
        targets with and without them in one shape: each keeps its own for models 1-2)."""
        length, rows, templates = self._merged_into.get(
            fs.name, (fs.length, fs.msa_depth, fs.num_templates > 0))
        return shape_key(length, rows, model_name or self.settings.model_names[0],
                         self.settings, templates=templates)

    @property
    def shapes_run(self) -> tuple[ShapeKey, ...]:
        """The first model's shapes (batch 1) that targets were grouped under and that are
        compiled: what a later group may run in without a compile."""
        compiled = {replace(k, batch=1) for k in self.runner.compiled_keys}
        return tuple(sorted(k for k in self._key_rows if k in compiled))

    def batch_cap(self, key: ShapeKey) -> int:
        """Most members per pass for `key` (memory model, lowered after an out-of-memory)."""
        if key not in self._caps:
            self._caps[key] = batch_size(key, self.settings, platform=self.runner.platform)
            log.info("batch size %d for %s", self._caps[key], key.describe())
        return self._caps[key]

    def group(self, feature_sets: Sequence[FeatureSet]) -> list[list[FeatureSet]]:
        """Feature sets grouped by the shape key of the first model, most device work first,
        each group at most the batch size of its shape. A group moves into a bigger shape that
        this call or an earlier one runs when its extra device time costs less than a compile
        (`buckets.merge_groups`, priced by `costs.ShapeCosts`)."""
        self._merged_into = {}
        keys, dest = plan_merges(
            [(fs.length, fs.msa_depth, fs.num_templates > 0) for fs in feature_sets],
            self.settings, compile_s=self.costs.group_compile_s, run_s=self.costs.run_s,
            available=self.shapes_run)
        own = {fs.name: key for fs, key in zip(feature_sets, keys, strict=True)}
        deepest = self._key_rows  # a key -> MSA rows of the deepest target run under it
        for fs in feature_sets:
            if dest[own[fs.name]] == own[fs.name]:
                deepest[own[fs.name]] = max(deepest.get(own[fs.name], 0), fs.msa_depth)
        groups: dict[ShapeKey, list[FeatureSet]] = {}
        for fs in feature_sets:
            key = dest[own[fs.name]]
            if key != own[fs.name]:
                # every model's key moves along, deep enough for this target's own rows too;
                # a target without templates moved into a template shape runs it with its
                # templates masked, as AlphaFold does
                self._merged_into[fs.name] = (key.length,
                                              max(deepest.get(key, 0), fs.msa_depth),
                                              key.templates > 0 or fs.num_templates > 0)
            groups.setdefault(key, []).append(fs)
        counts = Counter(own.values())
        for key in sorted(k for k in counts if dest[k] != k):
            log.info("%s: its %d targets run at L=%d clusters=%d extra=%d (saves a compile)",
                     key.describe(), counts[key], dest[key].length, dest[key].clusters,
                     dest[key].extra)
        # The shape with the most device work first: while it runs, the compile-ahead thread
        # compiles the next shapes (for equal compile times the order Johnson's rule gives;
        # modelled on the 200-protein set: 361 s -> 334 s).
        work = {key: len(members) * self.costs.run_s(key) for key, members in groups.items()}
        if len(feature_sets) > 1:
            log.info("%d targets fall in %d shapes and run in %d; modelled device time %.0f s, "
                     "~%.0f s an executable (%s)", len(feature_sets), len(counts), len(groups),
                     sum(work.values()), self.costs.compile_s, self.costs.describe())
        out = []
        for key in sorted(groups, key=lambda k: (-work[k], k)):
            members = sorted(groups[key], key=lambda f: (f.length, f.name))
            cap = self.batch_cap(key)
            out.extend(members[i:i + cap] for i in range(0, len(members), cap))
        return out

    def load_params(self) -> None:
        """Load and check every model's params now (else on first use)."""
        for model_name in self.settings.model_names:
            self._device_params(model_name)

    def _device_params(self, model_name: str) -> Any:
        if model_name not in self._params:
            import jax

            from parafold.fold.params import load_params

            self._params[model_name] = jax.device_put(
                load_params(self.params_dir, model_name, self.settings))
        return self._params[model_name]

    def _params_for(self, model_name: str, key: ShapeKey) -> Any:
        """The model's params as `key`'s compiled function takes them: a template model runs a
        target without templates without its template stack (`config.family_of`)."""
        from parafold.fold.config import uses_templates
        from parafold.fold.params import without_template_stack

        params = self._device_params(model_name)
        if key.templates == 0 and uses_templates(model_name):
            return without_template_stack(params)
        return params

    def _runs(self) -> list[_Run]:
        names = self.settings.model_names
        pairs = [(m, s) for m in names for s in range(self.settings.num_seeds)]
        return [_Run(m, m if self.settings.num_seeds == 1 else f"{m}_pred_{s}",
                     index + self.settings.random_seed * len(pairs))
                for index, (m, s) in enumerate(pairs)]

    def _plan(self, todo: Sequence[FeatureSet]) -> list[_Unit]:
        """Units in order: each group under every run; a group splits where another model's
        key differs (e.g. template models bucket MSA depth on other rungs)."""
        units = []
        for chunk in self.group(todo):
            for run in self._runs():
                parts: dict[ShapeKey, list[FeatureSet]] = {}
                for fs in chunk:
                    parts.setdefault(self.shape_key(fs, run.model_name), []).append(fs)
                for key in sorted(parts):
                    cap = self.batch_cap(key)
                    members = parts[key]
                    units.extend(_Unit(key, run, tuple(members[i:i + cap]))
                                 for i in range(0, len(members), cap))
        return units

    def _exec_batch(self, key: ShapeKey, count: int) -> int:
        """The batch to run `count` members of `key` at: the smallest already compiled (or
        planned for compiling ahead) one that holds them, else the next power of two (few
        shapes, few dummy slots), within the cap."""
        cap = self.batch_cap(key)
        compiled = [k.batch for k in [*self.runner.compiled_keys, *self._planned]
                    if replace(k, batch=1) == key and count <= k.batch <= cap]
        return min(compiled) if compiled else min(cap, next_pow2(count))

    def _exec_key(self, key: ShapeKey, count: int) -> ShapeKey:
        batch = self._exec_batch(key, count)
        return batched_key(key, batch)

    def _start_compiles(self, units: Sequence[_Unit]) -> None:
        """Compile the executables of `units` in background threads, in the order the loop
        needs them, so each is ready or under way when the loop gets there: a full-model
        compile takes ~25-29 s per shape on a GPU, and the device idles through each one the
        loop compiles itself. XLA's compile releases the GIL, so it overlaps the device's work
        and the loop's Python. Each executable key is planned once, with the batch
        `_exec_batch` will pick (planned keys count as compiled there, so the loop agrees).
        """
        workers = self.settings.compile_ahead
        if workers == 0 or not units:
            return
        from parafold.fold.runner import input_shapes

        for unit in units:
            key = self._exec_key(unit.key, len(unit.members))
            if key not in self._planned and not self.runner.has(key):
                self._planned[key] = unit.run.model_name
        if not self._planned:
            return
        self._compiler = cf.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="compile-ahead")
        for key, model_name in self._planned.items():
            try:  # the same params the loop will pass; probing shapes runs AlphaFold's
                # feature pipeline, so it stays in this thread
                params = self._params_for(model_name, key)
                shapes = input_shapes(model_name, self.settings, key)
            except Exception as exc:  # only an optimisation: the loop compiles it itself (and
                # meets a target's error again there)
                log.warning("%s: not compiling ahead: %s", key.describe(), exc)
                continue
            self._ahead[key] = self._compiler.submit(self._compile_ahead, model_name, key,
                                                     params, shapes)
        log.info("compiling %d shapes ahead in %d threads", len(self._ahead), workers)

    def _compile_ahead(self, model_name: str, key: ShapeKey, params: Any,
                       shapes: dict[str, Any]) -> None:
        """One background compile; its error waits in the future for the loop."""
        try:
            self.runner.executable(model_name, key, params, shapes, ahead=True)
        except Exception as exc:
            log.warning("compiling %s ahead failed: %s", key.describe(), exc)
            raise

    def _await_compile(self, key: ShapeKey) -> None:
        """Wait for the background compile of `key`, if there is one; a compile not started
        yet is cancelled and left to the loop. Its error is this unit's, as if the loop had
        compiled, except out of memory: that one may come from compiling beside the running
        units (XLA autotunes on the device), so the loop compiles again, alone as before."""
        future = self._ahead.pop(key, None)
        if future is None or future.cancel():
            return
        started = time.perf_counter()
        try:
            future.result()
        except GpuOutOfMemoryError as exc:
            log.warning("%s while compiling ahead; compiling it again here", exc)
        except _TARGET_ERRORS as exc:
            raise InferenceError(f"compile failed: {exc}") from exc
        finally:
            self._compile_wait_s += time.perf_counter() - started

    def _stop_compiles(self, *, wait: bool = True) -> None:
        """Cancel the compiles not started and wait for the running ones: no thread outlives
        `fold`. Interrupted, it does not wait (a compile takes ~30 s on a GPU): the process
        is ending, and the caller ends it with `os._exit` so the exit does not wait either."""
        compiler, self._compiler = self._compiler, None
        self._ahead.clear()
        self._planned.clear()
        if compiler is not None:
            compiler.shutdown(wait=wait, cancel_futures=True)

    def fold(self, feature_sets: Sequence[FeatureSet], out_root: Path) -> list[FoldOutcome]:
        """Predict and write `out_root/<name>/...` for each set; one outcome per set, in order."""
        started = time.perf_counter()
        out_root = Path(out_root)
        todo: list[FeatureSet] = []
        skipped: dict[str, FoldOutcome] = {}
        relax = self.settings.models_to_relax
        relax_only: list[FeatureSet] = []
        redone = 0
        for fs in feature_sets:
            folder = out_root / fs.name
            if not is_complete(folder, self.fingerprint):
                redone += is_complete(folder)
                todo.append(fs)
            elif relax_pending(folder, relax):
                relax_only.append(fs)
            else:
                skipped[fs.name] = FoldOutcome(name=fs.name, ok=True, skipped=True,
                                               length=fs.length, output_dir=folder)
        if redone:
            log.warning("%d targets were predicted before with other model settings (models, "
                        "recycles, seeds, preset or params): predicting them again", redone)
        runs = len(self._runs())
        ctx = _Pass(out_root, {fs.name: _TargetState(fs, runs) for fs in todo}, skipped)
        for fs in relax_only:
            ctx.relaxing[fs.name] = (fs, self.pools.writes().submit(
                relax_job, out_root / fs.name, relax, self.index, fs))
        units = self._plan(todo)
        futures: dict[int, list[cf.Future[Any] | None]] = {}
        pending: _Pending | None = None
        submitted = 0  # units whose features are submitted
        sizes = [len(u.members) for u in units]
        try:
            self._start_compiles(units)
            for i, unit in enumerate(units):
                if ctx.stop_reason is None:
                    ctx.stop_reason = drain_requested()
                if ctx.stop_reason is not None:
                    break
                with self._timing("features_submit"):
                    waiting = sum(len(jobs) for jobs in futures.values())
                    end = submit_horizon(i, submitted, sizes, waiting,
                                         self.pools.feature_workers)
                    for j in range(submitted, end):
                        futures[j] = self._submit_features(units[j], ctx)
                    submitted = max(submitted, end)
                with self._timing("features_wait"):
                    members, feats = self._gather(unit, futures.pop(i), ctx)
                if members:
                    pending = self._dispatch(unit, members, feats, pending, ctx)
            if pending is not None:
                self._complete(pending, ctx)
            if ctx.stop_reason is not None:
                self._stop_early(ctx)
        except KeyboardInterrupt:
            self._stop_compiles(wait=False)
            raise
        finally:
            self._stop_compiles()
        with self._timing("writes_wait"):
            self._collect(ctx)
        self._wall_s += time.perf_counter() - started
        return [ctx.outcomes[fs.name] for fs in feature_sets]

    @contextlib.contextmanager
    def _timing(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._loop_s[phase] += time.perf_counter() - started

    def _submit_features(self, unit: _Unit, ctx: _Pass) -> list[cf.Future[Any] | None]:
        pool = self.pools.features()
        return [None if ctx.states[fs.name].error else
                pool.submit(process_job, fs, unit.run.model_name, self.settings, unit.key,
                            unit.run.seed, self.trust_pickles)
                for fs in unit.members]

    def _gather(self, unit: _Unit, futures: list[cf.Future[Any] | None], ctx: _Pass
                ) -> tuple[list[FeatureSet], list[dict[str, np.ndarray]]]:
        """Processed features of the unit's members still without an error."""
        members, feats = [], []
        for fs, future in zip(unit.members, futures, strict=True):
            state = ctx.states[fs.name]
            if future is None or state.error is not None:
                self._finished(state, ctx)
                continue
            try:
                processed, seconds = future.result()
            except _TARGET_ERRORS as exc:
                log.error("%s: feature processing failed: %s", fs.name, exc)
                state.error = f"feature processing failed for {fs.name}: {exc}"
                self._finished(state, ctx)
                continue
            state.timings[f"process_features_{unit.run.pred_name}"] = seconds
            members.append(fs)
            feats.append(processed)
        return members, feats

    def _launch(self, key: ShapeKey, run: _Run, feats: list[dict[str, np.ndarray]]) -> Any:
        with self._timing("launch"):
            return self._launch_unit(key, run, feats)

    def _launch_unit(self, key: ShapeKey, run: _Run, feats: list[dict[str, np.ndarray]]) -> Any:
        params = self._params_for(run.model_name, key)
        if key.batch == 1:
            return self.runner.launch(run.model_name, key, params, feats[0], run.seed)
        inputs = self.runner.put_batch(key, stack_members(feats, key))  # overlaps the device
        return self.runner.launch_batch(run.model_name, key, params, inputs,
                                        [run.seed] * len(feats))

    def _dispatch(self, unit: _Unit, members: list[FeatureSet],
                  feats: list[dict[str, np.ndarray]], pending: _Pending | None, ctx: _Pass
                  ) -> _Pending | None:
        """Launch `members` (in chunks if the cap fell below their count); completes `pending`
        once the new launch is queued behind it. Returns what is still to be fetched."""
        batch = self._exec_batch(unit.key, len(members))
        if batch < len(members):
            for i in range(0, len(members), batch):
                pending = self._dispatch(unit, members[i:i + batch], feats[i:i + batch],
                                         pending, ctx)
            return pending
        key = batched_key(unit.key, batch)
        if pending is not None and not self.runner.has(key):
            # A compile (or waiting for one) would stall the host: finish the pending unit
            # first so its predict time does not include this compile.
            self._complete(pending, ctx)
            pending = None
        try:
            self._await_compile(key)
            launched = self._launch(key, unit.run, feats)
        except GpuOutOfMemoryError as exc:
            if pending is not None:
                self._complete(pending, ctx)
            self._out_of_memory(unit, key, members, feats, exc, ctx)
            return None
        except _TARGET_ERRORS as exc:
            log.exception("%s: predict failed", key.describe())
            self._fail(members, f"predict failed ({key.describe()}): {exc}", ctx)
            return pending
        self._meter.watch(launched.started, launched.outputs)
        if pending is not None:
            self._complete(pending, ctx)
        return _Pending(unit, key, members, feats, launched, self.runner.take_compile_s(key))

    def _complete(self, p: _Pending, ctx: _Pass) -> None:
        """Fetch a launched unit and record each member's prediction."""
        try:
            with self._timing("fetch_wait"):  # mostly the device finishing the unit
                keep = None if self.settings.save_raw else _WRITTEN
                if p.key.batch > 1:
                    results, seconds = self.runner.fetch_batch(p.launched, keep)
                else:
                    result, seconds = self.runner.fetch(p.launched, keep)
                    results = [result]
        except GpuOutOfMemoryError as exc:
            self._out_of_memory(p.unit, p.key, p.members, p.feats, exc, ctx)
            return
        except _TARGET_ERRORS as exc:
            log.exception("%s: predict failed", p.key.describe())
            self._fail(p.members, f"predict failed ({p.key.describe()}): {exc}", ctx)
            return
        with self._timing("record"):
            self._record(p, results, seconds, ctx)

    def _record(self, p: _Pending, results: list[dict[str, Any]], seconds: float,
                ctx: _Pass) -> None:
        """Each member's prediction into its state; a target with all its runs done goes to
        a writer."""
        from parafold.fold.processing import unpad_result

        run = p.unit.run
        for fs, result, feats in zip(p.members, results, p.feats, strict=True):
            state = ctx.states[fs.name]
            length = fs.length
            full = unpad_result(result, length)
            kept = full if self.settings.save_raw else {k: v for k, v in full.items()
                                                        if k in _WRITTEN}
            state.timings[f"predict_{run.pred_name}"] = seconds / len(p.members)
            state.timings[f"compile_{run.pred_name}"] = p.compile_s
            state.bucket = p.key.describe()
            state.predictions.append(Prediction(
                name=run.pred_name, model_name=run.model_name, seed=run.seed, result=kept,
                aatype=feats["aatype"][0][:length],
                residue_index=feats["residue_index"][0][:length],
                timings={k: v for k, v in state.timings.items() if k.endswith(run.pred_name)}))
            self._finished(state, ctx)

    def _out_of_memory(self, unit: _Unit, key: ShapeKey, members: list[FeatureSet],
                       feats: list[dict[str, np.ndarray]], exc: GpuOutOfMemoryError,
                       ctx: _Pass) -> None:
        """Halve the batch (and remember the lower cap); at one member, retry with
        AlphaFold's sub-batching (less memory), then give up on the target."""
        if key.batch > 1:
            half = max(1, key.batch // 2)
            self._caps[unit.key] = min(self.batch_cap(unit.key), half)
            log.warning("%s: %s; batches of %d from now on", key.describe(), exc, half)
            for i in range(0, len(members), half):
                left = self._dispatch(unit, members[i:i + half], feats[i:i + half], None, ctx)
                if left is not None:
                    self._complete(left, ctx)
            return
        if key.low_memory:
            fs = members[0]
            self._fail(members, f"GPU out of memory for {fs.name} ({fs.length} residues, bucket "
                                f"{key.describe()}), also with less memory: {exc}", ctx)
            return
        log.warning("%s (%d residues, %s): %s; retrying with less memory", members[0].name,
                    members[0].length, key.describe(), exc)
        low = self.runner.low_memory_key(key)
        try:
            launched = self._launch(low, unit.run, feats)
        except GpuOutOfMemoryError as again:
            self._out_of_memory(unit, low, members, feats, again, ctx)
            return
        except _TARGET_ERRORS as exc:  # e.g. the low-memory config fails to compile
            log.exception("%s: predict failed", low.describe())
            self._fail(members, f"predict failed ({low.describe()}): {exc}", ctx)
            return
        self._complete(_Pending(unit, low, members, feats, launched,
                            self.runner.take_compile_s(low)), ctx)

    def _fail(self, members: list[FeatureSet], error: str, ctx: _Pass) -> None:
        for fs in members:
            state = ctx.states[fs.name]
            state.error = state.error or f"{fs.name} ({fs.length} residues): {error}"
            self._finished(state, ctx)

    def _finished(self, state: _TargetState, ctx: _Pass) -> None:
        """One run of the target is over; after its last, hand its files to a writer."""
        state.remaining -= 1
        if state.remaining > 0:
            return
        fs = state.fs
        if state.error is None:
            future = self.pools.writes().submit(
                write_job, ctx.out_root / fs.name, fs.name, state.predictions,
                dict(state.timings), self.settings.save_raw, self.settings.models_to_relax,
                self.index, fs, self.fingerprint)
            future.add_done_callback(lambda f: self._note_storage_full(f, ctx))
            ctx.writes[fs.name] = future
        else:
            self._outcome(state, ctx, None)

    @staticmethod
    def _note_storage_full(future: cf.Future[Any], ctx: _Pass) -> None:
        """A writer's callback: a full disk stops the pass (every later write would fail)."""
        exc = None if future.cancelled() else future.exception()
        if exc is not None and ctx.stop_reason is None and is_storage_full(exc):
            ctx.stop_reason = str(exc)

    def _stop_early(self, ctx: _Pass) -> None:
        """Targets not predicted (or not all their models) when a full disk or a drain
        stopped the pass: outcomes that say so, for a rerun."""
        for name, state in ctx.states.items():
            if name in ctx.outcomes or name in ctx.writes:
                continue
            ctx.outcomes[name] = FoldOutcome(
                name=name, ok=False, error=f"{name}: not predicted: {ctx.stop_reason}",
                length=state.fs.length, bucket=state.bucket, output_dir=ctx.out_root / name,
                stopped_early=True)
        log.error("stopped predicting: %s; %d targets left for a rerun", ctx.stop_reason,
                  sum(1 for o in ctx.outcomes.values() if o.stopped_early))

    def _collect(self, ctx: _Pass) -> None:
        """Wait for every writer and turn each target's state into its outcome."""
        for name, future in ctx.writes.items():
            state = ctx.states[name]
            try:
                ranked = future.result()
            except RelaxError as exc:  # the prediction's files are complete; a rerun relaxes
                state.error = str(exc)
                ranked = None
            except _TARGET_ERRORS as exc:
                state.error = f"writing outputs for {name} failed: {exc}"
                state.stopped_early = is_storage_full(exc)
                ranked = None
            self._outcome(state, ctx, ranked)
        for name, (fs, future) in ctx.relaxing.items():
            folder = ctx.out_root / name
            try:
                relaxed = future.result().relaxed
            except _TARGET_ERRORS as exc:
                log.error("%s", exc)
                ctx.outcomes[name] = FoldOutcome(name=name, ok=False, error=str(exc),
                                                 length=fs.length, output_dir=folder,
                                                 stopped_early=is_storage_full(exc))
                continue
            ctx.outcomes[name] = FoldOutcome(name=name, ok=True, skipped=True, length=fs.length,
                                             output_dir=folder, relaxed=relaxed)

    def _outcome(self, state: _TargetState, ctx: _Pass, ranked: list[str] | None) -> None:
        fs = state.fs
        folder = ctx.out_root / fs.name
        if state.error is not None or ranked is None:
            log.error("%s", state.error)
            ctx.outcomes[fs.name] = FoldOutcome(name=fs.name, ok=False, error=state.error,
                                                timings=dict(state.timings), length=fs.length,
                                                bucket=state.bucket, output_dir=folder,
                                                stopped_early=state.stopped_early)
            return
        best = next(p for p in state.predictions if p.name == ranked[0])
        ctx.outcomes[fs.name] = FoldOutcome(
            name=fs.name, ok=True, timings=dict(state.timings), mean_plddt=best.mean_plddt,
            ptm=best.ptm, ranked_model_names=tuple(ranked), length=fs.length,
            bucket=state.bucket, output_dir=folder)
        log.info("%s: %d residues, best %s pLDDT %.1f", fs.name, fs.length, ranked[0],
                 best.mean_plddt)
