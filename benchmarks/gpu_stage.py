"""GPU-stage throughput: parafold's FoldWorker against a stock-AlphaFold-style loop.

Random weights of the real architecture (`--config full`; `tiny` for a CPU smoke run), one
model, 3 recycles, N synthetic proteins with random MSAs. parafold runs every protein through
one FoldWorker (length and MSA-depth buckets, one compile per shape, params swapped in, fused
kernels where the GPU has them) with a fresh persistent-cache folder, so its compiles count.
The stock loop builds a fresh `alphafold.model.model.RunModel` per protein (a fresh jit, so a
compile each time, AlphaFold's padding to 512/5,120 MSA rows, the fork's default config), on
the first `--stock-n` proteins only; its proteins/hour is extrapolated from those and labeled.

    python benchmarks/gpu_stage.py                       # GPU: full config, 200 proteins
    python benchmarks/gpu_stage.py --config tiny --n 4   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_stage")


class GpuSampler:
    """Samples nvidia-smi's utilization.gpu (fraction of time a kernel ran) in the background."""

    def __init__(self, period_ms: int = 200) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={period_ms}", "-i", "0"], stdout=subprocess.PIPE, text=True,
                stderr=subprocess.DEVNULL)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()) / 100.0)
            except ValueError:
                continue

    def mark(self) -> int:
        return len(self.samples)

    def mean_since(self, start: int) -> float | None:
        window = self.samples[start:]
        return float(np.mean(window)) if window else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)


def make_inputs(root: Path, n: int, min_len: int, max_len: int, min_depth: int, max_depth: int,
                seed: int) -> list:
    from parafold.featureset import write_feature_set
    from parafold.fold.synthetic import make_features, random_sequence

    rng = np.random.default_rng(seed)
    sets = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        depth = int(rng.integers(min_depth, max_depth + 1))
        feats = make_features(random_sequence(length, rng), depth, seed=seed + i,
                              description=f"p{i:04d}")
        sets.append(write_feature_set(root / f"p{i:04d}", name=f"p{i:04d}", target_id=f"p{i:04d}",
                                      features=feats))
    return sets


def run_parafold(args, params_dir: Path, sets: list, out: Path, cache: Path, sampler) -> dict:
    from parafold.fold.settings import ModelSettings
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(models=(args.model,), num_recycle=args.num_recycle,
                             config_size=args.config, compile_cache_dir=cache)
    worker = FoldWorker(params_dir, settings)
    worker.load_params()
    mark = sampler.mark()
    started = time.perf_counter()
    outcomes = worker.fold(sets, out)
    wall = time.perf_counter() - started
    stats = worker.stats
    ok = sum(o.ok for o in outcomes)
    return {
        "proteins": len(sets), "ok": ok, "wall_s": round(wall, 2),
        "proteins_per_hour": round(ok / wall * 3600, 1),
        "compiles": stats["compiles"], "xla_compiles": stats["xla_compiles"],
        "compile_s": stats["compile_s"], "predict_s": stats["predict_s"],
        "shapes": sorted({o.bucket for o in outcomes}),
        "busy_fraction_nvidia_smi": sampler.mean_since(mark),
        "busy_fraction_est": round(stats["predict_s"] / wall, 3),
        "warm_s_per_protein": round((wall - stats["compile_s"]) / max(ok, 1), 3),
        "fused_kernels": bool(worker.runner.pallas.get("use_pallas")),
    }


def run_stock(args, params_dir: Path, sets: list, sampler) -> dict:
    """A fresh RunModel per protein, as run_alphafold.py does per model per protein."""
    import jax
    from alphafold.model import config as af_config
    from alphafold.model import model as af_model

    from parafold.fold.config import TINY_OVERRIDES
    from parafold.fold.params import load_params
    from parafold.fold.settings import ModelSettings

    name = f"model_{args.model}_ptm"
    settings = ModelSettings(models=(args.model,), config_size=args.config, compile_cache_dir=None)
    params = load_params(params_dir, name, settings)
    subset = sets[: args.stock_n]
    times = []
    mark = sampler.mark()
    for fs in subset:
        cfg = af_config.model_config(name)
        if args.config == "tiny":
            cfg.update_from_flattened_dict(TINY_OVERRIDES)
            cfg.data.common.max_extra_msa = 64
        cfg.model.global_config.zero_init = False
        cfg.data.common.num_recycle = args.num_recycle
        cfg.model.num_recycle = args.num_recycle
        cfg.data.eval.num_ensemble = 1
        raw = fs.load()
        started = time.perf_counter()
        runner = af_model.RunModel(cfg, params)
        feat = runner.process_features(raw, random_seed=0)
        result, _ = runner.predict(feat, random_seed=0)
        jax.block_until_ready(result)
        times.append(time.perf_counter() - started)
        log.info("stock %s (%d residues): %.1f s", fs.name, fs.length, times[-1])
        sys.stdout.flush()
    mean = float(np.mean(times))
    return {"proteins_timed": len(subset), "s_per_protein": round(mean, 2),
            "proteins_per_hour_extrapolated": round(3600 / mean, 1),
            "busy_fraction_nvidia_smi": sampler.mean_since(mark)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("full", "tiny"), default="full")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--min-len", type=int, default=50)
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--min-depth", type=int, default=64)
    parser.add_argument("--max-depth", type=int, default=500)
    parser.add_argument("--model", type=int, default=1)
    parser.add_argument("--num-recycle", type=int, default=3)
    parser.add_argument("--stock-n", type=int, default=6, help="proteins timed in the stock loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="save the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(name)s: %(message)s")

    import jax

    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="parafold-bench-"))
    log.info("backend %s, devices %s, workdir %s", jax.default_backend(), jax.devices(), work)
    started = time.perf_counter()
    write_random_params(work / "weights", ModelSettings(models=(args.model,),
                        config_size=args.config, compile_cache_dir=None), seed=args.seed)
    log.info("random params in %.1f s", time.perf_counter() - started)
    started = time.perf_counter()
    sets = make_inputs(work / "features", args.n, args.min_len, args.max_len, args.min_depth,
                       args.max_depth, args.seed)
    log.info("%d synthetic feature sets in %.1f s", len(sets), time.perf_counter() - started)
    sampler = GpuSampler()
    try:
        cache = work / f"jax-cache-{time.time_ns()}"
        ours = run_parafold(args, work / "weights", sets, work / "out", cache, sampler)
        stock = run_stock(args, work / "weights", sets, sampler) if args.stock_n > 0 else None
    finally:
        sampler.stop()
    report = {"device": str(jax.devices()[0]), "config": args.config, "model": args.model,
              "num_recycle": args.num_recycle, "parafold": ours, "stock_loop": stock}
    if stock:
        report["speedup"] = round(ours["proteins_per_hour"] / stock["proteins_per_hour_extrapolated"], 1)
    print("\n=== GPU stage benchmark ===")
    print(f"device: {report['device']}  config: {args.config}  model_{args.model}_ptm x "
          f"{args.num_recycle} recycles  proteins: {args.n} ({args.min_len}-{args.max_len} residues)")
    print(f"parafold: {ours['proteins_per_hour']} proteins/hour  wall {ours['wall_s']} s  "
          f"compiles {ours['compiles']} ({ours['xla_compiles']} by XLA) in {ours['compile_s']} s  "
          f"warm {ours['warm_s_per_protein']} s/protein  fused kernels {ours['fused_kernels']}")
    print(f"          GPU busy (nvidia-smi) {ours['busy_fraction_nvidia_smi']}  "
          f"(predict time / wall) {ours['busy_fraction_est']}")
    if stock:
        print(f"stock loop (fresh RunModel per protein, {stock['proteins_timed']} timed, "
              f"EXTRAPOLATED): {stock['proteins_per_hour_extrapolated']} proteins/hour  "
              f"{stock['s_per_protein']} s/protein  GPU busy {stock['busy_fraction_nvidia_smi']}")
        print(f"speedup: {report['speedup']}x")
    sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
