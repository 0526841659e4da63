"""Engines: jobs run where they should, errors come back through handles, workers die with
their parent, and GPUs are found without jax."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parafold.engine import Resources, make_executor
from parafold.engine.base import detect_gpus, parse_gpus
from parafold.errors import InputError


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _boom(x: int) -> int:
    raise InputError(f"bad {x}")


def test_parse_gpus() -> None:
    assert parse_gpus("all") is None and parse_gpus(None) is None
    assert parse_gpus("none") == () and parse_gpus("") == ()
    assert parse_gpus("0, 1") == ("0", "1")
    with pytest.raises(InputError):
        parse_gpus("0,0")


def test_detect_gpus_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_gpus() == ()


def test_resources_are_checked() -> None:
    with pytest.raises(InputError):
        Resources(cpus=-1)
    with pytest.raises(InputError):
        make_executor("slurm", cpus=1)


@pytest.mark.parametrize("engine", ["inline", "local"])
def test_submit_runs_jobs_and_returns_errors(engine: str) -> None:
    with make_executor(engine, cpus=2, gpus=()) as ex:
        handles = [ex.submit(_pid_and_square, i, resources=Resources(cpus=1)) for i in range(4)]
        results = [h.result(timeout=120) for h in handles]
        assert [sq for _, sq in results] == [0, 1, 4, 9]
        pids = {pid for pid, _ in results}
        assert (pids == {os.getpid()}) == (engine == "inline")
        bad = ex.submit(_boom, 7, resources=Resources())
        with pytest.raises(InputError, match="bad 7"):
            bad.result(timeout=120)
        assert ex.cpu_capacity() >= 1


_PRIVATE_RAY = textwrap.dedent("""
    import signal
    from parafold.engine import Resources, make_executor
    from parafold.lifecycle import stop_on_sigterm
    from tests.test_engine import _pid_and_square
    stop_on_sigterm()  # as the CLI does first
    ours = signal.getsignal(signal.SIGTERM)
    with make_executor("ray", cpus=1, gpus=()) as ex:
        # ray.init installs its own (exit 15, no message, exit 2 in the ledger): ours stays
        print("SIGTERM KEPT", signal.getsignal(signal.SIGTERM) is ours)
        _, square = ex.submit(_pid_and_square, 3, resources=Resources(cpus=1)).result(timeout=300)
        print("RESULT", square, ex.cpu_capacity())
""")


def test_ray_without_an_address_starts_its_own_even_where_another_is_named() -> None:
    """`--engine ray` without `--address` is a private Ray: Ray itself would join the cluster
    in RAY_ADDRESS (or the one an earlier `ray start` noted in /tmp/ray) and then refuse our
    CPU count, or run the jobs on somebody else's cluster. Starting it keeps our SIGTERM
    handler (a time limit ends the run with 143, its work kept)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_ADDRESS": "192.0.2.1:6379"}  # TEST-NET: nothing answers there
    proc = subprocess.run([sys.executable, "-c", _PRIVATE_RAY], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 9 1" in proc.stdout, proc.stdout
    assert "SIGTERM KEPT True" in proc.stdout, proc.stdout


def test_a_ray_cluster_that_is_not_there_is_told_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray itself retries a gone cluster for minutes; a closed port is named in seconds, for
    HOST:PORT and for `auto` (here through RAY_ADDRESS, as Ray looks it up)."""
    import socket

    from parafold.errors import SchedulerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the test connects (Ray may write
        # 127.0.0.1 as this node's own address)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    for address in (f"127.0.0.1:{port}", "auto"):
        started = time.monotonic()
        with pytest.raises(SchedulerError, match=f"nothing answers at [^ ]+:{port} "):
            make_executor("ray", address=address, cpus=1)
        assert time.monotonic() - started < 30, address


_PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from parafold.engine import Resources, make_executor
    from tests.test_engine import _write_pid_and_sleep
    ex = make_executor("local", cpus=1, gpus=())
    ex.submit(_write_pid_and_sleep, sys.argv[1], resources=Resources())
    time.sleep(600)
""")


def _write_pid_and_sleep(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead for our purpose
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_local_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(pid_file)], cwd=root)
    try:
        deadline = time.time() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline, "worker never started"
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert _alive(worker)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 30
    while _alive(worker):
        assert time.time() < deadline, "worker outlived its SIGKILLed parent"
        time.sleep(0.1)


def _sleep_after_writing_pid(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


def test_ctrl_c_interrupts_a_running_job_and_ends_idle_workers_quietly(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C reaches every process of the group. A worker running a search must still get a
    KeyboardInterrupt (that is how a search kills its tool, which runs in its own session); an
    idle worker used to die with a traceback of multiprocessing's queue internals."""
    pid_file = tmp_path / "busy.pid"
    ex = make_executor("local", cpus=2, gpus=())
    with ex:
        busy = ex.submit(_sleep_after_writing_pid, str(pid_file), resources=Resources())
        deadline = time.time() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline, "the job never started"
            time.sleep(0.1)
        busy_pid = int(pid_file.read_text())
        idle_pid, _ = ex.submit(_pid_and_square, 3, resources=Resources()).result(timeout=120)
        assert idle_pid != busy_pid
        os.kill(busy_pid, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            busy.result(timeout=30)
        assert _alive(busy_pid)  # interrupted its job, not killed
        for pid in (idle_pid, busy_pid):  # both idle now
            os.kill(pid, signal.SIGINT)
        deadline = time.time() + 30
        while _alive(idle_pid) or _alive(busy_pid):
            assert time.time() < deadline, "an idle worker ignored Ctrl-C"
            time.sleep(0.1)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_sigterm_while_processes_start_is_acted_on_after_they_have(tmp_path: Path) -> None:
    """SIGTERM raised `Terminated` wherever the main thread was, once halfway through a pool
    writing a spawned child's start-up data: the child then printed an EOFError traceback.
    Inside `starting_processes` the signal waits until the processes are started; then the
    run's children are ended and `Terminated` is raised as before."""
    script = textwrap.dedent("""
        import concurrent.futures as cf, multiprocessing, os, signal, sys, time
        from parafold.lifecycle import Terminated, starting_processes, stop_on_sigterm

        stop_on_sigterm()
        pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            with starting_processes():
                os.kill(os.getpid(), signal.SIGTERM)  # arrives "while" the pool starts
                future = pool.submit(time.sleep, 60)
                print("started", flush=True)
        except Terminated:
            print("terminated after", flush=True)
            time.sleep(1)
            print("children left:", len(multiprocessing.active_children()), flush=True)
            sys.exit(0)
        print("not terminated", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.stdout.splitlines()[:2] == ["started", "terminated after"], (
        proc.stdout + proc.stderr)
    assert "children left: 0" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


_TOKEN_ORDER = """
import importlib.abc, os, sys
seen = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" and "mode" not in seen:
            seen["mode"] = os.environ.get("RAY_AUTH_MODE")
        return None

sys.meta_path.insert(0, Watch())
import parafold.engine.ray_engine as ray_engine
ray_engine._unreachable = lambda address: "nothing listens there"
try:
    ray_engine.RayExecutor(address="127.0.0.1:1")
except Exception:
    pass
print("mode when ray was imported:", seen.get("mode"))
"""


def test_the_token_is_switched_on_before_ray_is_imported(tmp_path: Path) -> None:
    """Ray reads RAY_AUTH_MODE when it is imported: joining a cluster that uses tokens (the
    default of `ray start`) with the token at hand set it too late, and failed."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", _TOKEN_ORDER], capture_output=True, text=True,
                          env={**env, "HOME": str(home)}, timeout=120)
    assert "mode when ray was imported: token" in proc.stdout, proc.stdout + proc.stderr
