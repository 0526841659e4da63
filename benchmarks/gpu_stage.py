"""GPU-stage throughput: parafold's FoldWorker against a stock-AlphaFold-style loop.

Reports proteins/hour counting feature processing and every output file, the GPU's busy
fraction (union of [dispatch, ready] of each launch over the stage's wall time; nvidia-smi's
utilization too where present), compiles, and useful FLOP/s: the matmul FLOPs of the traced
program at each finished protein's real length and MSA rows (`parafold.fold.workmodel`,
fitted exactly from traces; no padding of any kind counted), over the stage's wall time, and
that as a fraction of a bf16 matmul peak measured in the same run. `--colabfold` also times
`colabfold_batch` on the same inputs (checked to import before any GPU work).

Random weights of the real architecture (`--config full`; `tiny` for a CPU smoke run), one
model, 3 recycles, N synthetic proteins with random MSAs. parafold runs every protein through
one FoldWorker (length and MSA-depth buckets, one compile per shape, params swapped in, fused
kernels where the GPU has them) with a fresh persistent-cache folder, so its compiles count.
The stock loop builds a fresh `alphafold.model.model.RunModel` per model per protein (a fresh
jit, so a compile each time: `run_alphafold.py` started once per protein, as a cluster job per
protein does; AlphaFold's padding to 512/5,120 MSA rows, the fork's default config), on
`--stock-n` proteins spread over the set's lengths; its proteins/hour is extrapolated from
those and labeled. Each is predicted twice, so compile and prediction are timed apart, which
also gives the rate of one `run_alphafold.py` process over the whole set (runners reused, a
compile per model per distinct length), reported beside it.

The JSON is written after each stage, so an outer `timeout` keeps what was measured; a SIGINT
(the time limit's, `--deadline`'s, or `timeout --signal=INT`'s) stops parafold's run and
reports the proteins finished by then, labeled.

    python benchmarks/gpu_stage.py                       # GPU: full config, 200 proteins
    python benchmarks/gpu_stage.py --n 1000 --lengths 50-150 --max-batch 32 --models 1
    python benchmarks/gpu_stage.py --config tiny --n 4 --stock-subset 0 --force-batch  # CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_stage")
STARTED = time.perf_counter()  # --deadline counts from here


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


def make_inputs(root: Path, n: int, min_len: int, max_len: int, min_depth: int,
                max_depth: int, seed: int) -> list:
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


def _useful_flops(done: list, settings, iterations: int) -> float:
    """Matmul FLOPs of the finished targets at their real lengths and MSA rows (the cluster
    and extra rows the model takes of them: `config.depth_caps`), never padded
    (`workmodel.shape_flops`: exact at any size, no tracing)."""
    from dataclasses import replace

    from parafold.fold.buckets import shape_key
    from parafold.fold.config import depth_caps
    from parafold.fold.workmodel import shape_flops

    def useful(fs, name: str) -> float:
        key = shape_key(fs.length, fs.msa_depth, name, settings, templates=fs.num_templates > 0)
        caps = depth_caps(name, settings.config_size)
        clusters = min(fs.msa_depth, caps.clusters)
        extra = min(max(fs.msa_depth - caps.clusters, 0), caps.extra)
        return shape_flops(replace(key, length=fs.length, clusters=clusters, extra=extra),
                           settings.config_size)

    return sum(iterations * useful(fs, name) for fs in done for name in settings.model_names)


def run_parafold(args, params_dir: Path, sets: list, out: Path, cache: Path, sampler) -> dict:
    import jax

    from parafold.fold.outputs import DONE_FILE, is_complete
    from parafold.fold.settings import ModelSettings
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(models=args.models, num_recycle=args.num_recycle,
                             config_size=args.config, compile_cache_dir=cache,
                             max_batch=args.max_batch, force_batch=args.force_batch,
                             host_workers=args.host_workers, compile_ahead=args.compile_ahead,
                             executable_cache=args.executable_cache,
                             compile_cost_s=args.compile_cost,
                             merge_max_waste=args.merge_max_waste)
    worker = FoldWorker(params_dir, settings)
    worker.load_params()
    worker.pools.features(), worker.pools.writes()  # helper start-up is not stage time
    mark = sampler.mark()
    started = time.perf_counter()
    stopped_at: list[tuple[float, float]] = []  # (perf_counter, wall clock) at the limit

    reason: list[str] = []

    def stop() -> None:  # --time-limit: a device call is bounded, a partial rate still counts
        stopped_at.append((time.perf_counter(), time.time()))
        reason.append("time limit")
        # a real signal to the main thread: it interrupts a wait for a compile at once (a
        # flag set by _thread.interrupt_main waited for the compile, up to minutes)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    limit = _stop_after(args)
    timer = threading.Timer(limit, stop) if limit is not None else None
    if timer is not None:
        timer.start()
    try:
        outcomes = worker.fold(sets, out)
    except KeyboardInterrupt:  # ours, or the outer timeout's: report what finished
        if not stopped_at:
            stopped_at.append((time.perf_counter(), time.time()))
            reason.append("interrupted")
        outcomes = None
    finally:
        if timer is not None:
            timer.cancel()
    wall = (stopped_at[0][0] if stopped_at else time.perf_counter()) - started
    stats = worker.stats
    if outcomes is None:  # count the targets whose outputs were complete at the stop
        log.warning("stopped (%s) after %.0f s", reason[0], wall)
        done = [fs for fs in sets if is_complete(out / fs.name)
                and (out / fs.name / DONE_FILE).stat().st_mtime <= stopped_at[0][1]]
        # launches in flight at the stop still finish: only device time before it counts
        stats["busy_s"] = round(worker.busy_s(until=stopped_at[0][0]), 3)
        stats["busy_fraction"] = round(stats["busy_s"] / wall, 4) if wall > 0 else None
    else:
        done = [fs for fs, o in zip(sets, outcomes, strict=True) if o.ok]
    worker.close()
    ok = len(done)
    mem = jax.devices()[0].memory_stats() or {}
    per_model = ok * len(settings.models)
    # what the loop itself spent on compiles: its own compiles plus waits for background ones
    loop_compile_s = round(stats["compile_s"] - stats["compile_ahead_s"]
                           + stats["compile_wait_s"], 3)
    report = {
        "proteins": len(sets), "ok": ok, "models": list(settings.models),
        "stopped_at_time_limit": outcomes is None, "stopped": reason[0] if reason else None,
        "wall_s": round(wall, 2), "proteins_per_hour": round(ok / wall * 3600, 1),
        "compiles": stats["compiles"], "xla_compiles": stats["xla_compiles"],
        "persistent_hits": stats["persistent_hits"], "executable_hits": stats["executable_hits"],
        "compile_s": stats["compile_s"], "compiled_ahead": stats["compiled_ahead"],
        "compile_ahead_s": stats["compile_ahead_s"], "compile_wait_s": stats["compile_wait_s"],
        "loop_compile_s": loop_compile_s,
        "predict_s": stats["predict_s"], "launches": stats["launches"],
        "mean_batch": round(stats["predictions"] / max(1, stats["launches"]), 2),
        "padded_slots": stats["padded_slots"],
        "shapes": sorted({o.bucket for o in outcomes or ()}),
        "busy_fraction": stats["busy_fraction"],
        "busy_fraction_nvidia_smi": sampler.mean_since(mark),
        # the loop's time outside compiles, a prediction; none when a stop at the time
        # limit left no such time
        "warm_s_per_prediction": (round((wall - loop_compile_s) / per_model, 4)
                                  if per_model and wall > loop_compile_s else None),
        # where the fold loop's time went: features wait, launch, fetch wait, record, writes
        "loop_s": stats.get("loop_s"),
        "fused_kernels": bool(worker.runner.pallas.get("use_pallas")),
        "peak_device_bytes": mem.get("peak_bytes_in_use"),
        "host_workers": worker.pools.feature_workers,
    }
    if args.flops and done:
        flops = _useful_flops(done, settings, args.num_recycle + 1)
        report["useful_tflop"] = round(flops / 1e12, 2)
        report["useful_tflops_per_s"] = round(flops / wall / 1e12, 2)
        report["useful_tflops_per_busy_s"] = round(flops / max(stats["busy_s"], 1e-9) / 1e12, 2)
    if worker.runner.platform != "cpu" and worker.runner.compiled_keys:
        from parafold.fold.batching import member_bytes
        biggest = max((k for k in worker.runner.compiled_keys), key=lambda k: k.batch * k.length)
        report["memory_model_bytes_biggest_batch"] = biggest.batch * member_bytes(
            biggest, bfloat16=True, iterations=args.num_recycle + 1)
        report["biggest_batch"] = biggest.describe()
    return report


def _stop_after(args) -> float | None:
    """Seconds from now to stop parafold's run: its --time-limit, or sooner where the
    --deadline (seconds since the script started) comes first; None: never."""
    limits = [args.time_limit] if args.time_limit else []
    if args.deadline:
        limits.append(max(1.0, args.deadline - (time.perf_counter() - STARTED)))
    return min(limits) if limits else None


def stock_subset(sets: list, n: int) -> list:
    """`n` proteins spread over the set's lengths (at the quantiles (k + 1/2) / n), so their
    mean cost stands for the set's; the first `n` could all be long or all short."""
    ordered = sorted(sets, key=lambda fs: (fs.length, fs.name))
    picks = sorted({min(len(ordered) - 1, int((k + 0.5) / n * len(ordered))) for k in range(n)})
    return [ordered[i] for i in picks]


def run_stock(args, params_dir: Path, sets: list, sampler) -> dict:
    """A fresh RunModel per model per protein, each predicted twice (the second call reuses
    the compiled function: compile and prediction timed apart). Stopped by a SIGINT, it
    reports the proteins it timed."""
    import jax
    from alphafold.model import config as af_config
    from alphafold.model import model as af_model

    from parafold.fold.config import TINY_OVERRIDES
    from parafold.fold.params import load_params
    from parafold.fold.settings import ModelSettings

    settings = ModelSettings(models=args.models, config_size=args.config, compile_cache_dir=None)
    params = {name: load_params(params_dir, name, settings) for name in settings.model_names}
    subset = stock_subset(sets, args.stock_subset)
    per_protein, compiles, predicts, timed = [], [], [], []
    mark = sampler.mark()
    interrupted = False
    try:
        for fs in subset:
            raw = fs.load()
            protein_s = 0.0
            for name in settings.model_names:
                cfg = af_config.model_config(name)
                if args.config == "tiny":
                    cfg.update_from_flattened_dict(TINY_OVERRIDES)
                    cfg.data.common.max_extra_msa = 64
                cfg.model.global_config.zero_init = False
                cfg.data.common.num_recycle = args.num_recycle
                cfg.model.num_recycle = args.num_recycle
                cfg.data.eval.num_ensemble = 1
                started = time.perf_counter()
                runner = af_model.RunModel(cfg, params[name])
                feat = runner.process_features(raw, random_seed=0)
                result, _ = runner.predict(feat, random_seed=0)
                jax.block_until_ready(result)
                first = time.perf_counter() - started
                started = time.perf_counter()
                result, _ = runner.predict(feat, random_seed=0)  # compiled: prediction alone
                jax.block_until_ready(result)
                again = time.perf_counter() - started
                protein_s += first
                compiles.append(max(0.0, first - again))
                predicts.append(again)
            per_protein.append(protein_s)
            timed.append(fs.length)
            log.info("stock %s (%d residues): %.1f s for %d model(s)", fs.name, fs.length,
                     protein_s, len(settings.model_names))
            sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
        log.warning("stock loop interrupted after %d protein(s)", len(per_protein))
    if not per_protein:
        return {"proteins_timed": 0, "interrupted": interrupted}
    mean = float(np.mean(per_protein))
    # one run_alphafold.py process over the whole set: a runner per model, reused, so a
    # compile per model per distinct length (AlphaFold pads no length), a prediction each
    models = len(settings.model_names)
    distinct = len({fs.length for fs in sets})
    one_process_s = (distinct * models * float(np.mean(compiles))
                     + len(sets) * models * float(np.mean(predicts)))
    return {"proteins_timed": len(per_protein), "lengths_timed": timed,
            "interrupted": interrupted, "models": models,
            "s_per_protein": round(mean, 2),
            "compile_s_mean": round(float(np.mean(compiles)), 2),
            "predict_s_mean": round(float(np.mean(predicts)), 3),
            "proteins_per_hour_extrapolated": round(3600 / mean, 1),
            "distinct_lengths": distinct,
            "proteins_per_hour_one_process_extrapolated": round(
                len(sets) / one_process_s * 3600, 1),
            "busy_fraction_nvidia_smi": sampler.mean_since(mark)}


def _a3m(fs) -> str:
    """The feature set's MSA as a3m text (query first), for colabfold_batch."""
    from alphafold.common import residue_constants as rc

    raw = fs.load()
    rows = []
    for r, row in enumerate(np.asarray(raw["msa"])):
        rows.append(f">s{r}\n" + "".join(rc.ID_TO_HHBLITS_AA[int(a)] for a in row))
    return "\n".join(rows) + "\n"


def colabfold_command(args) -> tuple[list[str], dict[str, str] | None] | str:
    """How to start `colabfold_batch` (command, environment), or why it cannot start: asked
    before any GPU work, so a missing install costs no device time."""
    if args.colabfold_python:  # colabfold in its own environment (it pins its own alphafold)
        cmd = [args.colabfold_python, "-m", "colabfold.batch"]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if args.colabfold_pythonpath:
            env["PYTHONPATH"] = args.colabfold_pythonpath
        probe = subprocess.run([*cmd[:1], "-c", "import colabfold.batch"], env=env,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            return (f"{args.colabfold_python} cannot import colabfold.batch: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
        return cmd, env
    if (exe := shutil.which("colabfold_batch")) is not None:
        return [exe], None
    return ("colabfold_batch is not on PATH and no --colabfold-python was given (install "
            "colabfold in its own environment; see --help)")


def run_colabfold(args, params_dir: Path, sets: list, work: Path,
                  how: tuple[list[str], dict[str, str] | None]) -> dict:
    """`colabfold_batch` on the same MSAs and random weights (`how`: `colabfold_command`)."""
    cmd, env = list(how[0]), how[1]
    inputs = work / "colabfold_in"
    inputs.mkdir(parents=True, exist_ok=True)
    if args.colabfold_subset:
        sets = sets[: args.colabfold_subset]
    for fs in sets:
        (inputs / f"{fs.name}.a3m").write_text(_a3m(fs))
    # colabfold compiles model 3's (template-free) runner, loads all five models' params and
    # swaps them in: give it ours where they exist, else random ones of the same family (1 and
    # 2 share an architecture, as do 3, 4 and 5), linked rather than written again
    from parafold.fold.params import params_path, write_random_params
    from parafold.fold.settings import ModelSettings

    for number in (1, 3):
        arch = ModelSettings(models=(number,), config_size=args.config, compile_cache_dir=None)
        if not params_path(params_dir, arch.model_names[0]).is_file():
            write_random_params(params_dir, arch, seed=args.seed + number)
    for number, source in ((2, 1), (4, 3), (5, 3)):
        link = params_path(params_dir, f"model_{number}_ptm")
        if not link.exists():
            link.symlink_to(params_path(params_dir, f"model_{source}_ptm").name)
    # colabfold looks for weights under <data>/params and a download marker beside them
    (params_dir / "params" / "download_complexes_multimer_v3_finished.txt").touch()
    (params_dir / "params" / "download_finished.txt").touch()
    out = work / "colabfold_out"
    cmd += [str(inputs), str(out), "--num-models", str(len(args.models)),
            "--model-order", ",".join(str(m) for m in args.models), "--num-recycle",
            str(args.num_recycle), "--model-type", "alphafold2_ptm", "--data", str(params_dir)]
    import jax

    if jax.default_backend() == "gpu":  # its fused kernels, as ours are on
        cmd.append("--use-fast-kernels")
    if args.colabfold_args:
        cmd += args.colabfold_args.split()
    log.info("running %s", " ".join(cmd))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=args.colabfold_timeout, env=env)
    except subprocess.TimeoutExpired:  # its rate so far still counts, labeled as such
        proc = None
    wall = time.perf_counter() - started
    if proc is not None and proc.returncode != 0:
        return {"failed": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    done = len(list(out.glob("*_rank_001_*.pdb")))
    return {"proteins": done, "of": len(sets), "timed_out": proc is None,
            "wall_s": round(wall, 2), "proteins_per_hour": round(done / wall * 3600, 1),
            "command": cmd}


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    from parafold.fold.settings import parse_model_numbers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("full", "tiny"), default="full")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--lengths", type=_range, default=(50, 300), help="e.g. 50-150")
    parser.add_argument("--depths", type=_range, default=(64, 500), help="MSA rows, e.g. 64-500")
    parser.add_argument("--models", type=parse_model_numbers, default=(1,), help="e.g. 1 or 1,2,3,4,5")
    parser.add_argument("--num-recycle", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--force-batch", action="store_true", help="batch on the CPU too")
    parser.add_argument("--host-workers", type=int, default=None)
    parser.add_argument("--compile-ahead", type=int, default=1,
                        help="threads compiling the next shapes while others run (0: off)")
    parser.add_argument("--compile-cost", type=float, default=None,
                        help="seconds a compile is worth when merging groups into bigger "
                             "shapes (default: the platform's measured figure; 0: no merges)")
    parser.add_argument("--merge-max-waste", type=float, default=0.5,
                        help="most padding a merged target's length may get")
    parser.add_argument("--executable-cache", action="store_true",
                        help="also keep serialized executables (a warm run skips tracing)")
    parser.add_argument("--stock-subset", "--stock-n", dest="stock_subset", type=int, default=6,
                        help="proteins timed in the stock loop (0: skip it)")
    parser.add_argument("--no-flops", dest="flops", action="store_false",
                        help="skip the useful-FLOP count and the bf16 peak")
    parser.add_argument("--colabfold", action="store_true",
                        help="also time colabfold_batch on the same inputs, if installed")
    parser.add_argument("--colabfold-args", default="", help="extra colabfold_batch flags")
    parser.add_argument("--colabfold-timeout", type=float, default=3600)
    parser.add_argument("--colabfold-subset", type=int, default=0,
                        help="give colabfold_batch only the first N proteins (0: all)")
    parser.add_argument("--colabfold-python", default=None,
                        help="python of colabfold's own environment (e.g. .venv-colabfold/bin/"
                             "python; default: colabfold_batch on PATH)")
    parser.add_argument("--colabfold-pythonpath", default=None,
                        help="PYTHONPATH for that python (a folder colabfold was installed into "
                             "with pip --target); ours is not passed on")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="persistent compile cache (default: a fresh one in the workdir)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop parafold's run after this many seconds and report the "
                             "proteins finished by then (labeled stopped_at_time_limit)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="stop parafold's run (as --time-limit) at the latest this many "
                             "seconds after the script started: set it below an outer "
                             "timeout, so the run is reported before that fires")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="reused if it holds params and features from an earlier run")
    parser.add_argument("--json", type=Path, default=None, help="save the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(name)s: %(message)s")

    import jax

    colabfold = colabfold_command(args) if args.colabfold else None
    if isinstance(colabfold, str):  # before any GPU work: the comparison is the point
        log.error("--colabfold: %s", colabfold)
        if args.json:
            args.json.write_text(json.dumps({"colabfold": {"skipped": colabfold}}) + "\n")
        return 3
    work = args.workdir or Path(tempfile.mkdtemp(prefix="parafold-bench-"))
    log.info("backend %s, devices %s, workdir %s", jax.default_backend(), jax.devices(), work)
    report: dict = {"command": [sys.executable, *sys.argv], "device": str(jax.devices()[0]),
                    "config": args.config, "models": list(args.models),
                    "num_recycle": args.num_recycle, "n": args.n,
                    "lengths": list(args.lengths), "depths": list(args.depths),
                    "max_batch": args.max_batch, "bf16_peak_tflops": None,
                    "parafold": None, "stock_loop": None, "colabfold": None}
    try:
        sets = _prepare(args, work)
        if args.flops and jax.default_backend() != "cpu":
            report["bf16_peak_tflops"] = round(measure_peak() / 1e12, 1)
        _save(report, args)
    except KeyboardInterrupt:  # stopped before anything was measured
        report["stopped"] = "interrupted while preparing"
        _save(report, args)
        _exit(2)
    sampler = GpuSampler()
    try:
        cache = args.cache_dir or work / f"jax-cache-{time.time_ns()}"
        out = work / f"out-{time.time_ns()}"
        # the stock loop first: a --time-limit then cuts parafold's run, not the baseline
        if args.stock_subset > 0:
            report["stock_loop"] = run_stock(args, work / "weights", sets, sampler)
            _save(report, args)
        if not (report["stock_loop"] or {}).get("interrupted"):
            report["parafold"] = run_parafold(args, work / "weights", sets, out, cache, sampler)
    except KeyboardInterrupt:  # before parafold's run started (params, helpers)
        report["stopped"] = "interrupted before parafold's run"
    finally:
        sampler.stop()
    _compare(report)
    _save(report, args)
    ours = report["parafold"] or {}
    if isinstance(colabfold, tuple) and ours and not ours.get("stopped"):
        report["colabfold"] = run_colabfold(args, work / "weights", sets, work, colabfold)
        _compare(report)
        _save(report, args)
    _print(report, args)
    if ours.get("stopped") or ours == {}:  # threads stopped mid-compile may hold the exit
        _exit(0 if ours else 2)
    return 0


def _prepare(args, work: Path) -> list:
    """Random params and synthetic feature sets in `work` (reused when already there)."""
    from parafold.featureset import read_feature_set
    from parafold.fold.params import params_path, write_random_params
    from parafold.fold.settings import ModelSettings

    started = time.perf_counter()
    arch = ModelSettings(models=args.models, config_size=args.config, compile_cache_dir=None)
    if not all(params_path(work / "weights", m).is_file() for m in arch.model_names):
        write_random_params(work / "weights", arch, seed=args.seed)
    log.info("random params in %.1f s", time.perf_counter() - started)
    started = time.perf_counter()
    tag = f"n{args.n}-L{args.lengths[0]}-{args.lengths[1]}-D{args.depths[0]}-{args.depths[1]}"
    feat_root = work / f"features-{tag}-s{args.seed}"
    if (feat_root / "complete").is_file():
        sets = [read_feature_set(feat_root / f"p{i:04d}") for i in range(args.n)]
    else:
        sets = make_inputs(feat_root, args.n, *args.lengths, *args.depths, args.seed)
        (feat_root / "complete").touch()
    log.info("%d synthetic feature sets in %.1f s", len(sets), time.perf_counter() - started)
    return sets


def _compare(report: dict) -> None:
    """Speedups and the fraction of the bf16 peak, from what the report holds."""
    ours, stock, colab = report["parafold"], report["stock_loop"], report["colabfold"]
    if not ours or not ours.get("ok"):
        return
    peak = report["bf16_peak_tflops"]
    if peak and "useful_tflops_per_s" in ours:
        ours["fraction_of_bf16_peak"] = round(ours["useful_tflops_per_s"] / peak, 4)
    if stock and stock.get("proteins_timed"):
        report["speedup"] = round(ours["proteins_per_hour"]
                                  / stock["proteins_per_hour_extrapolated"], 1)
        report["speedup_vs_one_process"] = round(
            ours["proteins_per_hour"] / stock["proteins_per_hour_one_process_extrapolated"], 1)
    if colab and colab.get("proteins_per_hour"):
        report["speedup_vs_colabfold"] = round(ours["proteins_per_hour"]
                                               / colab["proteins_per_hour"], 1)


def _save(report: dict, args) -> None:
    """The report so far, replaced whole: an outer timeout keeps what was measured."""
    if args.json:
        tmp = args.json.with_name(args.json.name + ".part")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        tmp.replace(args.json)


def _exit(code: int) -> None:
    """Leave at once (output flushed): a compile-ahead thread stopped mid-compile, or a
    stock runner interrupted, would otherwise hold the interpreter until it finishes."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def measure_peak() -> float:
    from parafold.fold.flops import measure_bf16_peak

    peak = measure_bf16_peak()
    log.info("bf16 matmul peak %.1f TFLOP/s", peak / 1e12)
    return peak


def _print(report: dict, args) -> None:
    ours, stock, colab = report["parafold"], report["stock_loop"], report["colabfold"]
    print("\n=== GPU stage benchmark ===")
    print(" ".join(report["command"]))
    print(f"device: {report['device']}  config: {args.config}  models {list(args.models)} x "
          f"{args.num_recycle} recycles  proteins: {args.n} ({args.lengths[0]}-{args.lengths[1]} "
          f"residues, {args.depths[0]}-{args.depths[1]} MSA rows)  max batch {args.max_batch}")
    if ours:
        stopped = f"  STOPPED ({ours['stopped']}): rate over the proteins done by then" if (
            ours.get("stopped")) else ""
        print(f"parafold: {ours['proteins_per_hour']} proteins/hour  {ours['ok']} of "
              f"{ours['proteins']} done  wall {ours['wall_s']} s{stopped}")
        print(f"          compiles {ours['compiles']} ({ours['xla_compiles']} by XLA) in "
              f"{ours['compile_s']} s  launches {ours['launches']} (mean batch "
              f"{ours['mean_batch']})  fused kernels {ours['fused_kernels']}")
        print(f"          compiled ahead {ours['compiled_ahead']} ({ours['compile_ahead_s']} s), "
              f"loop blocked on compiles {ours['loop_compile_s']} s, executable-cache hits "
              f"{ours['executable_hits']}, persistent-cache hits {ours['persistent_hits']}")
        print(f"          GPU busy (launch intervals) {ours['busy_fraction']}  "
              f"(nvidia-smi) {ours['busy_fraction_nvidia_smi']}  "
              f"useful {ours.get('useful_tflops_per_s')} TFLOP/s of a measured bf16 peak "
              f"{report['bf16_peak_tflops']} -> {ours.get('fraction_of_bf16_peak')}")
        print(f"          fold loop seconds by step: {ours.get('loop_s')}")
    else:
        print(f"parafold: not run ({report.get('stopped', 'the stock loop was interrupted')})")
    if stock and stock.get("proteins_timed"):
        print(f"stock loop (fresh RunModel per model per protein, {stock['proteins_timed']} "
              f"timed at lengths {stock['lengths_timed']}, EXTRAPOLATED): "
              f"{stock['proteins_per_hour_extrapolated']} proteins/hour  "
              f"{stock['s_per_protein']} s/protein (compile {stock['compile_s_mean']} s, "
              f"predict {stock['predict_s_mean']} s a model)  speedup {report.get('speedup')}x")
        print(f"one run_alphafold.py process over the set (runners reused, "
              f"{stock['distinct_lengths']} distinct lengths, EXTRAPOLATED): "
              f"{stock['proteins_per_hour_one_process_extrapolated']} proteins/hour  speedup "
              f"{report.get('speedup_vs_one_process')}x")
    elif stock:
        print("stock loop: interrupted before a protein was timed")
    if colab is not None:
        print(f"colabfold_batch: {colab}  speedup {report.get('speedup_vs_colabfold')}x")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
