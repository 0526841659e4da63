"""A disk that fills up (or a quota that runs out) in the middle of `parafold run`: the run
stops with exit 75 and says what to do, fails no target for it, keeps what it finished and
leaves no half-written file; once space is freed, the same command finishes the rest. The
disk is a real one: a small tmpfs mounted for the test (root only) and filled with a ballast
file as soon as the first target is done."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from parafold.errors import ToolFailedError, is_storage_full
from parafold.ledger import Ledger, State
from test_pipeline import PARAFOLD, QUERY_LENGTH, check_complete, jax_cache_home

N_TARGETS = 6


def test_disk_full_and_quota_are_told_apart_from_other_errors() -> None:
    """Through causes and contexts, from SQLite and from a tool's last words; nothing else."""
    import sqlite3

    assert is_storage_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writing outputs failed") from inner
    except RuntimeError as outer:
        assert is_storage_full(outer)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert is_storage_full(full)
    assert is_storage_full(ToolFailedError(["hhblits"], 1, "ERROR: No space left on device\n"))
    assert not is_storage_full(ToolFailedError(["hhblits"], 1, "ERROR: bad database\n"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(ValueError("No space left on device"))  # words alone are not
    assert not is_storage_full(None)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB tmpfs at tmp_path/disk, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A ballast file taking all but `leave` bytes of the disk."""
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave
    ballast = disk / "ballast"
    with ballast.open("wb") as handle:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= handle.write(chunk[:min(len(chunk), size)])
    return ballast


def _states(out: Path, names: list[str]) -> dict[str, State]:
    with Ledger(out, readonly=True) as ledger:
        return {n: ledger.get(n).state for n in names}  # type: ignore[union-attr]


def test_a_full_disk_stops_the_run_and_a_rerun_finishes_it(
        small_disk: Path, synthetic_db: Path, tiny_params: Path, tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from parafold.inputs import read_targets

    targets = read_targets(synthetic_db / "queries.fasta").targets[:N_TARGETS]
    names = [t.name for t in targets]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{t.id}\n{t.sequence[:QUERY_LENGTH]}\n" for t in targets))
    out = small_disk / "out"
    args = [PARAFOLD, "run", str(fasta), "-o", str(out), "--db-dir", str(synthetic_db),
            "--params-dir", str(tiny_params), "--config", "tiny", "--models", "1",
            "--num-recycle", "0", "--cpus", "2", "--float32", "--max-wait", "1", "--no-plots",
            "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XDG_CACHE_HOME": str(jax_cache_home(tmp_path_factory))}
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while not _any_done(out):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            ballast = _fill(small_disk, leave=64 << 10)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text()
    assert proc.returncode == 75, output
    assert "No space left on device" in output and "rerun the same command" in output, output
    assert "Traceback" not in output, output
    states = _states(out, names)
    done = sorted(n for n, s in states.items() if s is State.DONE)
    assert done and len(done) < N_TARGETS, states
    assert State.FAILED not in states.values(), states  # the disk's fault, no target's
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))
    finished = {n: (out / n / "ranked_0.pdb").stat().st_mtime_ns for n in done}

    ballast.unlink()
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    check_complete(out, names)
    assert {n: (out / n / "ranked_0.pdb").stat().st_mtime_ns for n in done} == finished


def _any_done(out: Path) -> bool:
    import sqlite3

    if not (out / "parafold.sqlite").exists():
        return False
    try:
        with Ledger(out, readonly=True) as ledger:
            return any(r.state is State.DONE for r in ledger.targets())
    except sqlite3.Error:  # the run is still creating its tables
        return False


def test_the_scheduler_requeues_what_a_full_disk_stopped_and_starts_nothing_more(
        tmp_path: Path) -> None:
    """Both ways a full disk reaches the scheduler, one after the other: a search that could
    not write its features (back to queued) and a prediction that could not write its files
    (back to features_ready, its batch mate done). No target fails; no search or batch starts
    after; the run ends when nothing is in flight, with the reason."""
    import concurrent.futures as cf
    from types import SimpleNamespace

    from parafold.engine.jobs import FoldBatchResult, SearchOutcome
    from parafold.engine.scheduler import Scheduler
    from parafold.featureset import FeatureSet
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import Target
    from parafold.pipeline import RunSettings

    class NoExecutor:  # nothing may start once the run is stopping
        def submit(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("a search started after the disk filled up")

    full = "OSError: [Errno 28] No space left on device"
    targets = [Target(n, n, "MKVLAAGIVG") for n in ("s1", "s2", "a", "b", "c")]
    sets = {n: FeatureSet(name=n, target_id=n, sequence="MKVLAAGIVG", path=tmp_path / n,
                          msa_depth=30, num_templates=0) for n in ("a", "b", "c")}
    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                           search=None, model=ModelSettings(config_size="tiny", models=(1,)),
                           max_batch=2, max_wait_s=0.0, plots=False)
    with Ledger(tmp_path) as ledger:
        ledger.register(targets)
        sched = Scheduler(settings, ledger, 1, NoExecutor(), None,  # type: ignore[arg-type]
                          targets[1:2], [], total=5, done_before=0)
        ledger.start_search("s1")  # in flight when the disk fills up
        sched._target_searched(targets[0], SearchOutcome("s1", None, full, "w", 0.0, 1.0,
                                                         stopped_early=True), None)
        assert sched.stopped == full and sched.failed == 0
        sched._submit_searches(slots=2)  # s2 stays queued
        assert [t.name for t in sched.pending] == ["s2"]

        worker = SimpleNamespace(name="gpu0", fold=lambda *a: pytest.fail("a batch started"))
        for name in ("a", "b", "c"):
            ledger.start_search(name)
            ledger.features_ready(name)
        ledger.start_predict(["a", "b"])
        future: cf.Future[FoldBatchResult] = cf.Future()
        future.set_result(FoldBatchResult(
            (SimpleNamespace(name="a", ok=True, timings={}, skipped=False, stopped_early=False),
             SimpleNamespace(name="b", ok=False, error=f"writing outputs for b failed: {full}",
                             stopped_early=True)), "gpu0", 0.0, 1.0))
        sched.folding[future] = (worker, [sets["a"], sets["b"]], 1, 0.0)  # type: ignore[assignment]
        sched.ready["c"] = (sets["c"], 0.0)
        sched._fold_finished(future)
        sched._dispatch_folds()  # c would go now, but the run is stopping
        assert "c" in sched.ready and sched.idle == [worker]
        assert not sched._work_left()
        states = {r.name: r.state for r in ledger.targets()}
    assert states == {"s1": State.QUEUED, "s2": State.QUEUED, "a": State.DONE,
                      "b": State.FEATURES_READY, "c": State.FEATURES_READY}, states


def test_features_on_a_full_disk_exits_75_and_searches_no_more(
        small_disk: Path, synthetic_db: Path, tmp_path: Path) -> None:
    """`parafold features` with no room left for features: the first searches fail to write,
    the rest are not started (each would take hours on real databases), and the exit code
    (75) and message tell a job script to free space and rerun, not that targets failed."""
    from parafold.inputs import read_targets

    targets = read_targets(synthetic_db / "queries.fasta").targets[:N_TARGETS]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{t.id}\n{t.sequence[:QUERY_LENGTH]}\n" for t in targets))
    out = small_disk / "features"
    out.mkdir()
    _fill(small_disk, leave=16 << 10)
    proc = subprocess.run(
        [PARAFOLD, "features", str(fasta), "-o", str(out), "--db-dir", str(synthetic_db),
         "--cpus", "2"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 75, output
    assert "stopped by a full disk or a spent quota" in output, output
    assert "rerun the same command" in output and "Traceback" not in output, output
    assert output.count("searching (") < N_TARGETS, output  # the rest were never started
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))


def test_predict_launches_nothing_more_once_a_write_meets_a_full_disk(
        small_disk: Path, tmp_path: Path) -> None:
    """The fold loop, writing into a full disk: the first target's files fail to write, so
    after the unit already launched behind it (the loop launches the next unit before it
    fetches the last) nothing more is launched: each would fail the same way after its GPU
    time. Every target's outcome says it was the disk, for a rerun. The real tiny model on
    the CPU, where files are written inline, so the stop is exact."""
    import numpy as np

    from parafold.featureset import write_feature_set
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(config_size="tiny", models=(1,), num_recycle=0, float32=True,
                             compile_cache_dir=tmp_path / "jax-cache")
    write_random_params(tmp_path / "weights", settings, seed=0)
    rng = np.random.default_rng(5)
    sets = [write_feature_set(tmp_path / "features" / f"t{i}", name=f"t{i}", target_id=f"t{i}",
                              features=make_features(random_sequence(30, rng), 8, seed=i))
            for i in range(3)]
    out = small_disk / "pred"
    out.mkdir()
    _fill(small_disk, leave=16 << 10)
    with FoldWorker(tmp_path / "weights", settings) as worker:
        outcomes = worker.fold(sets, out)
        launches = worker.runner.stats.as_dict()["launches"]
    assert [o.stopped_early for o in outcomes] == [True, True, True], outcomes
    assert "No space left on device" in (outcomes[0].error or ""), outcomes[0]
    assert "writing outputs for t1 failed" in (outcomes[1].error or ""), outcomes[1]
    assert "t2: not predicted: " in (outcomes[2].error or ""), outcomes[2]
    assert launches == 2, launches
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))


def test_a_drain_launches_no_unit_and_every_target_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fold loop asked to drain (SIGUSR1 reached `predict`) before its first unit: it
    launches nothing, and every target is stopped early, not failed, for the rerun."""
    import numpy as np

    from parafold import lifecycle
    from parafold.featureset import write_feature_set
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(config_size="tiny", models=(1,), num_recycle=0, float32=True,
                             compile_ahead=0, compile_cache_dir=None)
    write_random_params(tmp_path / "weights", settings, seed=0)
    rng = np.random.default_rng(6)
    sets = [write_feature_set(tmp_path / "features" / f"d{i}", name=f"d{i}", target_id=f"d{i}",
                              features=make_features(random_sequence(30, rng), 8, seed=i))
            for i in range(2)]
    monkeypatch.setattr(lifecycle, "_drain", ["SIGUSR1: asked to drain"])
    with FoldWorker(tmp_path / "weights", settings) as worker:
        outcomes = worker.fold(sets, tmp_path / "out")
        launches = worker.runner.stats.as_dict()["launches"]
    assert launches == 0
    assert all(o.stopped_early and not o.ok and "not predicted: SIGUSR1" in (o.error or "")
               for o in outcomes), outcomes
