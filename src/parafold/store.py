"""Files that a killed run can never leave half-written, and content keys for the cache.

Every artifact is written to a temporary file beside its destination, flushed to disk and
renamed into place, so a reader sees either nothing or the whole file. Arrays are stored as
`.npz` without pickles, so loading a cached artifact can never execute code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_copy",
    "file_lock",
    "content_key",
    "fingerprint_files",
    "save_arrays",
    "load_arrays",
    "read_json",
]


@contextlib.contextmanager
def atomic_writer(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on clean exit it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are meant to be shared
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


ABANDONED_PART_AGE_S = 3600.0  # no atomic write takes an hour: older ones' writers died


def remove_abandoned_parts(folder: Path | str, *, older_than_s: float = ABANDONED_PART_AGE_S
                           ) -> int:
    """Delete the temporary files of `atomic_writer`s killed in `folder` (`.<name>.<random>
    .part`, older than `older_than_s`: a live writer's is seconds old, so this is safe beside
    other processes writing there); returns how many went."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".part")):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False) and \
                    now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                os.unlink(entry.path)
                removed += 1
    return removed


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def create_json_once(path: Path | str, obj: Any) -> bool:
    """Write `path` only if it does not exist yet, whole, and say whether this call wrote it.
    A hard link of a finished temporary file is created or refused atomically, NFS and Lustre
    included, so of processes racing without a lock exactly one wins (the others then read
    the winner's file). Where hard links are refused, the file is replaced instead."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
    atomic_write_json(tmp, obj)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here: the last writer wins, as before
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
    return True


def atomic_copy(src: Path | str, dst: Path | str, *, link: bool = True) -> None:
    """Copy a file so that `dst` is whole or absent; a hard link when the file system allows
    and `link` (False: a file of its own, which an edit of the other never changes).

    The temporary name is unique per call (threads of one process, or hosts sharing a file
    system, never meet on it), and is removed again if the copy fails.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(8)}.part")
    if link:
        try:
            os.link(src, tmp)  # never overwrites: a taken name raises, and we copy instead
        except OSError:
            link = False
    if not link:
        with open(src, "rb") as source, atomic_writer(dst, "wb") as target:
            shutil.copyfileobj(source, target)
        return
    try:
        os.replace(tmp, dst)
    finally:
        # Gone after a rename, except when `dst` already was a link to the same file: then
        # rename does nothing and leaves `tmp` (POSIX). Also removes it when the rename failed.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` (created if needed); the kernel drops it when the
    holder dies, so a SIGKILLed process never leaves a stale lock. On a file system without
    locks it warns once and goes on unlocked (`filesystems`): every write is atomic anyway,
    so the worst two processes can do there is the same work twice. Yields whether the lock
    is held: only a holder may remove what a killed run left (unlocked, it may be another
    process's work in progress)."""
    from parafold.filesystems import locks_unsupported, warn_without_locks

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as exc:
            if not locks_unsupported(exc):
                raise
            warn_without_locks(path, exc)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def content_key(**parts: Any) -> str:
    """SHA-256 over a canonical JSON of the parts: equal inputs, equal key, across machines."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def fingerprint_files(files: list[Path], *, sample: bool = True) -> str:
    """SHA-256 over (name relative to the common folder, size, and with `sample` a digest of
    the bytes at its start, middle and end) of each file.

    Not over whole contents (databases are terabytes, params hundreds of megabytes) and not
    over modification times: clusters copy databases and params to node-local disks for every
    job, and a copy without `-p` has new times but the same bytes, so it keeps its fingerprint.
    A rebuilt file or a newer release differs in size or in the sampled bytes.
    """
    if not files:
        return ""
    root = Path(os.path.commonpath([f.parent for f in files]))
    digest = hashlib.sha256()
    for f in sorted(files):
        size = f.stat().st_size
        bytes_seen = _sample_digest(f, size) if sample else ""
        digest.update(f"{f.relative_to(root)}\0{size}\0{bytes_seen}\n".encode())
    return digest.hexdigest()


def _sample_digest(path: Path, size: int) -> str:
    """SHA-256 of up to three `_SAMPLE_BYTES` stretches of `path`: its start, middle, end."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2),
                              max(0, size - _SAMPLE_BYTES)}):
            handle.seek(offset)
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


_OBJECT_KEYS = "__object_keys__"
NPZ_DEFLATE_LEVEL = 1  # see save_arrays
_SAMPLE_BYTES = 64 * 1024  # a stretch of a file read for its fingerprint


def _umask() -> int:
    """The process umask without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def save_arrays(path: Path | str, arrays: Mapping[str, Any]) -> None:
    """Write a dict of arrays as a deflated `.npz` that needs no pickle to load.

    Deflate level 1: AlphaFold's features (small integers, mostly zero deletions and empty
    template atoms) shrink 7.5-12x, a 20,000-protein proteome's from ~0.5-1 TB to under 100 GB.
    At L=400 with 10,000 MSA rows that costs 0.2 s more to write and 0.07 s more to read from
    the page cache, ~1% of the 9 s its processing for one model takes; from a shared file
    system, reading 7.5x fewer bytes gains more (`benchmarks/feature_storage.py`). numpy's
    `savez_compressed` uses level 6: 5x slower to write for 15% less. `np.load` reads it as any
    `.npz`, and uncompressed ones written before still load.

    Object arrays of bytes or str (AlphaFold's `domain_name`, `sequence`, template names) are
    stored as fixed-width byte strings and restored to object arrays by `load_arrays`.
    """
    plain: dict[str, np.ndarray] = {}
    object_keys: list[str] = []
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            object_keys.append(key)
            flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.ravel()]
            width = max((len(v) for v in flat), default=1) or 1
            arr = np.array(flat, dtype=f"S{width}").reshape(arr.shape)
        plain[key] = arr
    plain[_OBJECT_KEYS] = np.array(object_keys, dtype=str) if object_keys else np.zeros(0, "U1")
    with atomic_writer(path, "wb") as handle, zipfile.ZipFile(
            handle, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=NPZ_DEFLATE_LEVEL
    ) as archive:
        for key, arr in plain.items():
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def load_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """Read a `.npz` written by `save_arrays` (never unpickles).

    Raises:
        ValueError: the file is no whole `.npz` archive (damaged or cut short). numpy alone
            would call any non-archive "pickled data" and suggest loading it unsafely.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            raise ValueError(f"{path}: not an .npz archive (damaged or cut short)")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files if k != _OBJECT_KEYS}
            object_keys = ([str(k) for k in data[_OBJECT_KEYS]]
                           if _OBJECT_KEYS in data.files else [])
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: damaged .npz archive ({exc})") from exc
    for key in object_keys:
        out[key] = np.array([bytes(v) for v in out[key].ravel()], dtype=object).reshape(
            out[key].shape
        )
    return out
