"""Worker processes that never outlive the run that started them."""

from __future__ import annotations

import os
from typing import NoReturn

__all__ = ["die_with_parent", "helper_process_init", "exit_interrupted", "EXIT_INTERRUPTED"]

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
