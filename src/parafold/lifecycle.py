"""How parafold's processes end: workers that never outlive the run that started them, and
Ctrl-C or SIGTERM ending a command within seconds, with the shell's exit codes."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

__all__ = ["die_with_parent", "helper_process_init", "exit_interrupted", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED", "EXIT_STOPPED_EARLY", "Terminated", "stop_on_sigterm",
           "interrupted_code", "quiet_interrupt_when_idle", "run_job", "drain_on_sigusr1",
           "drain_requested", "DRAIN_ADVICE", "starting_processes"]

R = TypeVar("R")
_jobs_running = 0  # in this pool worker process

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # and by SIGTERM (128 + 15)
# The work stopped early and a rerun resumes it (sysexits' EX_TEMPFAIL: try again later): a
# disk full or a quota spent, or a drain asked for with SIGUSR1 (`drain_on_sigusr1`).
EXIT_STOPPED_EARLY = 75
DRAIN_SIGNAL_NAME = "SIGUSR1"
DRAIN_ADVICE = ("Rerun the same command (a new job) to resume: what was finished, in flight "
                "included, is kept.")
_drain: list[str] = []  # why this process was asked to drain (set by the signal handler)
_drain_installed: list[bool] = []  # once per process (commands run in-process in tests)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`kill PID`, Slurm's scancel or time limit, a container stopping): the
    same way out as Ctrl-C, with its own exit code."""


def stop_on_sigterm() -> None:
    """Make SIGTERM end a command the way Ctrl-C does, in the main thread: the processes
    this one started get SIGTERM too and end at once, quietly, even one still starting up
    (a search's tool dies with it: `search.tool_guard`; every file is renamed into place),
    then `Terminated` is raised here, so the ledger records the run's end and the exit is
    quick, well inside Slurm's 30 s before SIGKILL. Without it, SIGTERM ended this process
    on the spot and left the run open in the ledger. A SIGTERM ignored stays ignored."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        global _sigterm_deferred
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends it at once
        if _starting_processes:
            _sigterm_deferred = True  # acted on when the process is started
            return
        _terminate()

    signal.signal(signal.SIGTERM, on_sigterm)


def _terminate() -> NoReturn:
    import multiprocessing
    import signal

    for child in multiprocessing.active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
    raise Terminated


_starting_processes = 0  # main thread only: how deep in `starting_processes`
_sigterm_deferred = False


@contextlib.contextmanager
def starting_processes() -> Iterator[None]:
    """Around code that may start processes (a process pool's `submit`): a SIGTERM arriving
    meanwhile is acted on right after it. Raised halfway through writing a spawned child's
    start-up data, `Terminated` left the child reading half of it, and its EOFError traceback
    on the terminal. Only the main thread, where the signal's handler runs, counts."""
    global _starting_processes, _sigterm_deferred
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _starting_processes += 1
    try:
        yield
    finally:
        _starting_processes -= 1
        if not _starting_processes and _sigterm_deferred:
            _sigterm_deferred = False
            _terminate()


def drain_on_sigusr1() -> None:
    """Make SIGUSR1 ask a run to drain: start nothing more, finish the searches and
    predictions in flight, then end with exit code 75 (`Scheduler`). Slurm sends it ahead of
    a job's time limit with `#SBATCH --signal=B:USR1@SECONDS`, so an hours-long search is not
    lost to the SIGTERM at the limit.

    Call it in the main thread before any other thread or process starts. SIGUSR1 is then
    blocked, and a thread of its own waits for it: the block is inherited by every thread and
    process started after, search tools included, so a SIGUSR1 sent to the whole job step
    (`--signal=USR1@...` without `B:`) is not delivered to them. Unblocked there, it would
    kill them: a process that does not handle SIGUSR1 dies of it. Threads started before
    (numpy's BLAS pool) may take it instead; then the handler runs in the main thread, so a
    command's main thread must not wait without a timeout (the run's loop ticks each second)."""
    import signal

    if threading.current_thread() is not threading.main_thread() or _drain_installed:
        return
    _drain_installed.append(True)

    def note(*_: object) -> None:
        if not _drain:
            _drain.append(f"{DRAIN_SIGNAL_NAME}: asked to drain")

    def wait() -> None:
        signal.sigwait({signal.SIGUSR1})
        note()

    signal.signal(signal.SIGUSR1, note)  # for a thread started before the block, if any
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    threading.Thread(target=wait, name="drain-signal", daemon=True).start()


def drain_requested() -> str | None:
    """Why this process was asked to drain, or None."""
    return _drain[0] if _drain else None


def interrupted_code(exc: BaseException) -> int:
    """The exit code for a run ended by `exc` (Ctrl-C or SIGTERM)."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the process that started it dies.

    A SIGKILLed run must not leave workers behind that go on writing into OUT while the
    rerun works there.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def helper_process_init() -> None:
    """A spawned CPU helper (feature processing, file writing, MMseqs2 features): dead with
    its parent, off the accelerator, single-threaded (many run at once), and deaf to Ctrl-C.
    Ctrl-C reaches the whole process group; the parent gets it too and stops its helpers (a
    helper interrupted mid-task would break the pool the parent is shutting down)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENMM_CPU_THREADS", "1")  # relaxation (`parafold.relax`)


def exit_interrupted(code: int = EXIT_INTERRUPTED) -> NoReturn:
    """End this process now, after Ctrl-C, without waiting for threads: a model compile in a
    background thread (~30 s on a GPU) would hold up a normal exit. Everything written is
    already complete (files are renamed into place); the rest is redone on the next run."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    os._exit(code)


def quiet_interrupt_when_idle() -> None:
    """Install in a pool worker process: Ctrl-C reaches the whole process group, so an idle
    worker, blocked on the pool's queue, would die with a traceback of multiprocessing's
    internals on the user's terminal. Idle, it now ends quietly; inside a job (`run_job`)
    Ctrl-C is still a KeyboardInterrupt, which a search uses to kill its tool's process group
    (the tool runs in its own session and gets no terminal signal). A worker whose parent
    ignores SIGINT (a background job of a script) keeps ignoring it."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return

    def on_interrupt(signum: int, frame: object) -> None:
        if _jobs_running:
            raise KeyboardInterrupt
        exit_interrupted()

    signal.signal(signal.SIGINT, on_interrupt)


def run_job(fn: Callable[..., R], *args: object) -> R:
    """Run a pool job marked as running: Ctrl-C interrupts it instead of ending the process
    (see `quiet_interrupt_when_idle`)."""
    global _jobs_running
    _jobs_running += 1
    try:
        return fn(*args)
    finally:
        _jobs_running -= 1
