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
from typing import Any

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

    platform = "gpu"

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list[tuple[list[str], object]] = []
        self.restarts = 0

    def warm(self) -> object:
        raise AssertionError("not started by this test")

    def fold(self, feature_sets: list, out_root: Path) -> object:
        import concurrent.futures as cf

        from parafold.engine.base import JobHandle

        future: cf.Future[object] = cf.Future()
        self.batches.append(([fs.name for fs in feature_sets], future))
        return JobHandle(future, label=self.name)

    def restart(self) -> None:
        self.restarts += 1

    def finish_last(self, shapes: tuple = ()) -> object:
        """Complete the newest batch with every target ok, the worker reporting `shapes` as
        compiled; returns its future."""
        from types import SimpleNamespace

        from parafold.engine.jobs import FoldBatchResult

        names, future = self.batches[-1]
        now = time.time()
        future.set_result(FoldBatchResult(  # type: ignore[attr-defined]
            tuple(SimpleNamespace(name=n, ok=True, timings={}) for n in names),
            f"{self.name}@test:1", now - 1, now, shapes=shapes))
        return future

    def fail_last(self, exc: Exception) -> object:
        """Fail the newest batch as a whole (the worker's fault); returns its future."""
        _, future = self.batches[-1]
        future.set_exception(exc)  # type: ignore[attr-defined]
        return future


def test_idle_workers_share_groups_and_take_the_next_one(tmp_path: Path) -> None:
    """Two idle workers: a partial group with nothing more coming (and no other group to run)
    is shared out over both; the next group goes to whichever worker comes back idle first,
    never queued behind a busy one."""
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
        sched.ready = {f.name: (f, now - 10) for f in short}
        sched.idle = [gpu0, gpu1]  # type: ignore[list-item]

        sched._dispatch_folds()
        # The short group (3 < max_batch, no searches left) is shared over both.
        assert [b for b, _ in gpu0.batches] == [["a0", "a1"]]
        assert [b for b, _ in gpu1.batches] == [["a2"]]
        assert not sched.ready and not sched.idle
        sched.ready["b0"] = (long, now - 5)  # its search finished meanwhile
        sched._dispatch_folds()
        assert list(sched.ready) == ["b0"]

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


def _ready_scheduler(tmp_path: Path, ledger: Ledger, lengths: dict[str, int], *,
                     max_batch: int) -> tuple[object, dict[str, object]]:
    """A scheduler with nothing left to search and these targets' features made (not yet in
    its ready list: tests add them when they "arrive"); returns it and the feature sets."""
    from parafold.engine.inline import InlineExecutor
    from parafold.engine.scheduler import Scheduler
    from parafold.featureset import FeatureSet
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import Target
    from parafold.pipeline import RunSettings

    sets = {n: FeatureSet(name=n, target_id=n, sequence="A" * length, path=tmp_path / n,
                          msa_depth=30, num_templates=0) for n, length in lengths.items()}
    ledger.register([Target(n, n, fs.sequence) for n, fs in sets.items()])
    for n in sets:
        ledger.reconcile(n, State.FEATURES_READY)
    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                           search=None, model=ModelSettings(config_size="tiny", models=(1,)),
                           max_batch=max_batch, max_wait_s=30.0, plots=False)
    sched = Scheduler(settings, ledger, 1, InlineExecutor(), None, [], [], total=len(sets),
                      done_before=0)
    return sched, sets  # type: ignore[return-value]


def test_idle_workers_keep_the_shapes_they_compiled(tmp_path: Path) -> None:
    """Groups of shapes A, B, A, B arriving: once each worker has run one shape, a group goes
    to the worker that has its shape compiled, whichever came back idle first; a worker whose
    shape is waiting takes it before an older group of another worker's shape, unless that
    group has waited past the starvation bound."""
    gpu0, gpu1 = _FakeFoldWorker("gpu0"), _FakeFoldWorker("gpu1")
    lengths = {f"a{i}": 60 for i in range(5)} | {f"b{i}": 150 for i in range(5)}
    with Ledger(tmp_path) as ledger:
        sched: Any
        sched, sets = _ready_scheduler(tmp_path, ledger, lengths, max_batch=4)
        now = time.time()

        def arrive(name: str, since: float) -> None:
            sched.ready[name] = (sets[name], since)

        def last(worker: _FakeFoldWorker) -> list[str]:
            return worker.batches[-1][0]

        sched.idle = [gpu0, gpu1]
        arrive("a0", now - 20)
        sched._dispatch_folds()
        arrive("b0", now - 19)
        sched._dispatch_folds()
        assert (last(gpu0), last(gpu1)) == (["a0"], ["b0"])

        # Both idle, gpu1 first: each group goes to the worker that ran its shape.
        sched._fold_finished(gpu1.finish_last())
        sched._fold_finished(gpu0.finish_last())
        arrive("a1", now - 10)
        arrive("b1", now - 9)
        sched._dispatch_folds()
        assert (last(gpu0), last(gpu1)) == (["a1"], ["b1"])
        # ... and with gpu0 back first, and B the older group.
        sched._fold_finished(gpu0.finish_last())
        sched._fold_finished(gpu1.finish_last())
        arrive("b2", now - 8)
        arrive("a2", now - 7)
        sched._dispatch_folds()
        assert (last(gpu0), last(gpu1)) == (["a2"], ["b2"])

        # gpu1 busy: idle gpu0 takes its own shape; the older B group waits for gpu1 ...
        sched._fold_finished(gpu0.finish_last())
        arrive("b3", now - 5)
        arrive("a3", now - 1)
        sched._dispatch_folds()
        assert last(gpu0) == ["a3"] and list(sched.ready) == ["b3"]
        sched._fold_finished(gpu1.finish_last())
        sched._dispatch_folds()
        assert last(gpu1) == ["b3"]

        # ... but not forever: past the bound it goes to the next idle worker regardless.
        sched._fold_finished(gpu0.finish_last())
        arrive("b4", time.time() - sched.starve_s - 1)
        sched._dispatch_folds()
        assert last(gpu0) == ["b4"]
        arrive("a4", time.time())
        # A worker never idles while a group waits: gpu1 compiles A rather than wait.
        sched._fold_finished(gpu1.finish_last())
        sched._dispatch_folds()
        assert last(gpu1) == ["a4"]
        sched._fold_finished(gpu0.finish_last())
        sched._fold_finished(gpu1.finish_last())

        assert sched.predicted == 10 and sched.failed == 0 and not sched.ready
        assert [b for b, _ in gpu0.batches] == [["a0"], ["a1"], ["a2"], ["a3"], ["b4"]]
        assert [b for b, _ in gpu1.batches] == [["b0"], ["b1"], ["b2"], ["b3"], ["a4"]]


def test_a_worker_failing_every_batch_is_retired_and_its_batches_redone(tmp_path: Path) -> None:
    """A worker that fails batches for reasons of its own (here: its device is lost) is
    restarted once, taken out of rotation after the second batch in a row, and both batches
    it failed are redone by the healthy worker: no target fails."""
    gpu0, gpu1 = _FakeFoldWorker("gpu0"), _FakeFoldWorker("gpu1")
    names = [f"t{i}" for i in range(4)]
    with Ledger(tmp_path) as ledger:
        sched: Any
        sched, sets = _ready_scheduler(tmp_path, ledger, dict.fromkeys(names, 60), max_batch=1)
        now = time.time()
        sched.ready = {n: (sets[n], now - 10 + i) for i, n in enumerate(names)}
        sched.idle = [gpu0, gpu1]
        sched._dispatch_folds()
        assert ([b for b, _ in gpu0.batches], [b for b, _ in gpu1.batches]) == ([["t0"]], [["t1"]])

        sched._fold_finished(gpu0.fail_last(RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")))
        assert ledger.get("t0").state is State.FEATURES_READY  # type: ignore[union-attr]
        assert gpu0.restarts == 1 and not sched.retired
        sched._dispatch_folds()  # t0 is not given back to the worker that failed it
        assert gpu0.batches[-1][0] == ["t2"]
        sched._fold_finished(gpu0.fail_last(RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS")))
        assert list(sched.retired) == ["gpu0"] and gpu0 not in sched.idle
        assert gpu0.restarts == 1

        for _ in range(4):
            sched._fold_finished(gpu1.finish_last())
            sched._dispatch_folds()
        assert [b for b, _ in gpu1.batches] == [["t1"], ["t0"], ["t2"], ["t3"]]
        assert len(gpu0.batches) == 2 and sched.idle == [gpu1] and not sched.ready

        assert sched.predicted == 4 and sched.failed == 0
        assert all(ledger.get(n).state is State.DONE for n in names)  # type: ignore[union-attr]
        predicts = ledger.events("predict")
        assert all(e.ok and e.worker == "gpu1@test:1" for e in predicts), predicts
        (event,) = ledger.worker_events()
        assert (event.worker, event.kind) == ("gpu0", "retired")
        assert "2 batches in a row" in event.reason and "CUDA_ERROR_ILLEGAL_ADDRESS" in event.reason


class _AutoFoldWorker:
    """A fold worker whose batches finish at once, all ok; or, when it cannot start, whose
    start and every batch fail (the real worker builds itself on its first batch too)."""

    def __init__(self, name: str, start_error: Exception | None = None) -> None:
        self.name = name
        self.start_error = start_error
        self.batches: list[list[str]] = []
        self.released = 0

    def _handle(self, result: object) -> object:
        import concurrent.futures as cf

        from parafold.engine.base import JobHandle

        future: cf.Future[object] = cf.Future()
        if self.start_error is not None:
            future.set_exception(self.start_error)
        else:
            future.set_result(result)
        return JobHandle(future, label=self.name)

    def warm(self) -> object:
        return self._handle(f"{self.name}@test:1")

    def fold(self, feature_sets: list, out_root: Path) -> object:
        from types import SimpleNamespace

        from parafold.engine.jobs import FoldBatchResult

        names = [fs.name for fs in feature_sets]
        self.batches.append(names)
        now = time.time()
        return self._handle(FoldBatchResult(
            tuple(SimpleNamespace(name=n, ok=True, timings={}) for n in names),
            f"{self.name}@test:1", now, now))

    def restart(self) -> None:
        return None

    def release(self) -> None:
        self.released += 1


def _run_with_workers(tmp_path: Path, params: Path, workers: list[_AutoFoldWorker],
                      specs: list[Any] | None = None) -> tuple[object, Path]:
    """`parafold run` of four single-sequence targets (two shapes) on these fold workers, in a
    thread: a run that hangs fails the test instead of blocking it. The worker spec the run
    asks for goes to `specs`."""
    import threading

    from parafold.engine.inline import InlineExecutor
    from parafold.fold.settings import ModelSettings
    from parafold.pipeline import RunSettings, run_pipeline
    from parafold.search.settings import SearchSettings

    class Executor(InlineExecutor):
        def start_fold_workers(self, spec: object) -> list:  # type: ignore[override]
            if specs is not None:
                specs.append(spec)
            return list(workers)

    (tmp_path / "in.fasta").write_text("".join(
        f">t{i}\n{'MKVLAAGIVG' * (4 + 2 * (i // 2))}\n" for i in range(4)))
    out = tmp_path / "out"
    settings = RunSettings(input=tmp_path / "in.fasta", out=out, params_dir=params,
                           search=SearchSettings(msa_mode="single_sequence"),
                           model=ModelSettings(config_size="tiny", models=(1,)),
                           engine="inline", max_batch=2, max_wait_s=0.0, progress=False,
                           plots=False)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(
        run_pipeline(settings, executor_factory=lambda _: Executor())), daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run hangs"
    assert result, "the run raised (see the log)"
    return result[0], out


def test_a_runs_fold_worker_leaves_the_cores_to_the_searches(tmp_path: Path, tiny_params: Path) -> None:
    """Unconfigured, a run's GPU fold worker gets 4 feature helpers (`predict` alone would
    give it all cores but 3): the searches of the same run use the cores. On the CPU it still
    processes inline."""
    from parafold.fold.hostwork import auto_workers, feature_helpers

    specs: list[Any] = []
    summary: Any
    summary, _ = _run_with_workers(tmp_path, tiny_params, [_AutoFoldWorker("gpu0")], specs)
    assert summary.exit_code == 0, summary.lines()
    (spec,) = specs
    model = spec.settings
    assert model.host_workers is None
    assert feature_helpers(model.helper_cores) == 4  # the GPU default, capped by cores
    assert auto_workers(None, "cpu", gpu_default=4) == 0


def test_a_worker_that_cannot_start_is_retired(tmp_path: Path, tiny_params: Path) -> None:
    """One of two fold workers fails to start (its device is broken): the other does every
    target, the run exits 0, and the ledger says which worker was retired and why."""
    broken = _AutoFoldWorker("gpu0", RuntimeError("no CUDA device visible"))
    healthy = _AutoFoldWorker("gpu1")
    summary: Any
    summary, out = _run_with_workers(tmp_path, tiny_params, [broken, healthy])

    assert summary.exit_code == 0 and summary.done == summary.predicted == 4, summary.lines()
    assert sorted(n for b in healthy.batches for n in b) == ["t0", "t1", "t2", "t3"]
    with Ledger(out, readonly=True) as ledger:
        (event,) = ledger.worker_events()
        predicts = ledger.events("predict")
    assert (event.worker, event.kind) == ("gpu0", "retired")
    assert event.reason == "failed to start: RuntimeError: no CUDA device visible"
    assert all(e.ok and e.worker == "gpu1@test:1" for e in predicts), predicts
    # its process is stopped when it is retired, not at the end of the run
    assert (broken.released, healthy.released) == (1, 0)


def test_no_worker_left_fails_every_target_and_ends_the_run(tmp_path: Path, tiny_params: Path) -> None:
    """The only fold worker fails to start: every target fails with the cause, and the run
    ends with exit 1 instead of waiting for a worker that will never come."""
    summary: Any
    summary, out = _run_with_workers(
        tmp_path, tiny_params, [_AutoFoldWorker("gpu0", RuntimeError("no CUDA device visible"))])

    assert summary.exit_code == 1 and summary.done == 0, summary.lines()
    assert sorted(f.name for f in summary.failures) == ["t0", "t1", "t2", "t3"]
    message = "no fold worker left: gpu0 failed to start: RuntimeError: no CUDA device visible"
    assert all(f.error == message for f in summary.failures), summary.lines()
    with Ledger(out, readonly=True) as ledger:
        assert [(e.worker, e.kind) for e in ledger.worker_events()] == [("gpu0", "retired")]


def test_no_search_starts_once_no_worker_is_left(tmp_path: Path, tiny_params: Path) -> None:
    """Once the last fold worker is out of rotation, queued targets fail at once: none of them
    is searched first (a search can take hours, and its features could never be folded)."""
    summary: Any
    summary, out = _run_with_workers(
        tmp_path, tiny_params, [_AutoFoldWorker("gpu0", RuntimeError("no CUDA device visible"))])

    assert summary.exit_code == 1 and summary.done == 0, summary.lines()
    with Ledger(out, readonly=True) as ledger:
        searched = sorted(e.target for e in ledger.events("search"))
    # t0 was searched (and its batch sent) before the worker's start failure was seen
    assert searched == ["t0"], searched


def test_batches_that_kill_any_worker_do_not_retire_the_last_one(tmp_path: Path) -> None:
    """Two targets that each kill whatever worker runs them (say, too large for the host's
    memory), and a healthy one, on one fold worker: each killer fails after its second try,
    which also shows its first failure was its own, not the worker's; the worker stays in
    rotation and folds the healthy target."""
    gpu0 = _FakeFoldWorker("gpu0")
    names = ["x", "z", "y"]
    killed = RuntimeError("A process in the process pool was terminated abruptly")
    with Ledger(tmp_path) as ledger:
        sched: Any
        sched, sets = _ready_scheduler(tmp_path, ledger, dict.fromkeys(names, 60), max_batch=1)
        now = time.time()
        sched.ready = {n: (sets[n], now - 10 + i) for i, n in enumerate(names)}
        sched.idle = [gpu0]
        for killer in ("x", "x", "z", "z"):
            sched._dispatch_folds()
            assert gpu0.batches[-1][0] == [killer], gpu0.batches
            sched._fold_finished(gpu0.fail_last(killed))
            assert not sched.retired, sched.retired
        sched._dispatch_folds()
        assert gpu0.batches[-1][0] == ["y"]
        sched._fold_finished(gpu0.finish_last())

        assert sched.predicted == 1 and sched.failed == 2
        assert ledger.get("y").state is State.DONE  # type: ignore[union-attr]
        assert all(ledger.get(n).state is State.FAILED  # type: ignore[union-attr]
                   for n in ("x", "z"))
        assert not ledger.worker_events()


def test_a_worker_whose_process_died_while_idle_is_restarted(tmp_path: Path, tiny_params: Path) -> None:
    """Handing a batch to a fold process that died while idle raises at once
    (BrokenProcessPool): that batch is a failed one, the worker is restarted and redoes it;
    the run does not crash."""
    from concurrent.futures.process import BrokenProcessPool

    class DiesOnce(_AutoFoldWorker):
        restarts = 0
        died = False

        def fold(self, feature_sets: list, out_root: Path) -> object:
            if not self.died:
                self.died = True
                raise BrokenProcessPool("a child process terminated abruptly")
            return super().fold(feature_sets, out_root)

        def restart(self) -> None:
            self.restarts += 1

    worker = DiesOnce("gpu0")
    summary: Any
    summary, _ = _run_with_workers(tmp_path, tiny_params, [worker])
    assert summary.exit_code == 0 and summary.done == 4, summary.lines()
    assert worker.restarts == 1
    assert sorted(n for b in worker.batches for n in b) == ["t0", "t1", "t2", "t3"]


def test_a_small_group_goes_to_the_worker_with_a_deeper_bucket_of_its_length(tmp_path: Path
                                                                            ) -> None:
    """A few shallow-MSA targets go to the worker that ran a deeper MSA-depth bucket of their
    length (it runs them there, no compile), not to the first idle worker."""
    from dataclasses import replace

    gpu0, gpu1 = _FakeFoldWorker("gpu0"), _FakeFoldWorker("gpu1")
    lengths = {"deep": 60, "long": 150, "shallow0": 60, "shallow1": 60}
    with Ledger(tmp_path) as ledger:
        sched: Any
        sched, sets = _ready_scheduler(tmp_path, ledger, lengths, max_batch=4)
        sets["deep"] = replace(sets["deep"], msa_depth=60)
        for name in ("shallow0", "shallow1"):
            sets[name] = replace(sets[name], msa_depth=10)
        assert sched._shape(sets["shallow0"]) != sched._shape(sets["deep"])
        now = time.time()
        sched.idle = [gpu0, gpu1]
        sched.ready["deep"] = (sets["deep"], now - 20)
        sched._dispatch_folds()
        sched.ready["long"] = (sets["long"], now - 19)
        sched._dispatch_folds()
        assert (gpu0.batches[-1][0], gpu1.batches[-1][0]) == (["deep"], ["long"])
        sched._fold_finished(gpu1.finish_last())  # gpu1 is idle first ...
        sched._fold_finished(gpu0.finish_last())
        sched.ready["shallow0"] = (sets["shallow0"], now - 10)
        sched.ready["shallow1"] = (sets["shallow1"], now - 10)
        sched._dispatch_folds()
        # ... but the shallow pair goes to gpu0, whole
        assert gpu0.batches[-1][0] == ["shallow0", "shallow1"] and len(gpu1.batches) == 1


def test_the_scheduler_learns_the_shapes_a_worker_really_compiled(tmp_path: Path) -> None:
    """A worker that ran a batch in a bigger shape (it merged the group) reports that shape,
    and a later group of that shape goes to it rather than to the first idle worker."""
    picked = {}
    for reported in (False, True):
        gpu0, gpu1 = _FakeFoldWorker("gpu0"), _FakeFoldWorker("gpu1")
        (tmp_path / str(reported)).mkdir()
        with Ledger(tmp_path / str(reported)) as ledger:
            sched: Any
            sched, sets = _ready_scheduler(tmp_path / str(reported), ledger,
                                           {"short": 60, "long": 70}, max_batch=4)
            bigger = sched._shape(sets["long"])
            assert bigger != sched._shape(sets["short"])
            now = time.time()
            sched.idle = [gpu0, gpu1]
            sched.ready["short"] = (sets["short"], now - 20)
            sched._dispatch_folds()
            assert gpu0.batches[-1][0] == ["short"]
            sched._fold_finished(gpu0.finish_last(shapes=(bigger,) if reported else ()))
            assert sched.idle == [gpu1, gpu0]
            sched.ready["long"] = (sets["long"], now - 10)
            sched._dispatch_folds()
            picked[reported] = "gpu0" if len(gpu0.batches) == 2 else "gpu1"
    assert picked == {False: "gpu1", True: "gpu0"}


def test_the_last_idle_worker_takes_other_due_groups_along(tmp_path: Path) -> None:
    """With one worker idle, the groups that may go now go in one call (planned together, the
    worker merges their shapes and compiles ahead): not more of its own shape, not a group of
    a shape another worker has compiled, not targets whose batch failed before, at most
    4 x max_batch targets."""
    gpu0, gpu1 = _FakeFoldWorker("gpu0"), _FakeFoldWorker("gpu1")
    lengths = {"z0": 700, "a0": 60, "a1": 60, "b0": 150, "c0": 250, "d0": 400, "e0": 500,
               "f0": 600, "g0": 800}
    with Ledger(tmp_path) as ledger:
        sched: Any
        sched, sets = _ready_scheduler(tmp_path, ledger, lengths, max_batch=1)
        now = time.time()
        sched.idle = [gpu1]
        sched.ready["z0"] = (sets["z0"], now - 30)
        sched._dispatch_folds()
        assert gpu1.batches[-1][0] == ["z0"]  # gpu1 is busy from here on
        sched._shapes["gpu1"].add(sched._shape(sets["d0"]))  # ... and has D compiled
        sched._failed_on["e0"] = ["gpu1"]  # e0's batch failed once before
        for i, name in enumerate(n for n in lengths if n != "z0"):
            sched.ready[name] = (sets[name], now - 20 + i)
        sched.idle = [gpu0]
        sched._dispatch_folds()
        assert gpu0.batches[-1][0] == ["a0", "b0", "c0", "f0"], gpu0.batches
        assert sorted(sched.ready) == ["a1", "d0", "e0", "g0"]
