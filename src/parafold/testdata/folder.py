"""A database folder that is whole or absent: built beside its destination, renamed in.

Readers (and a second build) never see a half-written set: the build runs in
`.OUT.partial-<pid>` next to OUT under an exclusive lock, and only a finished folder, marker
included, takes OUT's place. Temporary folders of killed builds are removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from parafold.store import file_lock

__all__ = ["locked", "staged_folder", "is_replaceable"]


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Exclusive lock for building `out`, so concurrent builds (test workers) take turns."""
    with file_lock(out.parent / f".{out.name}.lock"):
        yield


def is_replaceable(out: Path, ours: tuple[str, ...]) -> bool:
    """Only a missing or empty folder, or one holding one of the files in `ours`, is replaced."""
    if not out.exists():
        return True
    if not out.is_dir():
        return False
    return not any(out.iterdir()) or any((out / name).exists() for name in ours)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    for kind in ("partial", "old"):
        for tmp in out.parent.glob(f".{out.name}.{kind}-*"):
            if not _pid_alive(tmp.name.rsplit("-", 1)[-1]):
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """An empty folder to build in; on clean exit it replaces `out`, on error it is deleted.

    Call under `locked(out)`.
    """
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
