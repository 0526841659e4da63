"""How many shapes a protein set compiles, and what the merges cost in padded work: the plan
`FoldWorker.group` makes, without an accelerator.

For the same synthetic sets `gpu_stage.py` folds (same generator and seed, so the same
lengths and MSA depths), prints the shapes with and without merging groups into bigger
shapes (`buckets.merge_groups`), the padded matmul work of each plan relative to every
target in its own bucket (`workmodel.shape_flops`), and a *modelled* cold time of the GPU
stage: compiles (the executables the run's models need at each shape: models 1-5 share one
for a target without templates and a shallow MSA, `ShapeCosts.executables`) x `compile_s` +
device seconds from `ShapeCosts.run_s` (constants measured on
an H100, see `parafold.fold.costs`), and the same with one compile-ahead thread overlapping
the device perfectly (`pipelined_s`, shapes in the worker's order, most work first): the plan
`costs.plan_stage` makes, which `parafold predict --dry-run` prints for real feature sets. The model is the planner's own view, not a measurement: the
GPU benchmark is what checks it.

    python benchmarks/shape_plan.py                                   # issue 3's 200 of 50-300
    python benchmarks/shape_plan.py --n 1000 --lengths 50-150 --depths 32-127
    python benchmarks/shape_plan.py --n 1000 --lengths 50-150 --depths 32-127 --models 1,2,3,4,5 \
        --with-templates       # every protein with templates (gpu_stage's have none)

With `--shards N`, also the GPU stage of a job array of N one-GPU tasks (`predict --shard`):
the set cut by shape into runs of equal modelled work (`costs.cut_by_cost`) against a cut at
random, each task planned on its own: compiles over all tasks and the slowest task's modelled
(pipelined) time, which is when the array is done. `predict --gpus` on N devices makes the same
cut (in 4 stretches per device, so an idle device can take over the busiest one's last).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from parafold.featureset import FeatureSet
from parafold.fold.costs import cut_by_cost, plan_stage, shape_costs
from parafold.fold.settings import ModelSettings
from parafold.fold.synthetic import random_sequence
from parafold.shards import Shard


def sample_set(n: int, lengths: tuple[int, int], depths: tuple[int, int], seed: int
               ) -> list[tuple[int, int]]:
    """(length, MSA rows) of `gpu_stage.make_inputs`' proteins: it draws from one generator
    in this order, with a random sequence between length and depth."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        depth = int(rng.integers(depths[0], depths[1] + 1))
        random_sequence(length, rng)
        out.append((length, depth))
    return out


def feature_sets(proteins: list[tuple[int, int]], templates: bool) -> list[FeatureSet]:
    """Stand-ins for the proteins (only length, MSA rows and templates are planned on)."""
    return [FeatureSet(name=f"{i:07d}", target_id=str(i), sequence="A" * length,
                       path=Path("."), msa_depth=rows, num_templates=4 if templates else 0)
            for i, (length, rows) in enumerate(proteins)]


def plan(sets: list[FeatureSet], settings: ModelSettings, platform: str, *,
         merge: bool) -> dict[str, float]:
    """Shapes (of the first model), executables, padded work and modelled seconds of one
    plan (`costs.plan_stage`, what `predict --dry-run` prints)."""
    stage = plan_stage(sets, settings, platform, merge=merge)
    return {"shapes": stage.shapes, "executables": stage.executables,
            "work_vs_own_buckets": round(stage.work_vs_own_buckets, 3),
            "work_vs_real_lengths": round(stage.work_vs_real_lengths, 3),
            "compile_s": round(stage.compile_s, 1), "device_s": round(stage.device_s, 1),
            "modelled_cold_s": round(stage.sequential_s, 1),
            "modelled_per_hour": round(3600 * len(sets) / stage.sequential_s),
            "pipelined_s": round(stage.pipelined_s, 1)}


def array_plan(sets: list[FeatureSet], settings: ModelSettings, platform: str,
               shards: int, *, by_shape: bool) -> dict[str, float]:
    """Compiles and modelled times of N tasks, each planning its own part like a worker."""
    if by_shape:  # as `predict --shard` cuts
        parts = [run.sets for run in cut_by_cost(sets, shards, settings, platform)]
    else:
        parts = [Shard(k, shards).by_hash(sets, key=lambda fs: fs.target_id)
                 for k in range(shards)]
    tasks = [plan(part, settings, platform, merge=True) if part
             else {"executables": 0, "pipelined_s": 0.0} for part in parts]
    slowest = max(t["pipelined_s"] for t in tasks)
    return {"compiles": sum(t["executables"] for t in tasks),
            "most_in_a_task": max(t["executables"] for t in tasks),
            "slowest_task_s": round(slowest, 1),
            "fastest_task_s": round(min(t["pipelined_s"] for t in tasks), 1),
            "per_hour_per_gpu": round(3600 * len(sets) / slowest / shards)}


def _range(text: str) -> tuple[int, int]:
    low, high = text.split("-")
    return int(low), int(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--lengths", type=_range, default=(50, 300))
    parser.add_argument("--depths", type=_range, default=(64, 500))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="1")
    parser.add_argument("--num-recycle", type=int, default=3)
    parser.add_argument("--config", default="full", choices=("full", "tiny"))
    parser.add_argument("--platform", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--merge-max-waste", type=float, default=0.5)
    parser.add_argument("--with-templates", action="store_true",
                        help="every protein has templates (default: none, as gpu_stage's)")
    parser.add_argument("--shards", type=int, default=0,
                        help="also model a job array of this many one-GPU tasks")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    proteins = sample_set(args.n, args.lengths, args.depths, args.seed)
    base = ModelSettings(models=tuple(int(m) for m in args.models.split(",")),
                         num_recycle=args.num_recycle, config_size=args.config,
                         merge_max_waste=args.merge_max_waste, compile_cache_dir=None)
    costs = shape_costs(base, args.platform)
    print(f"{args.n} proteins of {args.lengths[0]}-{args.lengths[1]} residues, "
          f"{args.depths[0]}-{args.depths[1]} MSA rows; {args.config} config on {args.platform}: "
          f"compile {costs.compile_s:.1f} s an executable, device model {costs.describe()}")
    sets = feature_sets(proteins, args.with_templates)
    rows = {label: plan(sets, base, args.platform, merge=merge)
            for label, merge in (("no merges", False), ("merges (default)", True))}
    if args.shards:
        for label, by_shape in (("array, cut by shape", True), ("array, cut at random", False)):
            rows[label] = array_plan(sets, base, args.platform, args.shards,
                                     by_shape=by_shape)
    width = max(len(k) for k in rows)
    for label, row in rows.items():
        print(f"{label:<{width}}  " + "  ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
