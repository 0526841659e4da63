"""`parafold run --gpus 0,1` on a CPU-only machine: the local engine starts one fold process per
"GPU" (CUDA_VISIBLE_DEVICES pinned; the CPU-only jaxlib then simply runs on the CPU), so the
several-worker scheduling runs for real: two processes, two warm FoldWorkers, targets of two
shapes handed out to whichever worker is idle. Every target must be predicted exactly once, by
one worker, and both workers must get work."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from parafold.ledger import LEDGER_FILE, Ledger, State
from test_pipeline import check_complete
from test_pipeline import jax_cache_home as _jax_cache_home

GPUS = ("0", "1")
# Two lengths in two length buckets (40 and 64 residues padded), two targets each: four
# single-sequence targets, so the search stage is nearly free and each worker compiles at most
# two small shapes.
LENGTHS = (40, 40, 60, 60)


@pytest.fixture(scope="module")
def multi_gpu_inputs(synthetic_db: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import read_targets

    root = tmp_path_factory.mktemp("multi_gpu")
    write_random_params(root / "params", ModelSettings(config_size="tiny", models=(1,)))
    queries = read_targets(synthetic_db / "queries.fasta").targets
    assert len(queries) >= len(LENGTHS)
    (root / "in.fasta").write_text("".join(
        f">{t.id}\n{t.sequence[:n]}\n" for t, n in zip(queries, LENGTHS, strict=False)))
    return {"params": root / "params", "fasta": root / "in.fasta", "root": root,
            "xdg": _jax_cache_home(tmp_path_factory)}


def test_two_fold_workers_share_the_targets(multi_gpu_inputs: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import read_targets
    from parafold.pipeline import RunSettings, run_pipeline
    from parafold.search.settings import SearchSettings

    # The fold processes are spawned from this one and inherit its environment: CPU jax, and
    # the session's shared compile cache.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XDG_CACHE_HOME", str(multi_gpu_inputs["xdg"]))
    out = multi_gpu_inputs["root"] / "out"
    targets = read_targets(multi_gpu_inputs["fasta"]).targets
    names = [t.name for t in targets]
    assert len({len(t.sequence) for t in targets}) == 2
    settings = RunSettings(
        input=multi_gpu_inputs["fasta"], out=out, params_dir=multi_gpu_inputs["params"],
        search=SearchSettings(msa_mode="single_sequence"),
        model=ModelSettings(config_size="tiny", models=(1,), num_recycle=0, float32=True,
                            max_batch=1,
                            compile_cache_dir=multi_gpu_inputs["xdg"] / "parafold" / "jax"),
        cpus=2, cpus_per_search=1, gpus=GPUS, engine="local", max_batch=1, max_wait_s=1.0,
        progress=False, plots=False)

    started = time.monotonic()
    summary = run_pipeline(settings)
    wall_s = time.monotonic() - started

    assert summary.exit_code == 0, summary.lines()
    assert summary.done == summary.predicted == len(names), summary.lines()
    check_complete(out, names)  # every target done, its folder complete, no *.part anywhere
    assert not list(out.rglob("*.part"))

    with Ledger(out, readonly=True) as ledger:
        predicts = ledger.events("predict")
        (run,) = ledger.runs()
        records = {n: ledger.get(n) for n in names}
    assert run.exit_code == 0
    assert all(r is not None and r.state is State.DONE for r in records.values()), records

    # Each target predicted exactly once, by exactly one worker, and never failed on one.
    assert all(e.ok for e in predicts), predicts
    assert sorted(e.target for e in predicts) == sorted(names), predicts
    by_target = {e.target: e.worker for e in predicts}
    label = re.compile(rf"^gpu([01])@{re.escape(socket.gethostname())}:(\d+)$")
    matches = {name: label.match(worker) for name, worker in by_target.items()}
    assert all(matches.values()), by_target

    # Both workers predicted something, each in its own long-lived process.
    per_gpu: dict[str, set[str]] = {}
    pids: dict[str, set[str]] = {}
    for name, m in matches.items():
        assert m is not None
        per_gpu.setdefault(m.group(1), set()).add(name)
        pids.setdefault(m.group(1), set()).add(m.group(2))
    assert set(per_gpu) == set(GPUS), f"one worker did everything: {by_target}"
    assert all(len(p) == 1 for p in pids.values()), pids  # no worker was restarted
    assert pids["0"] != pids["1"], pids

    # The run's ledger row records the two devices, and the report's timeline has one
    # predict lane per worker.
    db = sqlite3.connect(f"file:{out / LEDGER_FILE}?mode=ro", uri=True)
    try:
        (settings_json,) = db.execute("SELECT settings FROM runs WHERE id = ?",
                                      (run.id,)).fetchone()
    finally:
        db.close()
    assert json.loads(settings_json)["gpus"] == list(GPUS)
    from parafold.report.collect import collect_run

    lanes = [lane["worker"] for lane in collect_run(out)["lanes"] if lane["kind"] == "predict"]
    assert sorted(lanes) == sorted(set(by_target.values())) and len(lanes) == 2, lanes
    print(f"2 fold workers, {len(names)} targets in {wall_s:.1f} s: "
          + ", ".join(f"gpu{g}: {sorted(n)}" for g, n in sorted(per_gpu.items())))


class _FakeFoldWorker:
    """A fold worker whose batches finish when the test says so (no jax, no process)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list[tuple[list[str], object]] = []

    def warm(self) -> object:
        raise AssertionError("not started by this test")

    def fold(self, feature_sets: list, out_root: Path) -> object:
        import concurrent.futures as cf

        from parafold.engine.base import JobHandle

        future: cf.Future[object] = cf.Future()
        self.batches.append(([fs.name for fs in feature_sets], future))
        return JobHandle(future, label=self.name)

    def restart(self) -> None:
        raise AssertionError("no worker dies in this test")

    def finish_last(self) -> object:
        """Complete the newest batch with every target ok; returns its future."""
        from types import SimpleNamespace

        from parafold.engine.jobs import FoldBatchResult

        names, future = self.batches[-1]
        now = time.time()
        future.set_result(FoldBatchResult(  # type: ignore[attr-defined]
            tuple(SimpleNamespace(name=n, ok=True, timings={}) for n in names),
            f"{self.name}@test:1", now - 1, now))
        return future


def test_idle_workers_share_groups_and_take_the_next_one(tmp_path: Path) -> None:
    """Two idle workers: a partial group with nothing more coming is shared out over both;
    the next group goes to whichever worker comes back idle first, never queued behind a
    busy one."""
    from parafold.engine.inline import InlineExecutor
    from parafold.engine.scheduler import Scheduler
    from parafold.featureset import FeatureSet
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import Target
    from parafold.pipeline import RunSettings

    def fs(name: str, length: int) -> FeatureSet:
        return FeatureSet(name=name, target_id=name, sequence="A" * length, path=tmp_path / name,
                          msa_depth=30, num_templates=0)

    short = [fs(f"a{i}", 60 + i) for i in range(3)]
    long = fs("b0", 150)
    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                           search=None, model=ModelSettings(config_size="tiny", models=(1,)),
                           max_batch=4, max_wait_s=30.0, plots=False)
    gpu0, gpu1 = _FakeFoldWorker("gpu0"), _FakeFoldWorker("gpu1")
    with Ledger(tmp_path) as ledger:
        ledger.register([Target(f.name, f.name, f.sequence) for f in [*short, long]])
        for f in [*short, long]:
            ledger.reconcile(f.name, State.FEATURES_READY)
        sched = Scheduler(settings, ledger, 1, InlineExecutor(), None, [], [*short, long],
                          total=4, done_before=0)
        now = time.time()
        sched.ready = {f.name: (f, now - 10) for f in short} | {"b0": (long, now - 5)}
        sched.idle = [gpu0, gpu1]  # type: ignore[list-item]

        sched._dispatch_folds()
        # The short group (oldest, 3 < max_batch, no searches left) is shared over both.
        assert [b for b, _ in gpu0.batches] == [["a0", "a1"]]
        assert [b for b, _ in gpu1.batches] == [["a2"]]
        assert list(sched.ready) == ["b0"] and not sched.idle

        # gpu1 comes back first: it takes the long target at once.
        sched._fold_finished(gpu1.finish_last())  # type: ignore[arg-type]
        sched._dispatch_folds()
        assert [b for b, _ in gpu1.batches] == [["a2"], ["b0"]]
        assert len(gpu0.batches) == 1 and not sched.ready
        sched._fold_finished(gpu0.finish_last())  # type: ignore[arg-type]
        sched._fold_finished(gpu1.finish_last())  # type: ignore[arg-type]

        assert sched.predicted == 4 and sched.failed == 0
        assert sorted(w.name for w in sched.idle) == ["gpu0", "gpu1"]
        workers = {e.target: e.worker for e in ledger.events("predict")}
        assert workers == {"a0": "gpu0@test:1", "a1": "gpu0@test:1", "a2": "gpu1@test:1",
                           "b0": "gpu1@test:1"}
        assert all(ledger.get(n).state is State.DONE for n in workers)  # type: ignore[union-attr]
