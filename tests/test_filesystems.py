"""Shared file systems: the mount of a path, the ledger's journal on a network file system, and
whole runs on a file system without locks (Lustre without `flock`, NFS without a lock
manager), made real for the test by a small LD_PRELOAD library (tests/fakes/nolocks) that
refuses flock and fcntl locks under one folder the way such a mount does."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parafold import filesystems
from parafold.filesystems import LedgerMode, Mount, find_mount, mount_of, parse_mountinfo
from parafold.ledger import Ledger, State
from test_pipeline import PARAFOLD, QUERY_LENGTH, check_complete, jax_cache_home

NO_LOCKS_WARNING = "this file system has no file locks"

MOUNTINFO = textwrap.dedent("""\
    22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw
    30 22 0:40 / /scratch rw,relatime shared:5 - lustre 10.0.0.1@o2ib:/fs rw,localflock
    31 22 0:41 / /home rw - nfs4 nas:/export/home rw,vers=4.2
    32 31 0:42 / /home/ann/local\\040disk rw - xfs /dev/sdb1 rw
    33 22 0:43 / /mnt/remote rw - fuse.sshfs ann@host:/ rw
    34 22 0:44 / /var/lib/containers rw - fuse.fuse-overlayfs fuse-overlayfs rw
    35 22 0:45 / /scratch rw - tmpfs tmpfs rw
    this line is not a mount
    """)


def test_a_path_belongs_to_the_longest_mount_point_that_holds_it(tmp_path: Path) -> None:
    """Nested mounts, an escaped space, a mount over another (the later one counts), and a path
    that does not exist yet (OUT before its first run)."""
    mounts = parse_mountinfo(MOUNTINFO)
    assert len(mounts) == 7 and mounts[3] == Mount("/home/ann/local disk", "xfs")

    def kind(path: str) -> tuple[str, bool]:
        mount = find_mount(mounts, path)
        assert mount is not None
        return mount.fs_type, mount.networked

    assert kind("/home/ann/runs/out") == ("nfs4", True)
    assert kind("/home/ann/local disk/out") == ("xfs", False)
    assert kind("/home/ann/local diskette") == ("nfs4", True)  # a prefix, not a parent
    assert kind("/mnt/remote/x") == ("fuse.sshfs", True)
    assert kind("/var/lib/containers/x") == ("fuse.fuse-overlayfs", False)
    assert kind("/scratch/proj/out") == ("tmpfs", False)  # mounted over the Lustre one
    assert kind("/") == ("ext4", False)
    real = mount_of(tmp_path / "not" / "yet")  # this machine's own table
    assert real is not None and real == mount_of(tmp_path)


def _fake_mount(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fs_type: str) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(f"22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
                     f"40 22 0:50 / {tmp_path.resolve()} rw - {fs_type} server:/x rw\n")
    monkeypatch.setattr(filesystems, "MOUNTINFO", table)


def test_the_ledger_keeps_a_rollback_journal_on_a_network_file_system(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """WAL's shared memory does not reach another host (a `parafold status` on the login
    node), so on NFS the ledger uses a rollback journal, and switches a ledger left in WAL;
    on a local disk it stays in WAL."""
    local = tmp_path / "local"
    with Ledger(local) as ledger:
        assert ledger.mode is LedgerMode.WAL
    assert _journal(local) == "wal"

    out = tmp_path / "nfs"
    out.mkdir()
    with sqlite3.connect(out / "parafold.sqlite") as db:  # left in WAL by an earlier run
        db.execute("PRAGMA journal_mode=WAL")
    _fake_mount(monkeypatch, out, "nfs4")
    with Ledger(out) as ledger:
        assert ledger.mode is LedgerMode.ROLLBACK
        run_id = ledger.begin_run({"x": 1})
        ledger.end_run(run_id, 0)
        assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "truncate"
    assert _journal(out) == "delete"  # out of WAL for good (a rollback mode is not stored)
    assert not (out / "parafold.sqlite-wal").exists()
    with Ledger(out, readonly=True) as reader:
        assert [r.exit_code for r in reader.runs()] == [0]


def _journal(out: Path) -> str:
    with sqlite3.connect(out / "parafold.sqlite") as db:
        return str(db.execute("PRAGMA journal_mode").fetchone()[0])


# --- a file system without locks, for real: LD_PRELOAD=nolocks.so ---


@pytest.fixture(scope="module")
def nolocks_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/fakes/nolocks/nolocks.c built with the system's C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (scripts/setup.sh installs gcc)")
    source = Path(__file__).parent / "fakes" / "nolocks" / "nolocks.c"
    lib = tmp_path_factory.mktemp("nolocks") / "nolocks.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(lib), str(source), "-ldl"],
                   check=True)
    return lib


def _without_locks(lib: Path, prefix: Path, error: str = "ENOSYS") -> dict[str, str]:
    return {**os.environ, "LD_PRELOAD": str(lib), "NOLOCKS_PREFIX": str(prefix.resolve()),
            "NOLOCKS_ERRNO": error, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("error", ["ENOSYS", "ENOLCK"])
def test_locks_go_on_unlocked_where_the_file_system_has_none(
        nolocks_lib: Path, tmp_path: Path, error: str) -> None:
    """Lustre without `flock` answers ENOSYS, NFS without a lock manager ENOLCK: a cache lock,
    the run lock and the ledger then work without locks, with one warning; outside that
    folder locks still lock. Without the fallback each raised (the ledger: "disk I/O error")."""
    shared = tmp_path / "shared"
    shared.mkdir()
    script = textwrap.dedent(f"""
        import fcntl, logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
        from parafold.filesystems import LedgerMode, lock_support
        from parafold.ledger import Ledger, RunLock
        from parafold.store import file_lock
        shared = Path({str(shared)!r})
        support = lock_support(shared)
        print("support", support.flock, support.posix)
        with file_lock(shared / "cache" / ".lock"):
            print("cache lock taken")
        with RunLock(shared), Ledger(shared) as ledger:
            assert ledger.mode is LedgerMode.UNLOCKED, ledger.mode
            ledger.end_run(ledger.begin_run({{}}), 0)
        with Ledger(shared, readonly=True) as ledger:
            print("runs", len(ledger.runs()))
        local = Path({str(tmp_path / "local.lock")!r}).open("w")
        fcntl.flock(local, fcntl.LOCK_EX)
        print("local lock taken")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_without_locks(nolocks_lib, shared, error), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "support False False" in out and "cache lock taken" in out and "runs 1" in out
    assert "local lock taken" in out
    assert out.count(NO_LOCKS_WARNING) == 1, out  # once per mount and process
    reason = "Function not implemented" if error == "ENOSYS" else "No locks available"
    assert reason in out, out
    # a reader who may not write there (someone else's run) probes the ledger it reads: the
    # mount has no locks for it either (taken to have them, its `status` failed on SQLite's)
    reader = textwrap.dedent(f"""
        import tempfile
        from pathlib import Path
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        tempfile.mkstemp = denied
        from parafold.filesystems import lock_support
        support = lock_support(Path({str(shared)!r}))
        print("reader support", support.flock, support.posix)
    """)
    proc = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True,
                          env=_without_locks(nolocks_lib, shared, error), timeout=120)
    assert "reader support False False" in proc.stdout, proc.stdout + proc.stderr


def test_a_run_on_a_file_system_without_locks_finishes(
        nolocks_lib: Path, synthetic_db: Path, tiny_params: Path,
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`parafold run` (real searches, the tiny model) with OUT and its search cache on a mount
    without locks: every target done, the warning said, no traceback; `parafold status` reads
    the ledger there without a warning. Before, the run died on its lock with a traceback."""
    from parafold.inputs import read_targets

    targets = read_targets(synthetic_db / "queries.fasta").targets[:2]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{t.id}\n{t.sequence[:QUERY_LENGTH]}\n" for t in targets))
    shared = tmp_path / "lustre"
    out = shared / "out"
    env = {**_without_locks(nolocks_lib, shared),
           "XDG_CACHE_HOME": str(jax_cache_home(tmp_path_factory))}
    proc = subprocess.run(
        [PARAFOLD, "run", str(fasta), "-o", str(out), "--db-dir", str(synthetic_db),
         "--params-dir", str(tiny_params), "--config", "tiny", "--models", "1",
         "--num-recycle", "0", "--cpus", "2", "--float32", "--max-wait", "1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert NO_LOCKS_WARNING in output and "Traceback" not in output, output
    names = [t.name for t in targets]
    check_complete(out, names)
    with Ledger(out, readonly=True) as ledger:
        assert all(ledger.get(n).state is State.DONE for n in names)  # type: ignore[union-attr]
    status = subprocess.run([PARAFOLD, "status", str(out)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "2/2 done" in status.stdout and NO_LOCKS_WARNING not in status.stderr
