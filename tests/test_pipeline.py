"""`parafold run` end to end with the real search tools and the tiny model on random weights:
outputs, plots, the report and ledger rows for every target, a bad record failing alone, the
lock refusing a second run, SIGKILL at a random moment then a rerun that finishes without
redoing work."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from parafold.ledger import LEDGER_FILE, Ledger, State

PARAFOLD = str(Path(sys.executable).with_name("parafold"))
N_TARGETS = 3
QUERY_LENGTH = 60


@pytest.fixture(scope="session")
def pipeline_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic databases, tiny random weights, and a FASTA of real queries plus a bad one."""
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import read_targets
    from parafold.testdata import build_testdata

    root = tmp_path_factory.mktemp("pipeline")
    data = build_testdata(root / "db", families=N_TARGETS, mmseqs=False)
    write_random_params(root / "params", ModelSettings(config_size="tiny", models=(1,)))
    # Queries cut to one length bucket: one compile serves every target (CPU compiles are slow).
    good = "".join(f">{t.id}\n{t.sequence[:QUERY_LENGTH]}\n"
                   for t in read_targets(data.queries).targets)
    (root / "good.fasta").write_text(good)
    (root / "mixed.fasta").write_text(good + ">broken bad record\nMKV1234\n")
    xdg = jax_cache_home(tmp_path_factory)
    return {"db": root / "db", "params": root / "params", "good": root / "good.fasta",
            "mixed": root / "mixed.fasta", "root": root, "xdg": xdg}


def jax_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME for JAX's persistent compile cache, shared by every run of this session
    (and only of it): a shape compiled once is not compiled again by the next test."""
    xdg = tmp_path_factory.getbasetemp() / "xdg"
    xdg.mkdir(exist_ok=True)
    return xdg


def check_plots_and_report(out: Path, names: list[str], *, pae: bool = True) -> None:
    """Every done target has valid plot PNGs (PAE ones with a PAE head) and the run a report."""
    from test_report_plots import _assert_png

    for name in names:
        expected = ["plddt.png", "coverage.png"] + (["pae.png"] if pae else [])
        for png in expected:
            _assert_png(out / name / png)
        assert pae or not (out / name / "pae.png").exists()
    report = out / "report.html"
    assert report.is_file() and report.stat().st_size > 1000
    text = report.read_text(encoding="utf-8")
    assert all(f'"{name}"' in text for name in names)


def run_args(inputs: dict[str, Path], fasta: Path, out: Path, *extra: str) -> list[str]:
    return [PARAFOLD, "run", str(fasta), "-o", str(out), "--db-dir", str(inputs["db"]),
            "--params-dir", str(inputs["params"]), "--config", "tiny", "--models", "1",
            "--num-recycle", "0", "--cpus", "2", "--float32", "--max-wait", "1",
            "--no-progress", *extra]


def _env(inputs: dict[str, Path]) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
            "XDG_CACHE_HOME": str(inputs["xdg"])}


def _names(fasta: Path) -> list[str]:
    from parafold.inputs import read_targets

    return [t.name for t in read_targets(fasta).targets]


def check_complete(out: Path, names: list[str]) -> None:
    """Every target done in the ledger, with ranked structures and scores, and no partials."""
    with Ledger(out, readonly=True) as ledger:
        for name in names:
            rec = ledger.get(name)
            assert rec is not None and rec.state is State.DONE, (name, rec)
            assert {"queued", "done"} <= set(rec.stamps)
    for name in names:
        folder = out / name
        assert (folder / "features.json").is_file()
        assert (folder / "ranked_0.pdb").is_file(), sorted(p.name for p in folder.iterdir())
        assert (folder / "ranking_debug.json").is_file()
        assert list(folder.glob("scores_*.json")) or list(folder.glob("result_*.json*")), \
            sorted(p.name for p in folder.iterdir())
    assert not list(out.rglob("*.part")), list(out.rglob("*.part"))


@pytest.fixture(scope="session")
def local_run(pipeline_inputs: dict[str, Path]) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = pipeline_inputs["root"] / "local_out"
    proc = subprocess.run(run_args(pipeline_inputs, pipeline_inputs["mixed"], out),
                          capture_output=True, text=True, env=_env(pipeline_inputs), timeout=900)
    return out, proc


def test_run_end_to_end_with_a_bad_record(pipeline_inputs: dict[str, Path],
                                          local_run: tuple[Path, Any]) -> None:
    out, proc = local_run
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the bad record fails the run ...
    names = _names(pipeline_inputs["mixed"])
    assert len(names) == N_TARGETS
    check_complete(out, names)  # ... but alone
    assert f"{N_TARGETS}/{N_TARGETS} targets done" in proc.stdout
    assert f"report: {out / 'report.html'}" in proc.stdout
    check_plots_and_report(out, names)
    assert "broken" in proc.stdout and "not amino-acid letters" in proc.stdout
    # the largest search's peak memory: in OUT/timings.json and the summary, naming its target
    peaks = {n: json.loads((out / n / "timings.json").read_text())["search_max_rss_mib"]
             for n in names}
    assert json.loads((out / "timings.json").read_text())["search_max_rss_mib"] == max(
        peaks.values()) > 0
    named = re.search(r"largest search: [0-9.]+ [MG]iB of memory at its peak \((\S+);",
                      proc.stdout)
    assert named and peaks[named.group(1)] == max(peaks.values()), proc.stdout
    status = subprocess.run([PARAFOLD, "status", str(out)], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"done {N_TARGETS}" in status.stdout and "broken" in status.stdout
    assert "not running" in status.stdout
    with Ledger(out, readonly=True) as ledger:
        events = ledger.events()
    assert sorted(e.target for e in events if e.kind == "search") == sorted(names)
    assert sorted(e.target for e in events if e.kind == "predict" and e.ok) == sorted(names)

    # A rerun finds everything finished and redoes nothing.
    before = {n: (out / n / "ranked_0.pdb").stat().st_mtime_ns for n in names}
    again = subprocess.run(run_args(pipeline_inputs, pipeline_inputs["good"], out),
                           capture_output=True, text=True, env=_env(pipeline_inputs), timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {n: (out / n / "ranked_0.pdb").stat().st_mtime_ns for n in names} == before
    with Ledger(out, readonly=True) as ledger:
        assert len(ledger.events()) == len(events)


def _first_progress(out: Path, proc: subprocess.Popen[str], states: set[State],
                    timeout_s: float) -> None:
    """Wait until a target reaches one of `states`: then the run is mid-way."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if (out / LEDGER_FILE).exists():
            try:
                with Ledger(out, readonly=True) as ledger:
                    counts = ledger.counts()
            except (sqlite3.Error, Exception):  # the schema may not be there yet
                counts = {}
            if any(counts.get(state) for state in states):
                return
        time.sleep(0.05)
    raise AssertionError(f"no target reached {states} in time")


@pytest.mark.parametrize("kill_at", ["features_ready", "predicting"])
def test_sigkill_mid_run_then_rerun(pipeline_inputs: dict[str, Path], kill_at: str) -> None:
    out = pipeline_inputs["root"] / f"killed_at_{kill_at}"
    args = run_args(pipeline_inputs, pipeline_inputs["good"], out)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(pipeline_inputs))
    try:
        _first_progress(out, proc, {State(kill_at), State.DONE}, 600)
        # While it is live, a second run on the same OUT is refused, clearly.
        second = subprocess.run(args, capture_output=True, text=True, env=_env(pipeline_inputs), timeout=120)
        assert second.returncode == 3, second.stdout + second.stderr
        assert "in use by a live parafold run" in second.stderr
        assert f"PID {proc.pid}" in second.stderr
        # `parafold status` reads the ledger while the run writes it.
        status = subprocess.run([PARAFOLD, "status", str(out)], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode == 0 and f"running (PID {proc.pid}" in status.stdout, \
            status.stdout + status.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with Ledger(out, readonly=True) as ledger:
        done_before = {r.name for r in ledger.targets(State.DONE)}
    stamps = {n: (out / n / "ranked_0.pdb").stat().st_mtime_ns for n in done_before}

    rerun = subprocess.run(args, capture_output=True, text=True, env=_env(pipeline_inputs), timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    names = _names(pipeline_inputs["good"])
    check_complete(out, names)
    assert {n: (out / n / "ranked_0.pdb").stat().st_mtime_ns for n in done_before} == stamps
    with Ledger(out, readonly=True) as ledger:
        ok_predicts = [e.target for e in ledger.events("predict") if e.ok]
        runs = ledger.runs()
    # Done exactly once: never predicted twice (a prediction that finished in the instant
    # before the kill is found on disk and not redone, so it may have no event at all).
    assert all(ok_predicts.count(n) <= 1 for n in names), ok_predicts
    assert len(runs) == 2 and runs[0].ended_at is None and runs[1].exit_code == 0


def _signal_while_searching(inputs: dict[str, Path], out: Path,
                            send: Callable[[subprocess.Popen[str]], None], *, timeout: float
                            ) -> tuple[int, str, set[str], float]:
    """Start `run` on the good FASTA in its own session, `send` it a signal once a target is
    searching; its exit code, output, the targets searching just before, and the seconds
    from the signal to its end."""
    proc = subprocess.Popen(run_args(inputs, inputs["good"], out), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(inputs),
                            start_new_session=True)
    try:
        _first_progress(out, proc, {State.SEARCHING}, 600)
        with Ledger(out, readonly=True) as ledger:
            in_flight = {r.name for r in ledger.targets(State.SEARCHING)}
        send(proc)
        signalled = time.monotonic()
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output, in_flight, time.monotonic() - signalled


def test_sigterm_ends_the_run_like_ctrl_c(pipeline_inputs: dict[str, Path]) -> None:
    """SIGTERM (`kill PID`, Slurm's scancel or time limit) to the run's process alone while
    it searches: the run ends within seconds with 143, the ledger records that end, and no
    worker or search tool is left running (before, the process died on the spot and left the
    run open in the ledger)."""
    out = pipeline_inputs["root"] / "terminated"
    returncode, output, _, waited = _signal_while_searching(
        pipeline_inputs, out, lambda proc: proc.send_signal(signal.SIGTERM), timeout=120)
    assert returncode == 143, output
    assert waited < 20, output
    assert "terminated (SIGTERM); rerun the same command to resume" in output
    assert "Traceback" not in output, output
    with Ledger(out, readonly=True) as ledger:
        (run,) = ledger.runs()
    assert run.exit_code == 143 and run.ended_at is not None
    deadline = time.monotonic() + 10
    while True:  # workers and tools (in their own sessions) gone: none names OUT any more
        left = [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True,
                                                text=True).stdout.splitlines()
                if str(out) in line]
        if not left:
            break
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


def test_sigusr1_drains_the_run_and_a_rerun_finishes_it(pipeline_inputs: dict[str, Path]) -> None:
    """SIGUSR1 to the whole process group (Slurm's `--signal=USR1@SECONDS` reaches every
    process of a job step) while a search runs: no search or batch starts after it, the
    searches in flight finish (their targets are not sent back to the queue), the run ends
    with 75 and says how to resume; the search workers and tools, which ignore SIGUSR1, are
    not killed by it. The rerun finishes every target and searches none a second time."""
    out = pipeline_inputs["root"] / "drained"
    args = run_args(pipeline_inputs, pipeline_inputs["good"], out)
    returncode, output, in_flight, _ = _signal_while_searching(
        pipeline_inputs, out, lambda proc: os.killpg(proc.pid, signal.SIGUSR1), timeout=600)
    assert returncode == 75, output
    assert "stopped early: SIGUSR1: asked to drain" in output, output
    assert "Rerun the same command" in output and "Traceback" not in output, output
    with Ledger(out, readonly=True) as ledger:
        states = {r.name: r.state for r in ledger.targets()}
        searches = ledger.events("search")
    assert in_flight and State.FAILED not in states.values(), states
    assert all(states[n] in (State.FEATURES_READY, State.DONE) for n in in_flight), states
    assert State.QUEUED in states.values(), states  # started nothing after the signal
    rerun = subprocess.run(args, capture_output=True, text=True, env=_env(pipeline_inputs),
                           timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    names = sorted(states)
    check_complete(out, names)
    with Ledger(out, readonly=True) as ledger:
        searched_twice = {e.target for e in ledger.events("search")[len(searches):]} & in_flight
    assert not searched_twice, searched_twice


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def ray_head(pipeline_inputs: dict[str, Path]) -> Any:
    """A Ray head on loopback, started by this test and stopped with it (only it)."""
    import socket

    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats",
         "--include-dashboard", "false", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        env={**_env(pipeline_inputs), "RAY_AUTH_MODE": "disabled"})  # loopback only
    deadline = time.time() + 120
    while True:
        assert head.poll() is None, "ray start failed"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.time() < deadline, "the Ray head did not come up"
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


def _coords(pdb: Path) -> list[tuple[str, float, float, float]]:
    rows = []
    for line in pdb.read_text().splitlines():
        if line.startswith("ATOM"):
            rows.append((line[12:26], float(line[30:38]), float(line[38:46]), float(line[46:54])))
    return rows


def test_ray_engine_matches_local(pipeline_inputs: dict[str, Path],
                                  local_run: tuple[Path, Any], ray_head: str) -> None:
    local_out, _ = local_run
    out = pipeline_inputs["root"] / "ray_out"
    proc = subprocess.run(
        run_args(pipeline_inputs, pipeline_inputs["good"], out, "--engine", "ray",
                 "--address", ray_head),
        capture_output=True, text=True, timeout=900,
        env={**_env(pipeline_inputs), "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = _names(pipeline_inputs["good"])
    check_complete(out, names)
    for name in names:
        ours = sorted(p.relative_to(out / name) for p in (out / name).rglob("*"))
        theirs = sorted(p.relative_to(local_out / name) for p in (local_out / name).rglob("*"))
        assert ours == theirs, name
        a, b = _coords(out / name / "ranked_0.pdb"), _coords(local_out / name / "ranked_0.pdb")
        assert len(a) == len(b) > 0
        assert all(x[0] == y[0] and max(abs(x[i] - y[i]) for i in (1, 2, 3)) <= 1e-4
                   for x, y in zip(a, b, strict=True)), name
    with Ledger(out, readonly=True) as ledger:
        workers = {e.worker for e in ledger.events("predict")}
    assert all(w.startswith("cpu@") for w in workers), workers
