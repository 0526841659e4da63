"""Host CPU a GPU needs for feature processing: seconds per protein per model, by length and
MSA depth, and the helper processes that keep a GPU fed.

AlphaFold processes a target's raw features once per model run (MSA sampling, masking, and
clustering the extra MSA around the sampled rows, for every recycling iteration), in
`fold.hostwork.process_job` helpers beside the GPU. Its cost grows with the raw MSA depth:
shallow MSAs take a fraction of a second, deep ones seconds, which can be more than the GPU
spends on the protein. Each protein here has its own (length, depth), as in a real run, so
the seconds include the per-shape compiles of the fork's small jax helpers (clustering,
sampling) that a repeated shape would not pay again.

    python benchmarks/host_features.py                     # the default grid, one core
    python benchmarks/host_features.py --gpu-s 0.1,0.45    # helpers needed at those GPU times

"Helpers needed" = processing seconds / GPU seconds per protein per model: how many helper
processes (one core each) keep a GPU that takes `gpu_s` per protein busy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the helpers run on the CPU
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as `lifecycle.helper_process_init` sets it

import numpy as np  # noqa: E402

from parafold.fold.buckets import shape_key  # noqa: E402
from parafold.fold.config import model_config  # noqa: E402
from parafold.fold.processing import process_features  # noqa: E402
from parafold.fold.settings import ModelSettings  # noqa: E402
from parafold.fold.synthetic import make_features, random_sequence  # noqa: E402

GRID = [(100, 60), (100, 500), (150, 1000), (150, 3000), (250, 3000), (250, 8000),
        (400, 5000), (400, 10000)]


def measure(length: int, depth: int, settings: ModelSettings, rng: np.random.Generator,
            repeats: int) -> float:
    """Median seconds of `process_features` for fresh proteins of this length and depth
    (lengths differ by a residue between repeats, so every call meets a new shape)."""
    model = settings.model_names[0]
    seconds = []
    for r in range(repeats):
        n = length + r
        raw = make_features(random_sequence(n, rng), depth, seed=n)
        key = shape_key(n, depth, model, settings, templates=False)  # make_features: none
        cfg = model_config(model, settings, clusters=key.clusters, extra=key.extra,
                           templates=key.templates, pallas={"use_pallas": False})
        started = time.perf_counter()
        process_features(raw, cfg, key, seed=r)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-s", default="0.1,0.45",
                        help="GPU seconds per protein per model to size helpers for")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gpu_s = [float(v) for v in args.gpu_s.split(",")]
    settings = ModelSettings(models=(1,), compile_cache_dir=None)
    rng = np.random.default_rng(0)
    measure(60, 30, settings, rng, 1)  # imports and first-use costs, not counted
    rows = []
    for length, depth in GRID:
        s = measure(length, depth, settings, rng, args.repeats)
        row = {"length": length, "msa_depth": depth, "seconds": round(s, 3),
               **{f"helpers_at_{g}s": round(s / g, 1) for g in gpu_s}}
        rows.append(row)
        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
