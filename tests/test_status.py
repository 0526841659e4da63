"""`parafold status`: counts scoped to the latest run's input, liveness probed from the lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from parafold.inputs import Target
from parafold.ledger import LOCK_FILE, Ledger, RunLock, State, lock_is_held
from parafold.status import read_status


def _targets(names: list[str]) -> list[Target]:
    return [Target(n, n, "ACDEFGHIKL") for n in names]


def _finish(led: Ledger, name: str) -> None:
    led.start_search(name)
    led.features_ready(name)
    led.start_predict([name])
    led.done(name)


def test_status_counts_only_the_latest_runs_targets(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        first = led.begin_run()
        led.register(_targets(["a", "b", "c", "d", "e"]), run_id=first)
        _finish(led, "a")
        led.end_run(first, 1)
        second = led.begin_run()  # rerun with a smaller FASTA: a, b only
        led.register(_targets(["a", "b"]), run_id=second)
        led.start_search("b")
        led.fail("b", "search", "boom")
    status = read_status(tmp_path)
    assert status.total == 2 and status.remaining == 0
    assert status.counts[State.QUEUED] == 0 and status.counts[State.DONE] == 1
    assert status.other_runs == 3
    text = "\n".join(status.lines())
    assert "1/2 done, 0 to go" in text
    assert "3 targets from earlier runs are not in the latest run's input" in text


def test_status_names_retired_fold_workers_of_the_latest_run(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        first = led.begin_run()
        led.add_worker_event(run_id=first, worker="gpu0", kind="retired", reason="old news")
        led.end_run(first, 1)
        second = led.begin_run()
        led.register(_targets(["a"]), run_id=second)
        led.add_worker_event(run_id=second, worker="gpu1", kind="retired",
                             reason="failed to start: RuntimeError: CUDA_ERROR_NO_DEVICE")
    text = "\n".join(read_status(tmp_path).lines())
    assert "fold workers out of rotation (1):" in text
    assert "gpu1: failed to start: RuntimeError: CUDA_ERROR_NO_DEVICE" in text
    assert "old news" not in text


def test_status_eta_covers_the_latest_run_only(tmp_path: Path) -> None:
    with RunLock(tmp_path), Ledger(tmp_path) as led:
        first = led.begin_run()
        led.register(_targets([f"old{i}" for i in range(90)]), run_id=first)
        led.end_run(first, 1)
        run = led.begin_run()
        names = [f"t{i}" for i in range(4)]
        led.register(_targets(names), run_id=run)
        _finish(led, "t0")
        status = read_status(tmp_path)
    assert status.live and status.remaining == 3 and status.other_runs == 90
    assert status.eta_s is not None and status.proteins_per_hour is not None
    assert abs(status.eta_s - 3 / status.proteins_per_hour * 3600) < 1e-6


def test_status_without_run_targets_counts_everything(tmp_path: Path) -> None:
    # A ledger written before runs recorded their targets: today's behaviour.
    with Ledger(tmp_path) as led:
        led.begin_run()
        led.register(_targets(["a", "b", "c"]))
    status = read_status(tmp_path)
    assert status.total == 3 and status.other_runs == 0
    assert "earlier runs" not in "\n".join(status.lines())


def test_status_opens_a_ledger_without_the_run_targets_table(tmp_path: Path) -> None:
    with Ledger(tmp_path) as led:
        led.begin_run()
        led.register(_targets(["a", "b"]))
        led._db.execute("DROP TABLE run_targets")  # as written by an older parafold
    status = read_status(tmp_path)
    assert status.total == 2 and status.other_runs == 0


def test_status_not_live_when_the_lock_file_names_a_reused_pid(tmp_path: Path) -> None:
    # The run crashed (never ended); its PID now belongs to a live process (here: us).
    with Ledger(tmp_path) as led:
        led.begin_run()
        led.register(_targets(["a"]))
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    assert lock_is_held(tmp_path) is False
    status = read_status(tmp_path)
    assert not status.live and status.eta_s is None
    assert "not running" in status.lines()[0]


def test_status_live_while_the_lock_is_held(tmp_path: Path) -> None:
    with RunLock(tmp_path), Ledger(tmp_path) as led:
        led.begin_run()
        assert lock_is_held(tmp_path) is True
        status = read_status(tmp_path)
        assert status.live and "running (PID" in status.lines()[0]
    assert lock_is_held(tmp_path) is False


def test_lock_probe_without_lock_file(tmp_path: Path) -> None:
    assert lock_is_held(tmp_path) is False
    assert not (tmp_path / LOCK_FILE).exists()  # the probe creates nothing


def test_run_lock_waits_out_a_status_probe(tmp_path: Path) -> None:
    # A status probe holds a shared lock for an instant; a run starting then must not fail.
    (tmp_path / LOCK_FILE).touch()
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    release = threading.Timer(0.2, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd)))
    release.start()
    try:
        with RunLock(tmp_path):
            assert lock_is_held(tmp_path) is True
    finally:
        release.join()


def _two_shards(tmp_path: Path, error: str) -> None:
    """Two ended runs (a job array's tasks): s0 with a, b, c and s1 with d, e; the first
    target of each done, the second failed with `error` and the shard's name."""
    for shard, names in (("s0", ["a", "b", "c"]), ("s1", ["d", "e"])):
        with Ledger(tmp_path / shard) as led:
            run = led.begin_run()
            led.register(_targets(names), run_id=run)
            _finish(led, names[0])
            led.start_search(names[1])
            led.fail(names[1], "search", f"{error} {shard}")
            led.end_run(run, 1)


def test_status_of_several_outs_gives_a_line_each_and_the_sum(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from parafold.cli import app

    _two_shards(tmp_path, "boom in")
    res = CliRunner().invoke(app, ["status", str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{tmp_path / 's0'}: not running, 1/3 done, 1 failed, 1 to go")
    assert lines[1].startswith(f"{tmp_path / 's1'}: not running, 1/2 done, 1 failed, 0 to go")
    assert lines[2] == "all 2: 2/5 done, 2 failed, 1 to go; 0 running"
    assert f"{tmp_path / 's1'}/e [search]: boom in s1" in res.output
    res = CliRunner().invoke(app, ["status", str(tmp_path / "s0"), str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no run ledger" in res.output


def test_status_json_for_scripts_one_out_and_several(tmp_path: Path) -> None:
    """`parafold status --json`: what the lines say, as numbers a job script or dashboard can
    read (null where unknown), for one OUT and for a job array's OUTs with their sum."""
    from typer.testing import CliRunner

    from parafold.cli import app

    _two_shards(tmp_path, "boom\\tin")
    res = CliRunner().invoke(app, ["status", "--json", str(tmp_path / "s0")])
    assert res.exit_code == 0, res.output
    one = json.loads(res.output)
    assert (one["out"], one["running"], one["holder"]) == (str(tmp_path / "s0"), False, None)
    assert (one["total"], one["done"], one["failed"], one["remaining"]) == (3, 1, 1, 1)
    assert one["counts"] == {"queued": 1, "searching": 0, "features_ready": 0,
                             "predicting": 0, "done": 1, "failed": 1}
    assert one["failures"] == [{"name": "b", "stage": "search", "error": "boom\\tin s0"}]
    assert one["eta_s"] is None and one["done_this_run"] == 1
    res = CliRunner().invoke(app, ["status", "--json", str(tmp_path / "s0"),
                                   str(tmp_path / "s1")])
    assert res.exit_code == 0, res.output
    both = json.loads(res.output)
    assert [o["out"] for o in both["outs"]] == [str(tmp_path / "s0"), str(tmp_path / "s1")]
    assert (both["total"], both["done"], both["failed"], both["remaining"],
            both["running"]) == (5, 2, 2, 1, 0)
    assert both["proteins_per_hour"] is None  # none running


def test_status_rate_of_a_killed_run_ends_at_its_last_activity(tmp_path: Path) -> None:
    """A run SIGKILLed (no end written, lock gone) and read a day later: its elapsed time
    stops at its last event or done time, so its rate does not fall with the wall clock."""
    import sqlite3

    with Ledger(tmp_path) as led:
        run = led.begin_run()
        names = [f"t{i}" for i in range(10)]
        led.register(_targets(names), run_id=run)
        for n in names[:6]:
            _finish(led, n)
        start = time.time() - 86400 - 3600
        led.add_event(run_id=run, worker="gpu0", kind="predict", target="t5",
                      start=start + 3000, end=start + 3600, ok=True)
    db = sqlite3.connect(tmp_path / "parafold.sqlite")
    db.execute("UPDATE runs SET started_at = ?", (start,))
    db.execute("UPDATE targets SET done_at = ? WHERE state = 'done'", (start + 1800,))
    db.commit()
    db.close()
    status = read_status(tmp_path)
    assert not status.live
    assert abs(status.elapsed_s - 3600) < 1  # the event's end, after the last done time
    assert status.proteins_per_hour is not None and abs(status.proteins_per_hour - 6) < 0.01
    assert status.as_dict()["elapsed_s"] == 3600.0
