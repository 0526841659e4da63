"""The project's exception hierarchy: one base, one branch per kind of failure.

Callers catch `PipelineError` at the per-target boundary and record the message in the ledger;
everything else is a bug and should surface. Every error pickles (it may be raised in a worker
process): one whose constructor takes more than the message says how to rebuild it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "PipelineError",
    "InputError",
    "ToolError",
    "ToolNotFoundError",
    "DatabaseNotFoundError",
    "ToolFailedError",
    "ToolKilledError",
    "ToolTimeoutError",
    "FeatureError",
    "ParamsError",
    "InferenceError",
    "GpuOutOfMemoryError",
    "OutputError",
    "SchedulerError",
    "RunLockedError",
    "StorageFullError",
    "is_storage_full",
    "was_killed",
    "storage_full_advice",
]


class PipelineError(Exception):
    """Base of every error parafold raises on purpose."""


class InputError(PipelineError):
    """A record, file or option given by the user is unusable."""


class ToolError(PipelineError):
    """An external search program could not do its job."""


class ToolNotFoundError(ToolError):
    """The binary is not on PATH (or where the settings say)."""


class DatabaseNotFoundError(ToolError):
    """A database the chosen preset needs is missing."""


class ToolFailedError(ToolError):
    """The program exited non-zero; `stderr_tail` holds the end of what it said."""

    def __init__(self, cmd: list[str], returncode: int, stderr_tail: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        name = cmd[0] if cmd else "?"
        super().__init__(f"{name} exited with code {returncode}: {stderr_tail.strip()[-2000:]}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.cmd, self.returncode, self.stderr_tail), self.__dict__


class ToolKilledError(ToolFailedError):
    """The program died of SIGKILL that parafold did not send: most often the kernel's (or the
    job's cgroup's) out-of-memory killer. Searches run side by side share the node's memory, so
    such a search is retried alone (`search.msa_search`, `engine.scheduler`)."""

    def __init__(self, cmd: list[str], returncode: int, stderr_tail: str) -> None:
        super().__init__(cmd, returncode, stderr_tail)
        name = cmd[0] if cmd else "?"
        self.args = (f"{name} was killed (SIGKILL), most likely for want of memory: the "
                     f"out-of-memory killer of the node or of the job's cgroup. "
                     f"{stderr_tail.strip()[-2000:]}".rstrip(),)


class ToolTimeoutError(ToolError, TimeoutError):
    """The program ran past its timeout and was killed with its process group."""

    def __init__(self, cmd: list[str], timeout_s: float) -> None:
        self.cmd = list(cmd)
        self.timeout_s = timeout_s
        name = cmd[0] if cmd else "?"
        super().__init__(f"{name} ran past its timeout of {timeout_s:g} s and was killed")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.cmd, self.timeout_s), self.__dict__


class FeatureError(PipelineError):
    """Search outputs could not be turned into model features."""


class ParamsError(PipelineError):
    """Model parameters are missing or malformed."""


class InferenceError(PipelineError):
    """The model failed on one target."""


class GpuOutOfMemoryError(InferenceError):
    """The accelerator ran out of memory; raised only when XLA said so."""


class OutputError(PipelineError):
    """A target's output files could not be made (e.g. copied from an identical target)."""


class SchedulerError(PipelineError):
    """The engine could not place or finish work."""


class RunLockedError(SchedulerError):
    """Another live process holds this output directory."""


class StorageFullError(PipelineError):
    """A file system parafold writes to is full, or the user's quota on it is spent: no
    target's fault, so the run stops and keeps what it finished; a rerun after freeing space
    resumes."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = tuple(os.strerror(code) for code in _FULL_ERRNOS)  # as a tool's stderr says it
_SQLITE_FULL = 13


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and the exceptions it came from (its cause, its context, a Ray task's own)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        cause = getattr(exc, "cause", None)  # Ray wraps a task's own exception
        exc = (cause if isinstance(cause, BaseException) else None) or exc.__cause__ \
            or exc.__context__


def is_storage_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it came from, says a disk is full or a quota spent: an
    OSError with ENOSPC or EDQUOT, SQLite's "database or disk is full", or a search tool that
    said so and exited."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if isinstance(e, ToolFailedError) and any(w in e.stderr_tail for w in _FULL_WORDS):
            return True
    return False


def was_killed(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it came from, is a search tool killed by SIGKILL
    (`ToolKilledError`: most likely out of memory)."""
    return any(isinstance(e, ToolKilledError) for e in _chain(exc))


def storage_full_advice(out: object) -> str:
    """What to do after a disk full or a quota spent stopped the work in `out`."""
    return (f"Free space (or raise your quota) where parafold writes ({out}, the search cache, "
            "TMPDIR) and rerun the same command: finished work is kept, the rest resumes.")
