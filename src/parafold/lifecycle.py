"""Worker processes that never outlive the run that started them."""

from __future__ import annotations

import os

__all__ = ["die_with_parent"]


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
