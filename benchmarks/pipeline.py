"""Stages one after the other vs overlapped: `features` then `predict`, against `run`.

Builds (or reuses) a synthetic database set and random weights, then times, each on a fresh
OUT with a fresh search cache and a fresh JAX compilation cache:

1. `parafold features` alone, then `parafold predict` on its output (sequential);
2. `parafold run` (both stages overlapped).

The goal: overlapped <= 1.1 x the longer of the two stages alone. The stages overlap only
when they use different resources (CPU searches vs a GPU); on a CPU-only machine both stages
share the cores and the overlapped run can at best match the sum.

    .venv/bin/python benchmarks/pipeline.py --families 24 --work /tmp/pf_bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PARAFOLD = [sys.executable, "-m", "parafold.cli"]  # works with or without the console script


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    elapsed = time.perf_counter() - start
    label = next(c for c in cmd[3:] if not c.startswith("-"))
    print(f"{label}: {elapsed:.1f} s (exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return elapsed


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/parafold_bench_pipeline"))
    ap.add_argument("--families", type=int, default=24)
    ap.add_argument("--db-dir", type=Path, default=None,
                    help="A synthetic set already built (its queries.fasta is the input).")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--config", choices=("auto", "tiny", "full"), default="auto")
    ap.add_argument("--models", default="1")
    ap.add_argument("--num-recycle", type=int, default=None)
    ap.add_argument("--gpus", default="all")
    ap.add_argument("--max-length", type=int, default=None,
                    help="Fold only the first N residues of each query (default: 64 without a "
                         "GPU, where the model's cost grows with the cube of the length).")
    args = ap.parse_args()

    from parafold.engine.base import detect_gpus, parse_gpus
    from parafold.fold.params import read_params_info, write_random_params
    from parafold.fold.settings import ModelSettings, parse_model_numbers
    from parafold.inputs import read_targets
    from parafold.testdata import build_testdata

    wanted = parse_gpus(args.gpus)
    gpus = detect_gpus() if wanted is None else wanted
    config = args.config if args.config != "auto" else ("full" if gpus else "tiny")
    recycle = args.num_recycle if args.num_recycle is not None else (3 if config == "full" else 1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.db_dir is not None:
        from parafold.testdata import read_testdata

        data = read_testdata(args.db_dir)
    else:
        data = build_testdata(work / "databases", families=args.families, mmseqs=False)
    db_dir = data.root
    max_length = args.max_length if args.max_length is not None else (0 if gpus else 64)
    queries = data.queries
    if max_length:
        queries = work / f"queries_{max_length}.fasta"
        queries.write_text("".join(f">{t.id}\n{t.sequence[:max_length]}\n"
                                   for t in read_targets(data.queries).targets))
    params = work / "params"
    model = ModelSettings(config_size=config, models=parse_model_numbers(args.models),
                          num_recycle=recycle)
    info = read_params_info(params) or {}
    if info.get("config") != config or not set(model.model_names) <= set(info.get("models", [])):
        write_random_params(params, model)

    common_model = ["--params-dir", str(params), "--config", config, "--models",
                    args.models, "--num-recycle", str(recycle)]
    db = ["--db-dir", str(db_dir), "--cpus", str(args.cpus)]
    times: dict[str, float] = {}

    def env_for(name: str) -> dict[str, str]:  # a fresh JAX compile cache per measurement
        return {**os.environ, "XDG_CACHE_HOME": str(_fresh(work / f"xdg_{name}"))}

    seq_out = _fresh(work / "sequential")
    env = env_for("sequential")
    times["features"] = _timed([*PARAFOLD, "features", str(queries), "-o", str(seq_out), *db],
                               env, work / "features.log")
    times["predict"] = _timed([*PARAFOLD, "predict", str(seq_out), "-o", str(seq_out),
                               *common_model], env, work / "predict.log")
    run_out = _fresh(work / "overlapped")
    times["run"] = _timed([*PARAFOLD, "--verbose", "run", str(queries), "-o", str(run_out),
                           *db, *common_model, "--gpus", args.gpus, "--no-progress"],
                          env_for("run"),
                          work / "run.log")
    longer = max(times["features"], times["predict"])
    result = {
        "proteins": len(read_targets(queries).targets), "max_length": max_length or None, "cpus": args.cpus, "gpus": list(gpus), "config": config,
        "features_s": round(times["features"], 1), "predict_s": round(times["predict"], 1),
        "sequential_s": round(times["features"] + times["predict"], 1),
        "overlapped_s": round(times["run"], 1),
        "overlapped_over_longer_stage": round(times["run"] / longer, 3),
        "goal": "<= 1.1",
    }
    print(f"features alone {times['features']:.1f} s, predict alone {times['predict']:.1f} s, "
          f"sequential {times['features'] + times['predict']:.1f} s")
    print(f"run (overlapped) {times['run']:.1f} s = {times['run'] / longer:.2f} x the longer "
          f"stage (goal <= 1.1)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
