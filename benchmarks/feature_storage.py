"""Disk a target's `features.npz` takes, and the seconds to write and read it, stored as before
(`np.savez`, no compression) and deflated at a few levels.

A proteome's features are read by the GPU stage, often from a shared file system, and kept
in the cache: at ~25-70 MB a deep MSA uncompressed, 20,000 proteins take 0.5-1.4 TB. The
MSAs here (`fold.synthetic.make_features`, 50% identity, mutations spread evenly, no
terminal gaps) compress worse than real ones, whose rows are mostly gaps outside the aligned
stretch, so the ratios printed are a floor.

    python benchmarks/feature_storage.py                  # the default grid
    python benchmarks/feature_storage.py --levels 1,3,6 --json storage.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from parafold import store
from parafold.fold.synthetic import make_features, random_sequence

GRID = [(100, 500), (250, 3000), (400, 10000)]
TEMPLATES = 20  # AlphaFold's monomer template featurizer keeps up to 20 hits


def _timed(action, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(features: dict[str, np.ndarray], level: int | None, folder: Path,
            repeats: int) -> dict[str, float]:
    """Size and median write/read seconds; level None is the uncompressed `np.savez`."""
    path = folder / f"features_{level}.npz"

    def write() -> None:
        if level is None:
            plain = {k: v for k, v in features.items() if v.dtype != object}
            with store.atomic_writer(path, "wb") as handle:
                np.savez(handle, **plain)
        else:
            store.NPZ_DEFLATE_LEVEL = level
            store.save_arrays(path, features)

    write_s = _timed(write, repeats)
    read_s = _timed(lambda: store.load_arrays(path), repeats)
    return {"mib": path.stat().st_size / 2**20, "write_s": write_s, "read_s": read_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,6", help="deflate levels to compare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    levels: list[int | None] = [None, *(int(v) for v in args.levels.split(","))]
    shipped = store.NPZ_DEFLATE_LEVEL
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length, depth in GRID:
            features = make_features(random_sequence(length, rng), depth, seed=length,
                                     num_templates=TEMPLATES)
            raw_mib = sum(v.nbytes for v in features.values() if v.dtype != object) / 2**20
            for level in levels:
                m = measure(features, level, Path(tmp), args.repeats)
                row = {"length": length, "msa_depth": depth,
                       "storage": "np.savez" if level is None else f"deflate {level}"
                       + (" (shipped)" if level == shipped else ""),
                       "mib": round(m["mib"], 2), "x_smaller": round(raw_mib / m["mib"], 1),
                       "write_s": round(m["write_s"], 3), "read_s": round(m["read_s"], 3)}
                rows.append(row)
                print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    store.NPZ_DEFLATE_LEVEL = shipped
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
