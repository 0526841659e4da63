"""Run one search tool so that it, and everything it starts, dies with the search that ran it.

`run_tool` starts each tool in its own session, so that a timeout can kill the whole group and
no terminal signal reaches it. But when the search worker that started it dies without cleaning
up (SIGKILL, the OOM killer, a crash; workers also die with a killed run), the tool would go on
running, for hours on real databases, beside the rerun's own searches. This guard leads the
session in the tool's place: it asks the kernel for SIGTERM when the thread that started it
ends (PR_SET_PDEATHSIG) and then kills its whole process group; otherwise it waits for the tool
and ends as the tool did (same exit code, or same signal).

Invoked by `run_tool` as `python -S -E tool_guard.py PARENT_PID USAGE_FD CMD [ARGS...]`: it
writes the tool's peak resident memory (KiB) to the open file USAGE_FD. Standard library only,
and no parafold import, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
EXIT_CANNOT_START = 127  # the shell's code for a command that cannot be run


def _kill_group(signum: int = 0, frame: object = None) -> None:
    os.killpg(0, signal.SIGKILL)  # the tool, its children, and this guard


def _die_with_parent(parent: int) -> None:
    import ctypes

    signal.signal(signal.SIGTERM, _kill_group)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the tool may outlive a killed worker
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        _kill_group()


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or not argv[1].isdigit():
        print("usage: tool_guard.py PARENT_PID USAGE_FD CMD [ARGS...]", file=sys.stderr)
        return 2
    if os.getpgrp() != os.getpid():  # lead a group of its own: the kill must hit no one else
        os.setsid()
    _die_with_parent(int(argv[0]))
    usage_fd = int(argv[1])
    os.set_inheritable(usage_fd, False)  # the guard's to write, not the tool's
    try:  # posix_spawn, not subprocess: importing subprocess would double the start-up time
        tool = os.posix_spawnp(argv[2], argv[2:], os.environ)
    except OSError as exc:
        print(f"cannot start {argv[2]}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    _, status, usage = os.wait4(tool, 0)  # EINTR is retried by Python itself (PEP 475)
    # The tool's peak memory, measured here: the guard's own peak, which its caller would
    # see, starts at that of the process that forked it (Linux keeps it across exec).
    os.write(usage_fd, f"{usage.ru_maxrss}\n".encode())
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: end the same way, so the caller sees what the tool got
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # these cannot be handled anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to end the process
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
