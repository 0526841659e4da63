"""What the file system under a path offers parafold: file locks, and one host or many.

HPC sites keep OUT, the search cache and the compile cache on shared file systems (NFS,
Lustre, GPFS, BeeGFS, ...). Two things differ there from a local disk:

- **Locks may be missing.** Lustre mounted without `flock`, or NFS without a lock manager,
  answers `flock` and `fcntl` locks with ENOSYS, ENOLCK or EOPNOTSUPP. parafold's locks only
  keep two processes from doing the same work at once (a cache entry, a run on one OUT), so on
  such a mount it goes on without them, after one warning that names the mount and the fix.
- **SQLite's WAL mode needs one host.** WAL keeps its index in shared memory, so every process
  using the database must be on the same machine; a `parafold status` from a login node would
  read a run's ledger wrongly. On a network file system the ledger uses a rollback journal
  (SQLite's supported mode there), and no locking at all where the mount has no locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = ["LedgerMode", "Mount", "find_mount", "ledger_mode", "locks_unsupported", "lock_support",
           "mount_of", "warn_without_locks"]

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
# File systems whose files other hosts share (a FUSE mount counts, but for the local overlays).
NETWORK_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
    "panfs", "wekafs", "9p", "afs", "orangefs", "pvfs2", "ocfs2", "gfs2", "cvfs", "quobyte"})
LOCAL_FUSE_TYPES = frozenset({"fuse.fuse-overlayfs", "fuse.lxcfs", "fuse.squashfuse"})
# How a mount without locks answers a lock request.
_NO_LOCK_ERRNOS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


@dataclass(frozen=True, slots=True)
class Mount:
    """The mount that holds a path: where it is mounted and its type (`mountinfo`'s)."""

    point: str
    fs_type: str

    @property
    def networked(self) -> bool:
        """Whether other hosts may open the same files (so no shared memory across users)."""
        kind = self.fs_type
        return kind in NETWORK_TYPES or (kind.startswith("fuse.") and kind not in LOCAL_FUSE_TYPES)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts in a `/proc/<pid>/mountinfo` text (malformed lines are skipped)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) <= sep + 1 or len(fields) < 5:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[sep + 1]))
    return mounts


def _existing(path: Path) -> Path:
    """`path` resolved, or its nearest existing folder (OUT may not exist yet)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path.resolve()


def find_mount(mounts: list[Mount], path: str) -> Mount | None:
    """The mount holding the absolute, resolved `path`: the longest mount point above it,
    the last mounted of equals (a mount over another hides it)."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.point.rstrip("/") or "/"
        inside = point == "/" or path == point or path.startswith(point + "/")
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = mount
    return best


def mount_of(path: Path | str) -> Mount | None:
    """The mount holding `path` (or its nearest existing folder), or None where the mount
    table cannot be read (not Linux)."""
    try:
        table = MOUNTINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return find_mount(parse_mountinfo(table), str(_existing(Path(path))))


def locks_unsupported(exc: BaseException) -> bool:
    """Whether `exc`, from `flock` or `fcntl`, says the file system has no locks at all (not
    that someone else holds one)."""
    return isinstance(exc, OSError) and exc.errno in _NO_LOCK_ERRNOS


_warned: set[str] = set()


def warn_without_locks(path: Path | str, exc: OSError) -> None:
    """Say once per mount that parafold goes on unlocked there, and how to get locks back."""
    mount = mount_of(path)
    where = f"{mount.point} ({mount.fs_type})" if mount else str(Path(path).parent)
    if where in _warned:
        return
    _warned.add(where)
    log.warning(
        "%s: this file system has no file locks (%s, locking %s); parafold goes on without "
        "them. Make sure no other parafold process uses the same output or cache folder at "
        "once. Lustre needs the `flock` mount option, NFS a running lock manager (not "
        "`nolock`).", where, exc.strerror or exc, path)


@dataclass(frozen=True, slots=True)
class LockSupport:
    """Which lock calls a folder's file system takes."""

    flock: bool
    posix: bool  # fcntl byte-range locks: what SQLite uses
    error: OSError | None = None


_support: dict[str, LockSupport] = {}


def lock_support(folder: Path | str) -> LockSupport:
    """Try both kinds of lock on a scratch file in `folder` (once per folder and process). A
    folder that cannot be written (a reader of someone else's run) is probed with shared
    locks on a file already there; one with no file either is taken to have locks."""
    key = str(_existing(Path(folder)))
    if key in _support:
        return _support[key]
    name: str | None = None
    try:
        fd, name = tempfile.mkstemp(dir=key, prefix=".parafold-lockprobe-")
        mode = fcntl.LOCK_EX
    except OSError:
        fd, mode = _open_existing(Path(key)), fcntl.LOCK_SH
        if fd is None:
            return LockSupport(True, True)
    results: dict[str, OSError | None] = {}
    try:
        for kind, lock, unlock in (("flock", fcntl.flock, fcntl.flock),
                                   ("posix", fcntl.lockf, fcntl.lockf)):
            try:
                lock(fd, mode | fcntl.LOCK_NB)
                unlock(fd, fcntl.LOCK_UN)
                results[kind] = None
            except OSError as exc:
                results[kind] = exc
    finally:
        os.close(fd)
        if name is not None:
            with contextlib.suppress(OSError):
                os.unlink(name)
    flock_error, posix_error = results["flock"], results["posix"]
    support = LockSupport(
        flock=flock_error is None or not locks_unsupported(flock_error),
        posix=posix_error is None or not locks_unsupported(posix_error),
        error=posix_error or flock_error)
    _support[key] = support
    return support


def _open_existing(folder: Path) -> int | None:
    """A file of `folder` opened for reading (the run ledger first), to probe for locks."""
    candidates = [folder / "parafold.sqlite"]
    with contextlib.suppress(OSError):
        candidates += sorted(p for p in folder.iterdir() if p.is_file())[:20]
    for path in candidates:
        with contextlib.suppress(OSError):
            return os.open(path, os.O_RDONLY)
    return None


class LedgerMode(Enum):
    """How the run ledger uses SQLite on a folder's file system."""

    WAL = "wal"  # local disk: readers never wait for the writer
    ROLLBACK = "rollback"  # network file system: a rollback journal under fcntl locks
    UNLOCKED = "unlocked"  # no locks at all: rollback journal, SQLite's no-lock VFS


def ledger_mode(folder: Path | str) -> LedgerMode:
    """The ledger's SQLite mode for `folder` (see the module docstring)."""
    if not lock_support(folder).posix:
        return LedgerMode.UNLOCKED
    mount = mount_of(folder)
    return LedgerMode.ROLLBACK if mount is not None and mount.networked else LedgerMode.WAL
