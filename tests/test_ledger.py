"""The run ledger's state machine, concurrent reads while another process writes, the lock."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parafold.errors import RunLockedError
from parafold.inputs import InputProblem, Target
from parafold.ledger import Ledger, LedgerError, RunLock, State, read_lock_holder


def _targets(n: int) -> list[Target]:
    return [Target(f"t{i}", f"t{i}", "ACDEFGHIKL" * (i + 1)) for i in range(n)]


def test_state_machine_happy_path_and_failures(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        assert led.register(_targets(3)) == ["t0", "t1", "t2"]
        assert led.register(_targets(3)) == []  # same sequences: nothing new
        led.start_search("t0")
        led.features_ready("t0", {"wall_s": 1.5})
        led.start_predict(["t0"])
        led.done("t0", {"predict_s": 2.0})
        led.start_search("t1")
        led.fail("t1", "search", "ToolFailedError: jackhmmer exited 1")
        rec = led.get("t0")
        assert rec is not None and rec.state is State.DONE
        assert set(rec.stamps) == {"queued", "searching", "features_ready", "predicting", "done"}
        assert rec.timings == {"search": {"wall_s": 1.5}, "predict": {"predict_s": 2.0}}
        assert rec.attempts == 1
        failed = led.get("t1")
        assert failed is not None and failed.state is State.FAILED
        assert failed.failed_stage == "search" and "jackhmmer" in (failed.error or "")
        counts = led.counts()
        assert counts[State.DONE] == 1 and counts[State.FAILED] == 1 and counts[State.QUEUED] == 1


def test_illegal_transitions_raise(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        led.register(_targets(1))
        with pytest.raises(LedgerError):
            led.start_predict(["t0"])  # features are not ready
        with pytest.raises(LedgerError):
            led.features_ready("missing")
        led.start_search("t0")
        with pytest.raises(LedgerError):
            led.start_search("t0")  # already searching
        led.reconcile("t0", State.QUEUED)  # what start-up does after a killed run
        led.start_search("t0")
        assert led.get("t0").attempts == 2  # type: ignore[union-attr]


def test_changed_sequence_starts_over(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        led.register(_targets(1))
        led.start_search("t0")
        led.features_ready("t0")
        assert led.register([Target("t0", "t0", "MKV")]) == ["t0"]
        rec = led.get("t0")
        assert rec is not None and rec.state is State.QUEUED and rec.length == 3


def test_events_runs_and_problems(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        run = led.begin_run({"cpus": 2})
        led.record_input_problems(run, [InputProblem("in.fasta", 3, "bad", "empty sequence")])
        led.add_event(run_id=run, worker="gpu0@h:1", kind="predict", target="t0", start=2.0,
                      end=3.0, ok=True)
        led.end_run(run, 0)
        (event,) = led.events("predict")
        assert (event.worker, event.start, event.end, event.ok) == ("gpu0@h:1", 2.0, 3.0, True)
        assert led.runs()[0].exit_code == 0
        assert [p.record_id for p in led.input_problems()] == ["bad"]


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from parafold.inputs import Target
    from parafold.ledger import Ledger
    led = Ledger(Path(sys.argv[1]))
    names = [f"w{i}" for i in range(300)]
    led.register([Target(n, n, "ACDE") for n in names])
    print("registered", flush=True)
    for n in names:
        led.start_search(n)
        led.features_ready(n)
        led.start_predict([n])
        led.done(n)
""")


def test_status_reads_while_another_process_writes(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "registered"
    seen = []
    reader = Ledger(tmp_path, readonly=True)
    while proc.poll() is None:
        counts = reader.counts()
        assert sum(counts.values()) == 300  # a consistent snapshot, never a half transition
        seen.append(counts[State.DONE])
    assert proc.wait() == 0
    assert reader.counts()[State.DONE] == 300
    assert seen == sorted(seen)
    reader.close()


def _hold_lock(out: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    RunLock(out).acquire()
    ready.set()
    time.sleep(60)


def test_lock_refuses_second_run_and_dies_with_holder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            RunLock(tmp_path).acquire()
        info = read_lock_holder(tmp_path)
        assert info is not None and info.pid == holder.pid and info.alive_here()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.join()
    with RunLock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_a_commit_that_times_out_leaves_no_transaction_open(tmp_path: Path, monkeypatch) -> None:
    """On NFS or Lustre (a rollback journal) COMMIT waits for readers; one that outlasts the
    busy timeout fails that write, and the ledger takes the next one (the open transaction
    kept the write lock: every later write failed, the run's end record too)."""
    import sqlite3

    import parafold.filesystems as fsys
    import parafold.ledger as ledger_module

    out = tmp_path / "OUT"
    out.mkdir()
    (tmp_path / "mountinfo").write_text(
        f"1 0 0:1 / / rw - ext4 /dev/root rw\n2 1 0:2 / {out} rw - nfs4 srv:/x rw\n")
    monkeypatch.setattr(fsys, "MOUNTINFO", tmp_path / "mountinfo")
    monkeypatch.setattr(ledger_module, "_BUSY_TIMEOUT_S", 0.3)
    targets = [Target("a", "a", "MKTAYIAK"), Target("b", "b", "MKVLAAGI")]
    with Ledger(out) as ledger:
        assert ledger.mode is fsys.LedgerMode.ROLLBACK
        ledger.register(targets)
        reader = sqlite3.connect(f"file:{out / 'parafold.sqlite'}?mode=ro", uri=True,
                                 isolation_level=None, timeout=0.3)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM targets").fetchone()  # a slow `status`
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ledger.start_search("a")
        reader.execute("COMMIT")
        reader.close()
        ledger.start_search("b")
        assert ledger.get("b").state is State.SEARCHING


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to read as another user (setpriv)")
def test_another_user_reads_a_finished_runs_ledger() -> None:
    """Staff reading a user's finished run (`parafold status`, read access only): the run
    removed its WAL files on closing, and SQLite cannot make them for a reader who may not
    write OUT; the ledger is then read as it stands."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's folders are private
        out = Path(shared) / "OUT"
        with Ledger(out) as ledger:
            run_id = ledger.begin_run({})
            ledger.register([Target("a", "a", "MKTAYIAK")], run_id=run_id)
            ledger.end_run(run_id, 0)
        assert sorted(p.name for p in out.iterdir()) == ["parafold.sqlite"]
        for path in (Path(shared), out):
            path.chmod(0o755)
        (out / "parafold.sqlite").chmod(0o644)
        _status_as_another_user(out)


def _status_as_another_user(out: Path) -> None:
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*as_nobody, sys.executable, "-c", "import parafold"],
                      capture_output=True, timeout=120).returncode != 0:
        pytest.skip("this checkout is not readable by another user")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import sys; from parafold.status import read_status; "
         "print(read_status(sys.argv[1]).total)", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": "/tmp"})
    assert proc.returncode == 0 and proc.stdout.strip() == "1", proc.stderr[-2000:]
