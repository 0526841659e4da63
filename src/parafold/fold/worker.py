"""The long-lived GPU-stage object: feature sets in, AlphaFold's output files out.

One `FoldWorker` holds the compiled-model cache and every model's params on the device, so a
run over thousands of targets compiles once per shape. Work is software-pipelined in one
thread: while the device computes one prediction (JAX dispatch is asynchronous), the host
processes the next target's features and writes the previous target's files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from parafold.errors import GpuOutOfMemoryError, PipelineError
from parafold.featureset import FeatureSet
from parafold.fold.buckets import ShapeKey, shape_key
from parafold.fold.outputs import Prediction, is_complete, write_target_outputs
from parafold.fold.settings import ModelSettings

__all__ = ["FoldWorker", "FoldOutcome"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FoldOutcome:
    """What became of one target; `error` names the failure when `ok` is false."""

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


@dataclass(frozen=True, slots=True)
class _Job:
    fs: FeatureSet
    model_name: str
    pred_name: str
    seed: int
    last_of_target: bool


@dataclass(slots=True)
class _TargetState:
    fs: FeatureSet
    raw: dict[str, np.ndarray] | None = None
    predictions: list[Prediction] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    bucket: str = ""


class FoldWorker:
    """Predicts structures for feature sets with compilation shared across models and targets."""

    def __init__(self, params_dir: Path, settings: ModelSettings, *,
                 trust_pickles: bool = False) -> None:
        from parafold.fold.runner import ModelRunner

        self.params_dir = Path(params_dir)
        self.settings = settings
        self.trust_pickles = trust_pickles
        self.runner = ModelRunner(settings)
        self._params: dict[str, Any] = {}

    @property
    def stats(self) -> dict[str, Any]:
        return self.runner.stats.as_dict()

    def shape_key(self, fs: FeatureSet, model_name: str | None = None) -> ShapeKey:
        return shape_key(fs.length, fs.msa_depth, model_name or self.settings.model_names[0],
                         self.settings)

    def group(self, feature_sets: Sequence[FeatureSet]) -> list[list[FeatureSet]]:
        """Feature sets grouped by the shape key of the first model, groups in key order."""
        groups: dict[ShapeKey, list[FeatureSet]] = {}
        for fs in feature_sets:
            groups.setdefault(self.shape_key(fs), []).append(fs)
        return [sorted(groups[k], key=lambda f: (f.length, f.name)) for k in sorted(groups)]

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

    def _jobs(self, fs: FeatureSet) -> list[_Job]:
        names = self.settings.model_names
        runs = [(m, s) for m in names for s in range(self.settings.num_seeds)]
        jobs = []
        for index, (model_name, s) in enumerate(runs):
            pred = model_name if self.settings.num_seeds == 1 else f"{model_name}_pred_{s}"
            seed = index + self.settings.random_seed * len(runs)
            jobs.append(_Job(fs, model_name, pred, seed, index == len(runs) - 1))
        return jobs

    def _launch(self, job: _Job, state: _TargetState, *, low_memory: bool) -> tuple[Any, dict]:
        from parafold.fold.processing import process_features

        if state.raw is None:
            state.raw = job.fs.load(trust_pickles=self.trust_pickles)
        key = shape_key(job.fs.length, job.fs.msa_depth, job.model_name, self.settings,
                        low_memory=low_memory)
        state.bucket = key.describe()
        params = self._device_params(job.model_name)
        started = time.perf_counter()
        feats = process_features(state.raw, self.runner.config(job.model_name, key), key, job.seed)
        state.timings[f"process_features_{job.pred_name}"] = time.perf_counter() - started
        compile_before = self.runner.stats.compile_s
        launched = self.runner.launch(job.model_name, key, params, feats, job.seed)
        state.timings[f"compile_{job.pred_name}"] = self.runner.stats.compile_s - compile_before
        return launched, feats

    def _finish(self, job: _Job, state: _TargetState, launched: Any, feats: dict) -> None:
        from parafold.fold.processing import unpad_result

        result, seconds = self.runner.fetch(launched)
        state.timings[f"predict_{job.pred_name}"] = seconds
        length = job.fs.length
        state.predictions.append(Prediction(
            name=job.pred_name, model_name=job.model_name, seed=job.seed,
            result=unpad_result(result, length), aatype=feats["aatype"][0][:length],
            residue_index=feats["residue_index"][0][:length],
            timings={k: v for k, v in state.timings.items() if k.endswith(job.pred_name)}))

    def _retry(self, job: _Job, state: _TargetState, exc: GpuOutOfMemoryError) -> None:
        log.warning("%s (%d residues, %s): %s; retrying with less memory", job.fs.name,
                    job.fs.length, state.bucket, exc)
        try:
            launched, feats = self._launch(job, state, low_memory=True)
            self._finish(job, state, launched, feats)
        except GpuOutOfMemoryError as again:
            state.error = (f"GPU out of memory for {job.fs.name} ({job.fs.length} residues, "
                           f"bucket {state.bucket}), also with less memory: {again}")

    def _step(self, job: _Job, state: _TargetState, stage: str, action: Any) -> Any:
        """Run `action`, turning a per-target failure into `state.error` (never raising)."""
        try:
            return action()
        except GpuOutOfMemoryError as exc:
            self._retry(job, state, exc)
        except (PipelineError, ValueError, KeyError, RuntimeError) as exc:
            log.exception("%s: %s failed", job.fs.name, stage)
            state.error = f"{stage} failed for {job.fs.name} ({job.fs.length} residues): {exc}"
        return None

    def fold(self, feature_sets: Sequence[FeatureSet], out_root: Path) -> list[FoldOutcome]:
        """Predict and write `out_root/<name>/...` for each set; one outcome per set, in order."""
        out_root = Path(out_root)
        outcomes: dict[str, FoldOutcome] = {}
        todo: list[FeatureSet] = []
        for fs in feature_sets:
            folder = out_root / fs.name
            if is_complete(folder):
                outcomes[fs.name] = FoldOutcome(name=fs.name, ok=True, skipped=True,
                                                length=fs.length, output_dir=folder)
            else:
                todo.append(fs)
        states: dict[str, _TargetState] = {}
        pending: tuple[_Job, _TargetState, Any, dict] | None = None
        ordered = [fs for group in self.group(todo) for fs in group]
        for position, job in enumerate(j for fs in ordered for j in self._jobs(fs)):
            state = states.setdefault(job.fs.name, _TargetState(job.fs))
            launched = None
            key = shape_key(job.fs.length, job.fs.msa_depth, job.model_name, self.settings)
            if pending is not None and not self.runner.has(key):
                # A compile would stall the host: finish the pending job first so its
                # predict time does not include this compile.
                self._complete(pending, out_root, outcomes)
                pending = None
            if state.error is None:
                launched = self._step(job, state, "predict", lambda j=job, s=state:
                                      self._launch(j, s, low_memory=False))
            if pending is not None:
                self._complete(pending, out_root, outcomes)
            pending = (job, state, *launched) if launched else None
            if pending is None and job.last_of_target:
                self._write(state, out_root, outcomes)
            log.debug("job %d dispatched", position)
        if pending is not None:
            self._complete(pending, out_root, outcomes)
        return [outcomes[fs.name] for fs in feature_sets]

    def _complete(self, pending: tuple[_Job, _TargetState, Any, dict], out_root: Path,
                  outcomes: dict[str, FoldOutcome]) -> None:
        job, state, launched, feats = pending
        if state.error is None:
            self._step(job, state, "predict", lambda: self._finish(job, state, launched, feats))
        if job.last_of_target:
            self._write(state, out_root, outcomes)

    def _write(self, state: _TargetState, out_root: Path, outcomes: dict[str, FoldOutcome]
               ) -> None:
        fs = state.fs
        folder = out_root / fs.name
        if state.error is None:
            try:
                ranked = write_target_outputs(folder, fs.name, state.predictions, state.timings,
                                              save_raw=self.settings.save_raw)
            except (OSError, ValueError) as exc:
                state.error = f"writing outputs for {fs.name} failed: {exc}"
        state.raw = None
        if state.error is not None:
            log.error("%s", state.error)
            outcomes[fs.name] = FoldOutcome(name=fs.name, ok=False, error=state.error,
                                            timings=dict(state.timings), length=fs.length,
                                            bucket=state.bucket, output_dir=folder)
            return
        best = next(p for p in state.predictions if p.name == ranked[0])
        outcomes[fs.name] = FoldOutcome(
            name=fs.name, ok=True, timings=dict(state.timings), mean_plddt=best.mean_plddt,
            ptm=best.ptm, ranked_model_names=tuple(ranked), length=fs.length,
            bucket=state.bucket, output_dir=folder)
        log.info("%s: %d residues, best %s pLDDT %.1f", fs.name, fs.length, ranked[0],
                 best.mean_plddt)
