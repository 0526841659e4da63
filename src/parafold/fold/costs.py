"""What a shape costs a fold worker: seconds to compile it, and device seconds per target run
in it. The planner (`buckets.merge_groups`) weighs the two: a group runs in a bigger shape
that runs anyway when its targets' extra device time there is less than a compile.

Device time is modelled as matmul work (`workmodel.shape_flops`, exact for the padded shape)
over a rate measured on each platform; compiles as a measured constant per executable, times
the executables the run's models need at a shape. Measured figures (random weights, 1 model
x 3 recycles):

* GPU, full config (NVIDIA H100, jax 0.11.2, fused kernels, stop 10): compiles took 24.6-30.3 s
  one at a time; the first 316 of 1,000 proteins (50-150 residues, 32-127 MSA rows; shapes
  L=56-80, 127 clusters, 80 extra rows) took 27.5 s of device time in 12 batches of ~26: 0.087
  s a protein, 6.1 TFLOP of matmul work each at their padded shapes (4 iterations), so ~70
  TFLOP/s. Bigger shapes use the GPU better, so the rate overstates their time and merges
  stay on the safe side. The tiny config on a GPU is not measured: its figures are guesses.
* CPU (this project's 2-core machine, with a compile thread beside the predictions): tiny
  config, compiles 18-29 s and ~20 GFLOP/s (6 proteins of 43-113 residues, one model, 4
  iterations, 4.4-14.6 s each); full config, a 26 s compile and 52 GFLOP/s (48 residues, 28.7
  s). The CPU matters for the demo and tests.

Constants, not live measurements, so that a run plans the same shapes every time and a warm
rerun hits the compilation caches. `ModelSettings.compile_cost_s` overrides the compile
figure (0 turns merging off).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from parafold.fold.buckets import ShapeKey, shape_key
from parafold.fold.config import depth_caps, family_of, uses_templates
from parafold.fold.settings import ModelSettings
from parafold.shards import cut_by_work

if TYPE_CHECKING:
    from parafold.featureset import FeatureSet

__all__ = ["ShapeCosts", "shape_costs", "CostRun", "cut_by_cost", "StagePlan", "plan_stage"]

# (platform, config size) -> (seconds to compile one executable, matmul FLOP/s)
_MEASURED: dict[tuple[str, str], tuple[float, float]] = {
    ("gpu", "full"): (27.0, 7.0e13),
    ("gpu", "tiny"): (5.0, 7.0e13),  # not measured
    ("cpu", "full"): (26.0, 5.0e10),
    ("cpu", "tiny"): (20.0, 2.0e10),
}


@dataclass(frozen=True, slots=True)
class ShapeCosts:
    """Seconds a worker pays to compile a shape (`group_compile_s`: the executables every model
    of the run needs there; `compile_s` each) and to run one target in it (every model, seed
    and recycling iteration)."""

    compile_s: float
    flops_per_s: float
    predictions: int
    iterations: int
    config_size: str
    settings: ModelSettings

    def executables(self, key: ShapeKey) -> int:
        """Executables a group at first-model `key` needs for all the run's models: models
        whose keys coincide share one (without templates and with a shallow MSA, all five)."""
        return _executables(replace(key, batch=1, low_memory=False), self.settings)

    def group_compile_s(self, key: ShapeKey) -> float:
        """Seconds of compiles a group at first-model `key` brings (`executables` of them)."""
        return self.compile_s * self.executables(key)

    def run_s(self, key: ShapeKey) -> float:
        """Device seconds of one target at `key`'s padded sizes, all its predictions; infinite
        for a shape the work model does not cover (nothing is merged on a guess)."""
        from parafold.fold.workmodel import shape_flops

        try:
            work = shape_flops(replace(key, batch=1, low_memory=False), self.config_size)
        except ValueError:
            return math.inf
        return work * self.iterations * self.predictions / self.flops_per_s

    def describe(self) -> str:
        return (f"{self.flops_per_s:.3g} FLOP/s of matmul work, {self.predictions} "
                f"prediction(s) x {self.iterations} iterations a target")


def shape_costs(settings: ModelSettings, platform: str) -> ShapeCosts:
    """The measured costs for `platform` ("gpu" for any accelerator, or "cpu")."""
    compile_s, rate = _MEASURED[("cpu" if platform == "cpu" else "gpu", settings.config_size)]
    if settings.compile_cost_s is not None:
        compile_s = settings.compile_cost_s
    return ShapeCosts(compile_s=compile_s, flops_per_s=rate,
                      predictions=len(settings.model_names) * settings.num_seeds,
                      iterations=settings.num_iterations, config_size=settings.config_size,
                      settings=settings)


@functools.lru_cache(maxsize=4096)
def _executables(key: ShapeKey, settings: ModelSettings) -> int:
    """Executables a target at first-model `key` needs for all of `settings`' models: models
    whose keys coincide share one (a target without templates and a shallow MSA: one for all
    five; with templates: two). The target is one the key is the own key of (as many cluster
    rows as the key, or those and its extra rows); a first model without templates cannot
    tell whether targets have them, so they are taken to (the dearer case)."""
    first = settings.model_names[0]
    templates = key.templates > 0 or not uses_templates(first)
    own_clusters = depth_caps(first, settings.config_size).clusters
    for rows in (min(key.clusters, own_clusters), own_clusters + key.extra):
        if shape_key(key.length, rows, first, settings, templates=templates) == key:
            return len({shape_key(key.length, rows, name, settings, templates=templates)
                        for name in settings.model_names})
    return len({family_of(name, templates=templates) for name in settings.model_names})


@dataclass(frozen=True, slots=True)
class CostRun:
    """A stretch of the shape order: its feature sets, their modelled device seconds, and the
    own shapes (first model) they fall in."""

    sets: list[FeatureSet]
    seconds: float
    shapes: frozenset[ShapeKey]


def cut_by_cost(feature_sets: Sequence[FeatureSet], count: int, settings: ModelSettings,
                platform: str) -> list[CostRun]:
    """The sets sorted by the shape of their own bucket (first model) and cut into `count`
    runs of about equal modelled device time: a run's shapes are neighbours, so a worker
    given one compiles few of them (job-array shards, devices)."""
    costs = shape_costs(settings, platform)
    model = settings.model_names[0]
    keys = {fs.name: shape_key(fs.length, fs.msa_depth, model, settings,
                               templates=fs.num_templates > 0) for fs in feature_sets}
    seconds = {key: costs.run_s(key) for key in set(keys.values())}
    parts = cut_by_work(feature_sets, count, order=lambda fs: (keys[fs.name], fs.length, fs.name),
                        work=lambda fs: seconds[keys[fs.name]])
    return [CostRun(part, sum(seconds[keys[fs.name]] for fs in part),
                    frozenset(keys[fs.name] for fs in part)) for part in parts]


@dataclass(frozen=True, slots=True)
class StagePlan:
    """The GPU stage a set of feature sets makes, as `FoldWorker.group` plans it (merges
    included, one worker), priced by `ShapeCosts`: modelled, not measured."""

    targets: int
    shapes: int  # the first model's, after merging
    executables: int  # for all the run's models
    compile_s: float
    device_s: float
    pipelined_s: float  # one compile-ahead thread overlapping the device, most work first
    work_vs_own_buckets: float  # padded work after merging / each target in its own bucket
    work_vs_real_lengths: float  # / each target at its own length (MSA buckets counted)
    costs: ShapeCosts

    @property
    def sequential_s(self) -> float:
        return self.compile_s + self.device_s

    @property
    def per_hour(self) -> float:
        return 3600 * self.targets / self.pipelined_s if self.pipelined_s else 0.0

    def lines(self, platform: str) -> list[str]:
        """What `--dry-run` prints of it: shapes, executables, padding, modelled times."""
        where = ("one GPU (an H100's figures" if platform == "gpu"
                 else "the CPU (a 2-core machine's")
        where += ("; guesses for the tiny config)"
                  if (platform, self.costs.config_size) == ("gpu", "tiny") else ")")
        return [f"  shapes after merging: {self.shapes}; executables to compile for all "
                f"models: {self.executables}; padded work {self.work_vs_real_lengths:.2f}x "
                "the proteins' own",
                f"  modelled on {where} from cold caches: compiles {_duration(self.compile_s)} "
                f"({self.costs.compile_s:.0f} s an executable), device "
                f"{_duration(self.device_s)}, about {_duration(self.pipelined_s)} with the "
                f"compiles overlapped: ~{self.per_hour:,.0f} proteins/hour (a model, not a "
                "measurement; cached compiles and more GPUs take less)"]


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_stage(feature_sets: Sequence[FeatureSet], settings: ModelSettings, platform: str,
               *, merge: bool = True) -> StagePlan:
    """Shapes, executables and modelled seconds of folding `feature_sets` on one worker of
    `platform` ("gpu" prices with the H100 figures above) from cold caches; `merge` false:
    every group in its own shape."""
    from collections import Counter

    from parafold.fold.buckets import plan_merges
    from parafold.fold.workmodel import shape_flops

    costs = shape_costs(settings, platform)
    own, dest = plan_merges([(fs.length, fs.msa_depth, fs.num_templates > 0)
                             for fs in feature_sets], settings,
                            compile_s=costs.group_compile_s if merge else 0.0,
                            run_s=costs.run_s)
    ran = [dest[key] for key in own]
    work: Counter[ShapeKey] = Counter()
    for key in ran:
        work[key] += costs.run_s(key)
    compiles = {key: costs.group_compile_s(key) for key in work}
    compiled = device = 0.0
    for key in sorted(work, key=lambda k: (-work[k], k)):  # the worker's order
        compiled += compiles[key]
        device = max(device, compiled) + work[key]
    size = settings.config_size
    padded = sum(shape_flops(key, size) for key in ran)
    own_work = sum(shape_flops(key, size) for key in own)
    real_work = sum(shape_flops(replace(key, length=fs.length), size)
                    for key, fs in zip(own, feature_sets, strict=True))
    return StagePlan(
        targets=len(feature_sets), shapes=len(work),
        executables=sum(costs.executables(key) for key in work),
        compile_s=sum(compiles.values()), device_s=sum(work.values()), pipelined_s=device,
        work_vs_own_buckets=padded / own_work if own_work else 1.0,
        work_vs_real_lengths=padded / real_work if real_work else 1.0, costs=costs)
