"""How the scheduler hands ready proteins to fold workers: full same-shape groups at once,
partial groups only after the bounded wait or when no more searches are coming."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from parafold.engine.inline import InlineExecutor
from parafold.featureset import FeatureSet
from parafold.fold.settings import ModelSettings
from parafold.inputs import Target
from parafold.ledger import Ledger
from parafold.pipeline import RunSettings


def _fs(name: str, length: int, tmp: Path) -> FeatureSet:
    return FeatureSet(name=name, target_id=name, sequence="A" * length, path=tmp / name,
                      msa_depth=30, num_templates=0)


def test_groups_fill_then_bounded_wait(tmp_path: Path) -> None:
    from parafold.engine.scheduler import Scheduler

    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                           search=None, model=ModelSettings(config_size="tiny", models=(1,)),
                           max_batch=2, max_wait_s=30.0)
    short = [_fs(f"s{i}", 60 + i, tmp_path) for i in range(2)]
    long = _fs("long", 150, tmp_path)
    with Ledger(tmp_path) as ledger:
        sched = Scheduler(settings, ledger, 1, InlineExecutor(), None,
                          [Target("later", "later", "MKV")], [long, *short], total=4,
                          done_before=0)
        worker = SimpleNamespace(name="gpu0")
        sched.idle = [worker]  # type: ignore[list-item]  # one idle worker

        def chosen() -> list[str] | None:
            choice = sched._choose_batch()
            if choice is None:
                return None
            assert choice[0] is worker
            return sorted(fs.name for fs in choice[1])

        assert chosen() == ["s0", "s1"]
        del sched.ready["s0"], sched.ready["s1"]
        assert chosen() is None  # alone in its shape, searches still coming
        sched.ready["long"] = (long, time.time() - 31)  # waited past max_wait_s
        assert chosen() == ["long"]
        sched.ready["long"] = (long, time.time())
        sched.pending.clear()  # nothing more will come: no reason to wait
        assert chosen() == ["long"]


def test_features_searched_again_drop_the_old_prediction(tmp_path: Path, monkeypatch) -> None:
    """Same sequence, new search key (databases, settings or precomputed MSA changed): the
    target is searched again and its old prediction must not be kept as done."""
    import json

    import parafold.pipeline as pipeline
    from parafold.featureset import MANIFEST_FILE
    from parafold.fold.outputs import DONE_FILE

    target = Target("t", "t", "MKVLAAGIVG")
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps({"sequence": target.sequence, "key": "old"}))
    (folder / DONE_FILE).write_text("{}")
    monkeypatch.setattr(pipeline, "_expected_key", lambda *_: "new")
    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                           search=None, model=ModelSettings(config_size="tiny", models=(1,)))
    with Ledger(tmp_path) as ledger:
        ledger.register([target])
        plan = pipeline._reconcile(ledger, [target], settings, databases=object())
    assert [t.name for t in plan.to_search] == ["t"]
    assert not (folder / DONE_FILE).exists()


def test_ctrl_c_is_recorded_as_exit_code_130(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C mid-run: `parafold run` exits 130, and the ledger's row for the run says so too."""
    import parafold.pipeline as pipeline
    from parafold.search.settings import SearchSettings

    class InterruptedScheduler:  # the stage that runs when Ctrl-C arrives
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def run(self) -> None:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def executor(_settings: RunSettings) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(describe=lambda: "stub executor")

    from parafold.fold.params import write_random_params

    monkeypatch.setattr(pipeline, "Scheduler", InterruptedScheduler)
    (tmp_path / "in.fasta").write_text(">t1\nMKVLAAGIVG\n")
    write_random_params(tmp_path / "params", ModelSettings(config_size="tiny", models=(1,)))
    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path / "out",
                           params_dir=tmp_path / "params",
                           search=SearchSettings(msa_mode="single_sequence"),
                           model=ModelSettings(config_size="tiny", models=(1,)), plots=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(settings, executor_factory=executor)
    with Ledger(settings.out, readonly=True) as ledger:
        (run,) = ledger.runs()
    assert run.exit_code == 130 and run.ended_at is not None
    assert pipeline.EXIT_INTERRUPTED == 130


def test_missing_params_stop_the_run_before_any_search(tmp_path: Path) -> None:
    """Searches take hours per protein on real databases: params that cannot be loaded must
    stop `run` at its start (naming every file at fault), not after the first search."""
    import pytest

    import parafold.pipeline as pipeline
    from parafold.errors import ParamsError
    from parafold.fold.params import params_path, write_random_params
    from parafold.search.settings import SearchSettings

    params = tmp_path / "params"
    write_random_params(params, ModelSettings(config_size="tiny", models=(1,)))
    params_path(params, "model_3_ptm").write_text("not an archive")
    (tmp_path / "in.fasta").write_text(">t1\nMKVLAAGIVG\n")

    def no_executor(_settings: RunSettings) -> None:
        raise AssertionError("the run started its workers")

    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path / "out", params_dir=params,
                           search=SearchSettings(msa_mode="single_sequence"),
                           model=ModelSettings(config_size="tiny", models=(1, 2, 3)),
                           plots=False)
    with pytest.raises(ParamsError) as caught:
        pipeline.run_pipeline(settings, executor_factory=no_executor)
    message = str(caught.value)
    assert "params_model_2_ptm.npz: missing" in message
    assert "params_model_3_ptm.npz: not an npz archive" in message
    assert "model_1_ptm" not in message
    with Ledger(settings.out, readonly=True) as ledger:
        (run,) = ledger.runs()
    assert run.exit_code == 2


class _ManualExecutor:
    """Search jobs wait until the test completes their futures; `jobs` lists (target, CPUs
    asked for, future)."""

    name = "manual"

    def __init__(self) -> None:
        import concurrent.futures as cf

        self.jobs: list[tuple[str, int, cf.Future]] = []

    def submit(self, fn, *args, resources):  # type: ignore[no-untyped-def]
        import concurrent.futures as cf

        from parafold.engine.base import JobHandle

        future: cf.Future = cf.Future()
        self.jobs.append((args[0].name, resources.cpus, future))
        return JobHandle(future)

    def cpu_capacity(self) -> int:
        return 4

    def max_job_cpus(self) -> int:
        return 4

    def running(self) -> list[str]:
        return sorted(name for name, _, f in self.jobs if not f.done())


def _search_scheduler(tmp_path: Path, ledger: Ledger, executor: _ManualExecutor,
                      names: tuple[str, ...]) -> object:
    """A scheduler of searches only: two at a time, 2 CPUs each, out of 4."""
    from parafold.engine.scheduler import Scheduler

    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                           search=None, model=ModelSettings(config_size="tiny", models=(1,)),
                           cpus=4, cpus_per_search=2)
    targets = [Target(n, n, "MKV" + n.upper()) for n in names]
    ledger.register(targets)
    sched = Scheduler(settings, ledger, 1, executor, None, targets, [],  # type: ignore[arg-type]
                      total=len(targets), done_before=0)
    sched.search_cpus = 2
    return sched


def _failed_search(name: str, error: str = "a broken database", **how: bool) -> object:
    from parafold.engine.jobs import SearchOutcome

    now = time.time()
    return SearchOutcome(name, None, f"{name}: {error}", "w", now, now, **how)


def test_a_search_killed_among_others_runs_again_alone_once(tmp_path: Path) -> None:
    """A search job whose tool died of SIGKILL (most likely out of memory) goes back to the
    queue and runs again alone: no other search starts while it waits or runs, and it asks for
    every CPU. Killed again, it fails, and the error says it was alone."""
    from parafold.ledger import State

    def killed(name: str) -> object:
        return _failed_search(name, "jackhmmer was killed (SIGKILL)", killed=True)

    executor = _ManualExecutor()
    running = executor.running
    with Ledger(tmp_path) as ledger:
        sched = _search_scheduler(tmp_path, ledger, executor, ("a", "b", "c", "d"))
        slots = 2
        sched._submit_searches(slots)
        assert running() == ["a", "b"]
        future_of = {n: f for n, _, f in executor.jobs}

        future_of["a"].set_result(killed("a"))
        sched._search_finished(future_of["a"])
        assert ledger.get("a").state is State.QUEUED
        sched._submit_searches(slots)
        assert running() == ["b"]  # a waits for b; c does not start meanwhile

        future_of["b"].set_result(killed("b"))
        sched._search_finished(future_of["b"])
        sched._submit_searches(slots)
        assert running() == ["a"] and executor.jobs[-1][:2] == ("a", 4)  # alone, every CPU
        sched._submit_searches(slots)
        assert running() == ["a"]  # b waits for a

        future_of["a"] = executor.jobs[-1][2]
        future_of["a"].set_result(killed("a"))
        sched._search_finished(future_of["a"])
        failed = ledger.get("a")
        assert failed.state is State.FAILED
        assert failed.error.startswith("killed again when searching alone")
        sched._submit_searches(slots)
        assert running() == ["b"] and executor.jobs[-1][:2] == ("b", 4)
        executor.jobs[-1][2].set_result(_failed_search("b"))
        sched._search_finished(executor.jobs[-1][2])
        sched._submit_searches(slots)
        assert running() == ["c", "d"]  # nothing waits alone: the queue goes on as before
        assert sched.failed == 2 and sched.search_failed == 2


def test_searches_of_a_dead_worker_are_queued_again_then_run_alone(tmp_path: Path) -> None:
    """A search worker process that dies takes the searches beside it along: each is queued
    again (behind the others); one whose worker dies a second time runs alone; a third death
    fails it."""
    from concurrent.futures.process import BrokenProcessPool

    from parafold.ledger import State

    executor = _ManualExecutor()
    running = executor.running
    with Ledger(tmp_path) as ledger:
        sched = _search_scheduler(tmp_path, ledger, executor, ("a", "b", "c", "d"))
        sched._submit_searches(2)
        assert running() == ["a", "b"]
        for _, _, future in executor.jobs:
            future.set_exception(BrokenProcessPool("a child process terminated abruptly"))
            sched._search_finished(future)
        assert ledger.get("a").state is State.QUEUED and ledger.get("b").state is State.QUEUED
        assert [t.name for t in sched.pending] == ["c", "d", "a", "b"]
        sched._submit_searches(2)
        assert running() == ["c", "d"]
        for name, _, future in executor.jobs[2:]:
            future.set_result(_failed_search(name))
            sched._search_finished(future)
        sched._submit_searches(2)
        assert running() == ["a", "b"]
        a_job, b_job = executor.jobs[-2][2], executor.jobs[-1][2]
        a_job.set_exception(BrokenProcessPool("a child process terminated abruptly"))
        sched._search_finished(a_job)  # a's worker died twice: a runs alone, after b
        sched._submit_searches(2)
        assert running() == ["b"]
        b_job.set_result(_failed_search("b"))
        sched._search_finished(b_job)
        sched._submit_searches(2)
        assert running() == ["a"] and executor.jobs[-1][:2] == ("a", 4)
        executor.jobs[-1][2].set_exception(BrokenProcessPool("terminated abruptly"))
        sched._search_finished(executor.jobs[-1][2])
        failed = ledger.get("a")
        assert failed.state is State.FAILED and "search worker died" in failed.error
        assert failed.error.startswith("killed again when searching alone")
        assert not sched._work_left() and sched.failed == 4


def test_a_search_whose_worker_dies_while_alone_fails(tmp_path: Path) -> None:
    """Alone, nothing else shares its memory: a target whose worker dies then is the cause,
    and fails rather than go back to the queue."""
    from concurrent.futures.process import BrokenProcessPool

    from parafold.ledger import State

    executor = _ManualExecutor()
    with Ledger(tmp_path) as ledger:
        sched = _search_scheduler(tmp_path, ledger, executor, ("a",))
        sched._submit_searches(2)
        executor.jobs[-1][2].set_result(_failed_search("a", "killed (SIGKILL)", killed=True))
        sched._search_finished(executor.jobs[-1][2])
        sched._submit_searches(2)
        assert executor.running() == ["a"] and executor.jobs[-1][1] == 4  # alone
        executor.jobs[-1][2].set_exception(BrokenProcessPool("terminated abruptly"))
        sched._search_finished(executor.jobs[-1][2])
        assert ledger.get("a").state is State.FAILED and not sched._work_left()
        assert ledger.get("a").error.startswith("killed again when searching alone")


def test_a_target_predicted_after_a_copy_is_no_copy_in_the_ledger(tmp_path: Path) -> None:
    """A copy left `copied_from` in the ledger; the target's own prediction (a later run)
    removes it, so results.tsv does not call it a copy."""
    from parafold.engine.scheduler import _outcome_timings
    from parafold.ledger import State

    with Ledger(tmp_path) as ledger:
        ledger.register([Target("t", "t", "MKV")])
        ledger.reconcile("t", State.PREDICTING)
        ledger.done("t", {"copied_from": "s", "copy_s": 0.02, "mean_plddt": 50.0})
        ledger.reconcile("t", State.PREDICTING)
        outcome = SimpleNamespace(timings={"predict_model_1_ptm": 1.5}, mean_plddt=61.0,
                                  ptm=0.4)
        ledger.done("t", _outcome_timings(outcome))
        assert ledger.get("t").timings["predict"] == {"predict_model_1_ptm": 1.5,
                                                      "mean_plddt": 61.0, "ptm": 0.4}


def test_a_drain_that_leaves_nothing_behind_exits_as_a_finished_run(tmp_path: Path) -> None:
    """75 tells a job script to requeue: only when targets are left for the rerun."""
    from parafold.lifecycle import EXIT_STOPPED_EARLY
    from parafold.pipeline import Failure, RunSummary

    def summary(done: int, failed: int) -> RunSummary:
        return RunSummary(out=tmp_path, targets=4, done=done,
                          failures=tuple(Failure(f"t{i}", "predict", "x") for i in range(failed)),
                          input_problems=(), wall_s=1.0, searched=0, predicted=done,
                          compiles=0, engine="local", stopped="SIGUSR1: asked to drain")

    assert summary(3, 0).exit_code == EXIT_STOPPED_EARLY
    assert "Rerun the same command to resume." in summary(3, 0).lines()
    assert summary(4, 0).exit_code == 0
    assert summary(3, 1).exit_code == 1
    assert any("nothing was left to do" in line for line in summary(4, 0).lines())


def test_a_prediction_from_an_old_sequence_is_removed_with_its_plots(tmp_path: Path) -> None:
    """The input changed under the same id: the old prediction (and its plots, its structure
    script) goes at once, so while the new sequence is searched, or if that fails, no table
    or report shows the old protein as this target's."""
    import json

    from parafold.featureset import MANIFEST_FILE
    from parafold.pipeline import _forget_stale_prediction

    folder = tmp_path / "t"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps({"sequence": "MKVLAAGIVG", "key": "k"}))
    old = ["ranking_debug.json", "ranked_0.pdb", "ranked_0.cif", "unrelaxed_model_1_ptm.pdb",
           "scores_model_1_ptm.json", "pae_model_1_ptm.json", "plddt.png", "pae.png",
           "coverage.png", "ranked_0.pdb.js"]
    for name in [*old, "features.npz", "timings.json"]:
        (folder / name).write_text("x")
    _forget_stale_prediction(Target("t", "t", "MKVLAAGIVG"), folder, "k")  # unchanged
    assert all((folder / name).is_file() for name in old)
    _forget_stale_prediction(Target("t", "t", "MKTAYIAKQR"), folder, "k")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST_FILE, "features.npz", "timings.json"])


class _Done:
    """A finished job's handle."""

    def __init__(self, value: object) -> None:
        import concurrent.futures as cf

        self.future: cf.Future = cf.Future()
        self.future.set_result(value)


class _FakeWorker:
    name, platform = "gpu0", "gpu"

    def warm(self) -> _Done:
        return _Done("gpu0@x")

    def fold(self, sets: list[FeatureSet], out_root: Path) -> _Done:  # "S" fails on its own
        from parafold.engine.jobs import FoldBatchResult

        now = time.time()
        return _Done(FoldBatchResult(tuple(
            SimpleNamespace(name=fs.name, ok=fs.name != "S", error="S: its features are bad",
                            timings={}) for fs in sets), "gpu0@x", now, now))


class _TwoSmallNodes:
    """What Ray reports for two 2-CPU nodes beside a fold actor: 3 CPUs in all, 1 per job.
    Searches fail at once (the run then ends); copies succeed."""

    name = "fake-ray"

    def __init__(self) -> None:
        self.asked: list[int] = []

    def submit(self, fn: object, *args: object, resources: object) -> _Done:
        from parafold.engine.jobs import SearchOutcome

        if isinstance(args[0], Target):
            self.asked.append(resources.cpus)
            return _Done(SearchOutcome(args[0].name, None, "stub", "w", time.time(),
                                       time.time()))
        return _Done(SimpleNamespace(seconds=0.01, mean_plddt=80.0, ptm=0.5))

    def cpu_capacity(self) -> int:
        return 3

    def max_job_cpus(self) -> int:
        return 1

    def start_fold_workers(self, spec: object) -> list[_FakeWorker]:
        return [_FakeWorker()]


def _settings(tmp: Path, **kw: object) -> RunSettings:
    return RunSettings(input=tmp / "in.fasta", out=tmp / "out", params_dir=tmp, search=None,
                       model=ModelSettings(config_size="tiny", models=(1,)), progress=False,
                       plots=False, **kw)


def test_a_search_asks_no_more_cpus_than_one_node_has(tmp_path: Path) -> None:
    """On Ray the cluster has more CPUs than any node: a search asking for the cluster's
    share was never scheduled, and the run waited for ever."""
    from parafold.engine.scheduler import Scheduler

    settings = _settings(tmp_path)  # --cpus-per-search left at 3
    settings.out.mkdir()
    nodes = _TwoSmallNodes()
    targets = [Target("t1", "t1", "MKVLAAGIVG")]
    with Ledger(settings.out) as ledger:
        ledger.register(targets)
        Scheduler(settings, ledger, 1, nodes, None, targets, [], total=1, done_before=0).run()
    assert nodes.asked == [1]


def test_twins_of_a_failed_source_all_follow_its_first_twin_even_to_a_copy(
        tmp_path: Path) -> None:
    """S fails on its own; its twins T1 and T2 wait. Meanwhile another OUT sharing the cache
    predicted the same features, so T1 becomes a copy: T2 must follow (it was parked under T1,
    never released, and the run ended with it neither done nor failed)."""
    from parafold.engine.scheduler import Scheduler
    from parafold.fold.outputs import DONE_FILE
    from parafold.ledger import State

    seq = "MKVLAAGIVG" * 5
    sets = [FeatureSet(name=n, target_id=n, sequence=seq, path=tmp_path / n, msa_depth=30,
                       num_templates=0, key="k1") for n in ("S", "T1", "T2")]
    settings = _settings(tmp_path, max_batch=4, max_wait_s=0.0)
    settings.out.mkdir()
    with Ledger(settings.out) as ledger:
        ledger.register([Target(fs.name, fs.name, seq) for fs in sets])
        for fs in sets:
            ledger.reconcile(fs.name, State.FEATURES_READY)
        sched = Scheduler(settings, ledger, 1, _TwoSmallNodes(), None, [], sets[:1], total=3,
                          done_before=0)
        for fs in sets[1:]:
            sched._admit(fs, time.time())
        elsewhere = tmp_path / "other_out" / "X"
        elsewhere.mkdir(parents=True)
        (elsewhere / DONE_FILE).write_text("{}")
        sched.index.record(sets[0], elsewhere)
        sched.run()
        states = {fs.name: ledger.get(fs.name).state for fs in sets}
    assert states == {"S": State.FAILED, "T1": State.DONE, "T2": State.DONE}
    assert sched.finished == 3 and not sched._parked


def test_run_paths_are_absolute_for_processes_elsewhere(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray task runs in the folder `ray start` ran in: relative paths pointed elsewhere."""
    monkeypatch.chdir(tmp_path)
    settings = RunSettings(input=Path("in.fasta"), out=Path("out"), params_dir=Path("p"),
                           search=None, model=None, db_dir=Path("db"), cache_dir=Path("c"),
                           db_overrides=(("pdb70", Path("x/pdb70")),))
    assert settings.out == tmp_path / "out" and settings.input == tmp_path / "in.fasta"
    assert settings.params_dir.is_absolute() and settings.db_dir.is_absolute()
    assert settings.cache_dir == tmp_path / "c"
    assert settings.db_overrides == (("pdb70", tmp_path / "x" / "pdb70"),)


@contextlib.contextmanager
def _source_and_twin(root: Path) -> Iterator[tuple[Any, Ledger, list[FeatureSet]]]:
    """A scheduler over two targets with the same features, S and T, both features_ready."""
    from parafold.engine.scheduler import Scheduler
    from parafold.ledger import State

    seq = "MKVLAAGIVG" * 5
    settings = _settings(root)
    settings.out.mkdir(parents=True)
    sets = [FeatureSet(name=n, target_id=n, sequence=seq, path=settings.out / n, msa_depth=30,
                       num_templates=0, key="k1") for n in ("S", "T")]
    with Ledger(settings.out) as ledger:
        ledger.register([Target(fs.name, fs.name, seq) for fs in sets])
        for fs in sets:
            ledger.reconcile(fs.name, State.FEATURES_READY)
        yield (Scheduler(settings, ledger, 1, _TwoSmallNodes(), None, [], [], total=2,
                         done_before=0), ledger, sets)


def test_twins_left_waiting_when_nothing_runs_fail_with_the_reason(tmp_path: Path) -> None:
    """The scheduler's last guard: a twin still parked under a source once the loop ends
    fails, naming the source, instead of staying features_ready without a word; a stopped
    run (a drain) keeps it ready for the rerun."""
    from parafold.ledger import State

    with _source_and_twin(tmp_path) as (sched, ledger, sets):
        sched._parked = {"S": [sets[1]]}
        sched.stopped = "SIGUSR1: asked to drain"
        sched._fail_stranded_twins()
        assert ledger.get("T").state is State.FEATURES_READY and sched._parked
        sched.stopped = None
        sched._fail_stranded_twins()
        record = ledger.get("T")
        assert record.state is State.FAILED and "S, which never finished" in record.error
        assert (sched.failed, sched.finished, sched._parked) == (1, 1, {})


def test_a_drain_still_copies_a_finished_sources_prediction(tmp_path: Path) -> None:
    """SIGUSR1 drains a run: a source finishing meanwhile still gives its twins their copies
    (milliseconds; else the job is requeued for them alone). A full disk copies nothing."""
    for how, copies in (("drain", 1), ("disk full", 0)):
        with _source_and_twin(tmp_path / how.replace(" ", "_")) as (sched, _, sets):
            for fs in sets:
                sched._admit(fs, time.time())
            assert sched._parked == {"S": [sets[1]]}
            if how == "drain":
                sched._drain("SIGUSR1: asked to drain")
            else:
                sched._stop("No space left on device", "free space")
            sched._source_done("S")
            assert len(sched.copying) == copies, how
