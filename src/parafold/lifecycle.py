"""Worker processes that never outlive the run that started them."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn, TypeVar

__all__ = ["die_with_parent", "helper_process_init", "exit_interrupted", "EXIT_INTERRUPTED",
           "quiet_interrupt_when_idle", "run_job"]

R = TypeVar("R")
_jobs_running = 0  # in this pool worker process

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


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


def exit_interrupted() -> NoReturn:
    """End this process now, after Ctrl-C, without waiting for threads: a model compile in a
    background thread (~30 s on a GPU) would hold up a normal exit. Everything written is
    already complete (files are renamed into place); the rest is redone on the next run."""
    import contextlib
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


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
