"""Time to the first prediction in a warm process: persistent cache only vs executable cache.

A cold process compiles one shape (filling both caches); then fresh processes run the same
prediction with `executable_cache` off (JAX's persistent cache: trace + lower + cache hit)
and on (deserialize only). Tiny config on the CPU by default:

    .venv/bin/python benchmarks/warm_start.py [--repeats 2] [--length 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import jax, numpy as np
from parafold.fold.buckets import shape_key
from parafold.fold.params import load_params
from parafold.fold.processing import process_features
from parafold.fold.runner import ModelRunner
from parafold.fold.settings import ModelSettings
from parafold.fold.synthetic import make_features, random_sequence
root, exe, length, size = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
s = ModelSettings(config_size=size, models=(3,), num_recycle=1, float32=True,
                  compile_cache_dir=root / "cache", executable_cache=exe)
imported = time.perf_counter()
runner = ModelRunner(s)
params = jax.device_put(load_params(root / "weights", "model_3_ptm", s))
key = shape_key(length, 9, "model_3_ptm", s)
raw = make_features(random_sequence(length, np.random.default_rng(0)), 9, seed=0)
feats = process_features(raw, runner.config("model_3_ptm", key), key, seed=0)
ready = time.perf_counter()
runner.executable("model_3_ptm", key, params, {k: v[0] for k, v in feats.items()})
compiled = time.perf_counter()
runner.fetch(runner.launch("model_3_ptm", key, params, feats, 0))
done = time.perf_counter()
print("RESULT" + json.dumps({"imports_s": imported - t0, "inputs_s": ready - imported,
      "executable_s": compiled - ready, "first_prediction_s": done - imported,
      "stats": runner.stats.as_dict()}))
"""


def _child(root: Path, exe: bool, length: int, size: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), "1" if exe else "0",
                           str(length), size], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[6:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--config", default="tiny", choices=("tiny", "full"))
    args = parser.parse_args()
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings

    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        root = Path(tmp)
        write_random_params(root / "weights", ModelSettings(config_size=args.config,
                                                            models=(3,)), seed=0)
        started = time.perf_counter()
        cold = _child(root, True, args.length, args.config)
        print(f"cold process: executable {cold['executable_s']:.2f} s "
              f"(total {time.perf_counter() - started:.1f} s) {cold['stats']}")
        for exe, label in ((False, "before (persistent cache only)"),
                           (True, "after  (executable cache)     ")):
            runs = [_child(root, exe, args.length, args.config) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["first_prediction_s"])
            print(f"{label}: executable ready in {best['executable_s']:.2f} s, first prediction "
                  f"{best['first_prediction_s']:.2f} s after imports (imports "
                  f"{best['imports_s']:.1f} s; best of {args.repeats}; "
                  f"executable_hits={best['stats']['executable_hits']} "
                  f"persistent_hits={best['stats']['persistent_hits']})")


if __name__ == "__main__":
    main()
