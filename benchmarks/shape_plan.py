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
the device perfectly (`pipelined_s`, shapes in the worker's order, most work first; and in
plain key order for comparison). The model is the planner's own view, not a measurement: the
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
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from parafold.featureset import FeatureSet
from parafold.fold.buckets import merge_targets, shape_key
from parafold.fold.costs import ShapeCosts, cut_by_cost, shape_costs
from parafold.fold.settings import ModelSettings
from parafold.fold.synthetic import random_sequence
from parafold.fold.workmodel import shape_flops
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


def plan(proteins: list[tuple[int, int]], settings: ModelSettings, costs: ShapeCosts, *,
         merge: bool, templates: bool = False) -> dict[str, float]:
    """Shapes (of the first model), executables, padded work and modelled seconds of one
    plan; `templates`: every protein has them (gpu_stage's inputs have none)."""
    model = settings.model_names[0]
    own = [shape_key(length, rows, model, settings, templates=templates)
           for length, rows in proteins]
    dest = merge_targets(own, [length for length, _ in proteins],
                         compile_s=costs.group_compile_s if merge else 0.0, run_s=costs.run_s,
                         max_waste=settings.merge_max_waste)
    ran = [dest[key] for key in own]
    own_work = sum(shape_flops(key, settings.config_size) for key in own)
    ran_work = sum(shape_flops(key, settings.config_size) for key in ran)
    real_work = sum(shape_flops(replace(key, length=length), settings.config_size)
                    for key, (length, _) in zip(own, proteins, strict=True))
    shapes = len(set(ran))
    compile_s = {key: costs.group_compile_s(key) for key in set(ran)}
    compiles = sum(compile_s.values())
    device_s = sum(costs.run_s(key) for key in ran)
    work = Counter()
    for key in ran:
        work[key] += costs.run_s(key)
    return {"shapes": shapes, "executables": sum(costs.executables(k) for k in set(ran)),
            "work_vs_own_buckets": round(ran_work / own_work, 3),
            "work_vs_real_lengths": round(ran_work / real_work, 3),
            "compile_s": round(compiles, 1), "device_s": round(device_s, 1),
            "modelled_cold_s": round(compiles + device_s, 1),
            "modelled_per_hour": round(3600 * len(proteins) / (compiles + device_s)),
            "pipelined_key_order_s": round(pipelined_s([(compile_s[k], work[k])
                                                        for k in sorted(work)]), 1),
            "pipelined_s": round(pipelined_s(sorted(((compile_s[k], work[k]) for k in work),
                                                    key=lambda pair: -pair[1])), 1)}


def pipelined_s(shapes: list[tuple[float, float]]) -> float:
    """Wall time when one thread compiles the shapes (compile seconds, device seconds) in
    order while the device runs each shape's work as soon as its compile is done and the
    shape before it has run."""
    compiled = device = 0.0
    for compile_s, seconds in shapes:
        compiled += compile_s
        device = max(device, compiled) + seconds
    return device


def array_plan(proteins: list[tuple[int, int]], settings: ModelSettings, platform: str,
               shards: int, *, by_shape: bool, templates: bool = False) -> dict[str, float]:
    """Compiles and modelled times of N tasks, each planning its own part like a worker."""
    sets = [FeatureSet(name=f"{i:07d}", target_id=str(i), sequence="A" * length,
                       path=Path("."), msa_depth=rows, num_templates=4 if templates else 0)
            for i, (length, rows) in enumerate(proteins)]
    if by_shape:  # as `predict --shard` cuts
        parts = [run.sets for run in cut_by_cost(sets, shards, settings, platform)]
    else:
        parts = [Shard(k, shards).by_hash(sets, key=lambda fs: fs.target_id)
                 for k in range(shards)]
    costs = shape_costs(settings, platform)
    tasks = [plan([(fs.length, fs.msa_depth) for fs in part], settings, costs, merge=True,
                  templates=templates)
             if part else {"shapes": 0, "pipelined_s": 0.0} for part in parts]
    slowest = max(t["pipelined_s"] for t in tasks)
    return {"compiles": sum(t["shapes"] for t in tasks),
            "most_in_a_task": max(t["shapes"] for t in tasks),
            "slowest_task_s": round(slowest, 1),
            "fastest_task_s": round(min(t["pipelined_s"] for t in tasks), 1),
            "per_hour_per_gpu": round(3600 * len(proteins) / slowest / shards)}


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
    rows = {label: plan(proteins, base, costs, merge=merge, templates=args.with_templates)
            for label, merge in (("no merges", False), ("merges (default)", True))}
    if args.shards:
        for label, by_shape in (("array, cut by shape", True), ("array, cut at random", False)):
            rows[label] = array_plan(proteins, base, args.platform, args.shards,
                                     by_shape=by_shape, templates=args.with_templates)
    width = max(len(k) for k in rows)
    for label, row in rows.items():
        print(f"{label:<{width}}  " + "  ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
