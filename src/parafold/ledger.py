"""The run ledger: one SQLite file in OUT that says where every target stands, and the run lock.

The ledger is the run's memory across processes and crashes. The pipeline moves each target
through explicit states (queued -> searching -> features_ready -> predicting -> done, or
failed with a reason) and logs each piece of work as an event (who ran what, when) for reports.
WAL mode lets `parafold status` read while a run writes; every write is one short transaction,
so a SIGKILL loses at most the transition in flight, which `reconcile` recovers from disk.

The lock (`OUT/.parafold.lock`, `fcntl.flock`) belongs to the process that holds its file
descriptor: the kernel drops it when that process dies, however it dies, so a killed run never
leaves a stale lock behind. Whether a run is live is judged by probing that lock
(`lock_is_held`), never by the PID written in the file, which the system may have reused.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parafold.errors import RunLockedError, SchedulerError
from parafold.filesystems import (
    LedgerMode,
    ledger_mode,
    lock_support,
    locks_unsupported,
    warn_without_locks,
)
from parafold.inputs import InputProblem, Target

logger = logging.getLogger(__name__)

__all__ = [
    "State",
    "TargetRecord",
    "EventRecord",
    "WorkerEvent",
    "RunRecord",
    "Ledger",
    "LedgerError",
    "RunLock",
    "LockHolder",
    "read_lock_holder",
    "lock_is_held",
    "LEDGER_FILE",
    "LOCK_FILE",
]

LEDGER_FILE = "parafold.sqlite"
LOCK_FILE = ".parafold.lock"
_BUSY_TIMEOUT_S = 30.0
# How long `RunLock.acquire` keeps trying before it refuses: long enough to wait out a
# `parafold status` probe (which holds a shared lock for an instant), far too short to matter.
_LOCK_RETRY_S = 1.0


class State(enum.StrEnum):
    QUEUED = "queued"
    SEARCHING = "searching"
    FEATURES_READY = "features_ready"
    PREDICTING = "predicting"
    DONE = "done"
    FAILED = "failed"


# Which states each transition may leave from. `reconcile` may set any state (it trusts disk).
_FROM: dict[State, frozenset[State]] = {
    State.SEARCHING: frozenset({State.QUEUED}),
    State.FEATURES_READY: frozenset({State.QUEUED, State.SEARCHING}),
    State.PREDICTING: frozenset({State.FEATURES_READY}),
    State.DONE: frozenset({State.PREDICTING, State.FEATURES_READY, State.QUEUED}),
    State.FAILED: frozenset({State.QUEUED, State.SEARCHING, State.FEATURES_READY,
                             State.PREDICTING}),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS targets (
    name TEXT PRIMARY KEY,
    target_id TEXT NOT NULL,
    length INTEGER NOT NULL,
    sequence_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    failed_stage TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL,
    searching_at REAL,
    features_ready_at REAL,
    predicting_at REAL,
    done_at REAL,
    failed_at REAL,
    timings TEXT NOT NULL DEFAULT '{}',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS targets_state ON targets(state);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER,
    worker TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('search', 'predict')),
    target TEXT NOT NULL,
    batch INTEGER,
    start REAL NOT NULL,
    end REAL,
    ok INTEGER
);
CREATE INDEX IF NOT EXISTS events_target ON events(target);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS run_targets (
    run_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS worker_events (
    run_id INTEGER,
    worker TEXT NOT NULL,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS input_problems (
    run_id INTEGER NOT NULL,
    source TEXT NOT NULL,
    line INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


class LedgerError(SchedulerError):
    """A state transition the ledger does not allow (a bug in the caller, not in the data)."""


@dataclass(frozen=True, slots=True)
class TargetRecord:
    name: str
    target_id: str
    length: int
    sequence_hash: str
    state: State
    failed_stage: str | None
    error: str | None
    attempts: int
    stamps: Mapping[str, float]
    timings: Mapping[str, Any]
    updated_at: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    run_id: int | None
    worker: str
    kind: str
    target: str
    batch: int | None
    start: float
    end: float | None
    ok: bool | None


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """Something that happened to a worker rather than to a target (e.g. it was retired)."""

    run_id: int | None
    worker: str
    kind: str
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    pid: int
    host: str
    started_at: float
    ended_at: float | None
    exit_code: int | None


class Ledger:
    """One connection to `OUT/parafold.sqlite`; make one per process (and per thread)."""

    def __init__(self, out: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(out) / LEDGER_FILE
        if readonly and not self.path.exists():
            raise SchedulerError(f"{self.path}: no run ledger here")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mode = ledger_mode(self.path.parent)
        options = {"mode": "ro"} if readonly else {}
        if self.mode is LedgerMode.UNLOCKED:  # SQLite's own locks would fail every statement
            options["vfs"] = "unix-none"
            if not readonly:  # a reader changes nothing: no need to warn on every `status`
                warn_without_locks(self.path, lock_support(self.path.parent).error
                                   or OSError(errno.ENOSYS, "no locks"))
        self._db = self._connect(options)
        if readonly and not self._readable():
            # a finished WAL ledger read by someone who may not write OUT: SQLite cannot make
            # the -shm file it wants; nobody writes the file now, so read it as it stands
            self._db.close()
            self._db = self._connect({**options, "immutable": "1"})
        if not readonly:
            self._set_journal()
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        self._db.row_factory = sqlite3.Row

    def _connect(self, options: Mapping[str, str]) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(str(self.path.absolute()))}"
        if options:
            uri += "?" + urllib.parse.urlencode(options)
        return sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)

    def _readable(self) -> bool:
        """Whether this read-only connection can read; False only for SQLite's refusal to
        open a WAL ledger's shared memory without write access (the run that wrote it has
        ended and removed its -wal and -shm)."""
        try:
            self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            if os.access(self.path.parent, os.W_OK) or not any(
                    words in str(exc) for words in ("readonly", "unable to open")):
                raise
            return False
        return True

    def _set_journal(self) -> None:
        """WAL on a local disk (`parafold status` reads while the run writes); a rollback
        journal where WAL's shared memory cannot reach every reader (`filesystems`). A
        ledger left in WAL by a run elsewhere may refuse the switch while someone reads it:
        it then stays in WAL for this run."""
        journal = "WAL" if self.mode is LedgerMode.WAL else "TRUNCATE"
        try:
            self._db.execute(f"PRAGMA journal_mode={journal}")
        except sqlite3.OperationalError as exc:
            logger.warning("%s: could not switch the journal to %s (%s)", self.path, journal, exc)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE: take the write lock up front)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")  # may time out (a reader outlasting the busy timeout)
        except BaseException:
            if self._db.in_transaction:  # else the connection keeps the write lock: every
                self._db.execute("ROLLBACK")  # later write, the run's end record included, fails
            raise

    # --- runs and input problems ---

    def begin_run(self, settings: Mapping[str, Any] | None = None) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (pid, host, started_at, settings) VALUES (?, ?, ?, ?)",
                (os.getpid(), socket.gethostname(), time.time(),
                 json.dumps(dict(settings or {}), default=str, sort_keys=True)),
            )
            return int(cur.lastrowid or 0)

    def end_run(self, run_id: int, exit_code: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET ended_at = ?, exit_code = ? WHERE id = ?",
                       (time.time(), exit_code, run_id))

    def record_input_problems(self, run_id: int, problems: Iterable[InputProblem]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO input_problems VALUES (?, ?, ?, ?, ?)",
                [(run_id, p.source, p.line, p.record_id, p.message) for p in problems],
            )

    def runs(self) -> list[RunRecord]:
        rows = self._db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        return [RunRecord(r["id"], r["pid"], r["host"], r["started_at"], r["ended_at"],
                          r["exit_code"]) for r in rows]

    def input_problems(self, run_id: int | None = None) -> list[InputProblem]:
        """Input problems of one run (default: the latest run that recorded any)."""
        if run_id is None:
            row = self._db.execute("SELECT MAX(run_id) FROM input_problems").fetchone()
            run_id = row[0]
            if run_id is None:
                return []
        rows = self._db.execute(
            "SELECT source, line, record_id, message FROM input_problems WHERE run_id = ?",
            (run_id,)).fetchall()
        return [InputProblem(r[0], r[1], r[2], r[3]) for r in rows]

    # --- targets ---

    def register(self, targets: Iterable[Target], run_id: int | None = None) -> list[str]:
        """Add new targets as queued; a known name whose sequence changed starts over.

        With `run_id`, also records that every one of `targets` (new or known) is part of that
        run's input, so `parafold status` can tell them from earlier runs' leftovers.
        Returns the names that were (re)queued by this call.
        """
        now = time.time()
        fresh: list[str] = []
        with self._tx() as db:
            for t in targets:
                if run_id is not None:
                    db.execute("INSERT OR IGNORE INTO run_targets (run_id, name) VALUES (?, ?)",
                               (run_id, t.name))
                row = db.execute("SELECT sequence_hash FROM targets WHERE name = ?",
                                 (t.name,)).fetchone()
                if row is not None and row[0] == t.sequence_hash:
                    continue
                db.execute("DELETE FROM targets WHERE name = ?", (t.name,))
                db.execute(
                    "INSERT INTO targets (name, target_id, length, sequence_hash, state, "
                    "queued_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (t.name, t.id, t.length, t.sequence_hash, State.QUEUED.value, now, now),
                )
                fresh.append(t.name)
        return fresh

    def _move(self, names: Iterable[str], to: State, *, allowed: frozenset[State] | None,
              extra_sql: str = "", extra_args: tuple[Any, ...] = (), stamp: bool = True) -> None:
        names = list(names)
        if not names:
            return
        now = time.time()
        with self._tx() as db:
            for name in names:
                row = db.execute("SELECT state FROM targets WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise LedgerError(f"{name}: not in the ledger")
                if allowed is not None and State(row[0]) not in allowed:
                    raise LedgerError(f"{name}: cannot go from {row[0]} to {to.value}")
                stamp_sql = f", {to.value}_at = {now!r}" if stamp else ""
                db.execute(
                    f"UPDATE targets SET state = ?, updated_at = ?{stamp_sql}{extra_sql} "
                    "WHERE name = ?",
                    (to.value, now, *extra_args, name),
                )

    def start_search(self, name: str) -> None:
        self._move([name], State.SEARCHING, allowed=_FROM[State.SEARCHING],
                   extra_sql=", attempts = attempts + 1")

    def features_ready(self, name: str, timings: Mapping[str, Any] | None = None) -> None:
        self._move([name], State.FEATURES_READY, allowed=_FROM[State.FEATURES_READY],
                   extra_sql=", timings = json_patch(timings, ?)",
                   extra_args=(json.dumps({"search": dict(timings or {})}, default=str),))

    def start_predict(self, names: Iterable[str]) -> None:
        self._move(names, State.PREDICTING, allowed=_FROM[State.PREDICTING])

    def requeue_predict(self, names: Iterable[str]) -> None:
        """Back to features_ready: the fold worker failed, not these targets (their features
        are kept, so the stamp of when they became ready is left as it was)."""
        self._move(names, State.FEATURES_READY, allowed=frozenset({State.PREDICTING}),
                   stamp=False)

    def done(self, name: str, timings: Mapping[str, Any] | None = None) -> None:
        self._move([name], State.DONE, allowed=_FROM[State.DONE],
                   extra_sql=", error = NULL, failed_stage = NULL, timings = json_patch(timings, ?)",
                   extra_args=(json.dumps({"predict": dict(timings or {})}, default=str),))

    def fail(self, name: str, stage: str, error: str) -> None:
        self._move([name], State.FAILED, allowed=_FROM[State.FAILED],
                   extra_sql=", failed_stage = ?, error = ?", extra_args=(stage, error[-4000:]))

    def reconcile(self, name: str, state: State) -> None:
        """Set a state found on disk at start-up (any previous state; clears a failure).

        The state's timestamp is left as it was: the work was done earlier, not now.
        """
        extra = ", error = NULL, failed_stage = NULL" if state is not State.FAILED else ""
        self._move([name], state, allowed=None, extra_sql=extra, stamp=False)

    # --- events ---

    def add_event(self, *, run_id: int | None, worker: str, kind: str, target: str,
                  start: float, end: float, ok: bool, batch: int | None = None) -> int:
        """A finished piece of work (one write: events are recorded when work reports back)."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO events (run_id, worker, kind, target, batch, start, end, ok) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, worker, kind, target, batch, start, end, int(ok)))
            return int(cur.lastrowid or 0)

    def add_worker_event(self, *, run_id: int | None, worker: str, kind: str,
                         reason: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO worker_events (run_id, worker, kind, at, reason) "
                       "VALUES (?, ?, ?, ?, ?)", (run_id, worker, kind, time.time(), reason))

    def worker_events(self) -> list[WorkerEvent]:
        try:
            rows = self._db.execute("SELECT * FROM worker_events ORDER BY rowid").fetchall()
        except sqlite3.OperationalError:  # a ledger from before the table, opened read-only
            return []
        return [WorkerEvent(r["run_id"], r["worker"], r["kind"], r["at"], r["reason"])
                for r in rows]

    def events(self, kind: str | None = None) -> list[EventRecord]:
        sql, args = "SELECT * FROM events", ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [EventRecord(r["id"], r["run_id"], r["worker"], r["kind"], r["target"],
                            r["batch"], r["start"], r["end"],
                            None if r["ok"] is None else bool(r["ok"])) for r in rows]

    # --- reads ---

    def get(self, name: str) -> TargetRecord | None:
        row = self._db.execute("SELECT * FROM targets WHERE name = ?", (name,)).fetchone()
        return None if row is None else _record(row)

    def has_run_targets(self, run_id: int) -> bool:
        """Whether `run_id` recorded its targets (False in ledgers from before runs did)."""
        known = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'run_targets'"
        ).fetchone()
        if known is None:  # an older ledger opened read-only: the table was never created
            return False
        row = self._db.execute("SELECT 1 FROM run_targets WHERE run_id = ? LIMIT 1",
                               (run_id,)).fetchone()
        return row is not None

    def targets(self, state: State | None = None, *,
                run_id: int | None = None) -> list[TargetRecord]:
        """Targets (in one state), all of them or only those in `run_id`'s input."""
        where, args = _where(state, run_id)
        rows = self._db.execute(f"SELECT * FROM targets{where} ORDER BY name", args).fetchall()
        return [_record(r) for r in rows]

    def counts(self, *, run_id: int | None = None) -> dict[State, int]:
        """Targets per state, all of them or only those in `run_id`'s input."""
        where, args = _where(None, run_id)
        out = {s: 0 for s in State}
        for state, n in self._db.execute(
                f"SELECT state, COUNT(*) FROM targets{where} GROUP BY state", args):
            out[State(state)] = int(n)
        return out


def _where(state: State | None, run_id: int | None) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    args: list[Any] = []
    if state is not None:
        clauses.append("state = ?")
        args.append(state.value)
    if run_id is not None:
        clauses.append("name IN (SELECT name FROM run_targets WHERE run_id = ?)")
        args.append(run_id)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def _record(row: sqlite3.Row) -> TargetRecord:
    stamps = {s.value: row[f"{s.value}_at"] for s in State if row[f"{s.value}_at"] is not None}
    return TargetRecord(
        name=row["name"], target_id=row["target_id"], length=row["length"],
        sequence_hash=row["sequence_hash"], state=State(row["state"]),
        failed_stage=row["failed_stage"], error=row["error"], attempts=row["attempts"],
        stamps=stamps, timings=json.loads(row["timings"] or "{}"), updated_at=row["updated_at"],
    )


# --- the run lock ---


@dataclass(frozen=True, slots=True)
class LockHolder:
    pid: int
    host: str
    since: float

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"PID {self.pid} on {self.host}, since {when}"

    def alive_here(self) -> bool | None:
        """Whether the holder still runs: None when it runs on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_lock_holder(out: Path | str) -> LockHolder | None:
    """Who last took the lock (it may have died since, and its PID been reused: to tell
    whether a run is live, use `lock_is_held`)."""
    try:
        data = json.loads((Path(out) / LOCK_FILE).read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lock_is_held(out: Path | str) -> bool | None:
    """Whether a live process holds OUT's run lock, found by trying to take it (never blocks).

    The probe takes a shared lock without waiting and drops it at once; `RunLock.acquire`
    retries for a moment, so a run starting during that instant is not refused. Returns None
    when the lock file cannot be opened (e.g. permissions): the caller cannot tell.
    """
    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no run ever took it
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class RunLock:
    """Exclusive hold on an output directory for one live run.

    `acquire` retries for up to a second before refusing, so a `parafold status` probe's
    momentary shared hold never makes a run fail to start.

    Raises:
        RunLockedError: (on `acquire`) another live process holds the directory.
    """

    def __init__(self, out: Path | str) -> None:
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None
        self._locked = True  # False on a file system without locks (`filesystems`)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + _LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
            except OSError as exc:  # a mount without locks: nothing can tell two runs apart
                if not locks_unsupported(exc):
                    raise
                warn_without_locks(self.path, exc)
                self._locked = False
                return
            time.sleep(0.02)
        holder = read_lock_holder(self.path.parent)
        who = holder.describe() if holder else "another process"
        raise RunLockedError(
            f"{self.path.parent} is in use by a live parafold run ({who}). Wait for it to "
            "finish, watch it with `parafold status`, or choose another output directory.")

    def release(self) -> None:
        if self._fd is not None:
            if self._locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
