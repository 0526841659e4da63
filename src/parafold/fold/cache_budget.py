"""A size bound for the compilation cache folder: the least recently used entries go first.

JAX's persistent cache never deletes anything by itself (its own bound wants a lock file per
folder and an access-time file beside every entry, and fails on entries written without one),
and the default folder is in the user's home, where HPC quotas are small. Every new JAX
release, model config or GPU adds a set of executables; old sets are never read again.

A fold worker prunes the folder when it starts (`ModelRunner`): JAX's entries (`*-cache`) and
serialized executables (`executables/*.bin`) are counted, and while they exceed the bound the
least recently used go, down to `_KEEP` of it, so the next starts find room and prune nothing.
Recent use is the later of a file's access and modification times: the executable cache
touches a file it loads; JAX's entries are read without a touch, so their access time counts,
which Linux updates at most daily (relatime) or never (noatime: then oldest first). Workers
sharing the folder may prune at once: a file another removed first is skipped, and a process
that reads an entry being removed still has it (POSIX), or compiles again. An executable's
half-written file left by a killed worker (`executables/.*.part`, a few hundred MB) is removed
once it is an hour old: a live write finishes in seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CacheEntry", "cache_entries", "prune_compile_cache"]

log = logging.getLogger(__name__)

_KEEP = 0.8  # a prune leaves the folder at this fraction of the bound
_PATTERNS = ("*-cache", "executables/*.bin")  # JAX's entries, then ours (`fold.exec_cache`)
_PARTIAL = "executables/.*.part"  # `store.atomic_writer`'s temporary files
_PARTIAL_STALE_S = 3600.0


@dataclass(frozen=True, slots=True)
class CacheEntry:
    path: Path
    size: int
    last_used: float


def cache_entries(folder: Path) -> list[CacheEntry]:
    """The folder's cache files, least recently used first (other files are not ours)."""
    entries = []
    for pattern in _PATTERNS:
        for path in Path(folder).glob(pattern):
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile
                continue
            entries.append(CacheEntry(path, stat.st_size, max(stat.st_atime, stat.st_mtime)))
    return sorted(entries, key=lambda e: (e.last_used, str(e.path)))


def prune_compile_cache(folder: Path | None, max_bytes: int | None) -> int:
    """Remove least recently used entries while the folder holds more than `max_bytes`, down
    to `_KEEP` of it; returns the bytes removed. None for either: nothing to do."""
    if folder is None or max_bytes is None or not Path(folder).is_dir():
        return 0
    _remove_stale_partials(Path(folder))
    entries = cache_entries(Path(folder))
    total = sum(e.size for e in entries)
    if total <= max_bytes:
        return 0
    target = int(max_bytes * _KEEP)
    removed = count = 0
    for entry in entries:
        if total - removed <= target:
            break
        try:
            entry.path.unlink(missing_ok=True)  # missing: another worker pruned it
        except OSError as exc:
            log.warning("compilation cache: cannot remove %s: %s", entry.path, exc)
            continue
        removed += entry.size
        count += 1
    log.info("compilation cache %s: %.1f GB over its bound of %.1f GB; removed the %d least "
             "recently used entries (%.1f GB)", folder, total / 1e9, max_bytes / 1e9, count,
             removed / 1e9)
    return removed


def _remove_stale_partials(folder: Path) -> None:
    """Half-written executables of killed workers: never entries, never finished."""
    cutoff = time.time() - _PARTIAL_STALE_S
    for path in folder.glob(_PARTIAL):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # removed by another worker, or not ours to remove
            continue
