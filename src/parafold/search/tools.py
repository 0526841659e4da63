"""The search programs: one subprocess recipe and one small class per binary.

Every call goes through `run_tool`: an argument list (never a shell), its own process group so
a timeout kills the tool and everything it started (and whatever it left running in the
background when it exits), led by a guard that kills that group when the calling thread's
process dies without cleaning up (`tool_guard`), and the child's own resource usage from
`os.wait4` (per-call CPU seconds stay right when many tools run at once from many threads,
which `getrusage(RUSAGE_CHILDREN)` deltas do not). Command building is pure, so it is tested
without any binary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from parafold.errors import (
    DatabaseNotFoundError,
    ToolFailedError,
    ToolKilledError,
    ToolNotFoundError,
    ToolTimeoutError,
)
from parafold.search.databases import hh_db_files

__all__ = [
    "ToolRun",
    "run_tool",
    "resolve_binary",
    "Jackhmmer",
    "HHBlits",
    "HHSearch",
    "TAIL_BYTES",
]

logger = logging.getLogger(__name__)

TAIL_BYTES = 64_000
_GUARD = str(Path(__file__).with_name("tool_guard.py"))
# Died of SIGKILL: as the guard ends (the tool's own signal), or as a shell wrapping the tool
# reports its child's death (128 + the signal).
_KILLED_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class ToolRun:
    """What one finished call did: the command, its exit code, its cost, the end of its output."""

    cmd: tuple[str, ...]
    returncode: int
    wall_s: float
    cpu_s: float
    stdout_tail: str
    stderr_tail: str
    max_rss_mib: float = 0.0  # peak resident memory of the tool (its largest process)


def _tail(handle: IO[bytes]) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - TAIL_BYTES))
    return handle.read().decode("utf-8", errors="replace")


def run_tool(cmd: Sequence[str], *, timeout_s: float, cwd: Path | str | None = None,
             env: Mapping[str, str] | None = None) -> ToolRun:
    """Run one program to completion, or kill its whole process group at `timeout_s`.

    Output goes to temporary files, not pipes, so a chatty tool can never block on a full pipe
    while we wait for it.

    Raises:
        ToolNotFoundError: the program cannot be started.
        ToolTimeoutError: it ran past `timeout_s` (it and its children were killed).
        ToolFailedError: it exited non-zero; carries the tail of its stderr.
        ToolKilledError: it (or, for a wrapper script, its child) died of SIGKILL: most
            likely the out-of-memory killer.
    """
    cmd = [str(c) for c in cmd]
    logger.debug("running %s", " ".join(cmd))
    if not _startable(cmd[0], cwd, env):
        raise ToolNotFoundError(f"cannot start {cmd[0]}: not found or not executable")
    # the guard leads the tool's session and kills it if this thread dies (`tool_guard`)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as usage_file:
        guarded = [sys.executable, "-S", "-E", _GUARD, str(os.getpid()),
                   str(usage_file.fileno()), *cmd]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(guarded, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    cwd=cwd, env=None if env is None else dict(env),
                                    start_new_session=True, pass_fds=(usage_file.fileno(),))
        except OSError as exc:
            raise ToolNotFoundError(f"cannot start {cmd[0]}: {exc.strerror or exc}") from exc

        def _wait() -> None:  # until it exits, but not reaped: until `wait4` below, its pid
            # (the group's id) cannot be reused, so killing the group never hits another's
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)

        waiter = threading.Thread(target=_wait, name=f"wait-{proc.pid}", daemon=True)
        waiter.start()
        try:
            waiter.join(timeout_s)
        except BaseException:  # Ctrl-C or a cancelled job: the tool is in its own session,
            _kill_group(proc.pid)  # so no terminal signal reaches it; never leave it running
            waiter.join()
            os.wait4(proc.pid, 0)
            raise
        timed_out = waiter.is_alive()
        # a timeout: the tool and its children; else children it left in the background,
        # which must not outlive it
        _kill_group(proc.pid)
        waiter.join()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = float(usage.ru_utime + usage.ru_stime)  # type: ignore[attr-defined]
        max_rss_mib = _peak_mib(usage_file)
        if timed_out:
            raise ToolTimeoutError(cmd, timeout_s)
        run = ToolRun(tuple(cmd), proc.returncode, wall, cpu, _tail(out), _tail(err),
                      max_rss_mib)
    if run.returncode != 0:
        tail = run.stderr_tail.strip() or run.stdout_tail
        if run.returncode in _KILLED_CODES:  # not by us: the timeout was handled above
            raise ToolKilledError(cmd, run.returncode, tail)
        raise ToolFailedError(cmd, run.returncode, tail)
    logger.debug("%s finished in %.2f s wall, %.2f s CPU, %.0f MiB at most",
                 Path(cmd[0]).name, wall, cpu, max_rss_mib)
    return run


def _peak_mib(usage_file: IO[bytes]) -> float:
    """The tool's peak resident memory as its guard wrote it (KiB), in MiB; 0 if unknown
    (the guard was killed first). Not the guard's own peak from `wait4`: on Linux that starts
    at the peak of the process that forked it, here a search worker's."""
    usage_file.seek(0)
    text = usage_file.read().decode("ascii", errors="replace").strip()
    return round(int(text) / 1024, 1) if text.isdigit() else 0.0


def _startable(program: str, cwd: Path | str | None, env: Mapping[str, str] | None) -> bool:
    """Whether `program` resolves as `subprocess.Popen` would resolve it (checked here: the
    guard, not the tool, is what Popen starts)."""
    if "/" in program:
        path = Path(program) if os.path.isabs(program) else Path(cwd or ".") / program
        return path.is_file() and os.access(path, os.X_OK)
    search_path = None if env is None else env.get("PATH", os.defpath)
    return shutil.which(program, path=search_path) is not None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def resolve_binary(binary: str) -> str:
    """The absolute path of `binary` (a name on PATH or a path).

    Raises:
        ToolNotFoundError: not found or not executable.
    """
    found = shutil.which(binary)
    if found is None:
        raise ToolNotFoundError(f"{binary}: not found on PATH or not executable")
    return os.path.abspath(found)


def _hh_prefix_exists(prefix: Path) -> bool:
    return bool(hh_db_files(prefix))


def _check_hh_databases(tool: str, databases: Sequence[Path]) -> tuple[Path, ...]:
    if not databases:
        raise DatabaseNotFoundError(f"{tool}: no database given")
    for db in databases:
        if not _hh_prefix_exists(Path(db)):
            raise DatabaseNotFoundError(f"{tool}: no database files {db}_*")
    return tuple(Path(db) for db in databases)


class Jackhmmer:
    """jackhmmer against one FASTA database, with AlphaFold's filters and e-values."""

    def __init__(self, *, database: Path, binary: str = "jackhmmer", cpus: int = 1,
                 n_iter: int = 1, e_value: float = 0.0001, filter_f1: float = 0.0005,
                 filter_f2: float = 0.00005, filter_f3: float = 0.0000005,
                 timeout_s: float = 86_400.0) -> None:
        """Raises: ToolNotFoundError, DatabaseNotFoundError (checked now, not at the first run)."""
        self.binary = resolve_binary(binary)
        self.database = Path(database)
        if not self.database.is_file():
            raise DatabaseNotFoundError(f"jackhmmer: database {self.database} does not exist")
        self.cpus, self.n_iter, self.e_value = max(1, cpus), n_iter, e_value
        self.filters = (filter_f1, filter_f2, filter_f3)
        self.timeout_s = timeout_s

    def build_command(self, query_fasta: Path, out_sto: Path) -> list[str]:
        f1, f2, f3 = self.filters
        return [
            self.binary, "-o", "/dev/null", "-A", str(out_sto), "--noali",
            "--F1", str(f1), "--F2", str(f2), "--F3", str(f3),
            "--incE", str(self.e_value), "-E", str(self.e_value),
            "--cpu", str(self.cpus), "-N", str(self.n_iter),
            str(query_fasta), str(self.database),
        ]

    def run(self, query_fasta: Path, out_sto: Path) -> ToolRun:
        """Search; the full Stockholm alignment lands in `out_sto` (truncation is the caller's)."""
        return run_tool(self.build_command(query_fasta, out_sto), timeout_s=self.timeout_s)


class HHBlits:
    """hhblits against HH-suite databases (BFD + UniRef30), with AlphaFold's limits."""

    def __init__(self, *, databases: Sequence[Path], binary: str = "hhblits", cpus: int = 1,
                 n_iter: int = 3, e_value: float = 0.001, maxseq: int = 1_000_000,
                 realign_max: int = 100_000, maxfilt: int = 100_000,
                 min_prefilter_hits: int = 1000, timeout_s: float = 86_400.0) -> None:
        """Raises: ToolNotFoundError, DatabaseNotFoundError."""
        self.binary = resolve_binary(binary)
        self.databases = _check_hh_databases("hhblits", databases)
        self.cpus, self.n_iter, self.e_value = max(1, cpus), n_iter, e_value
        self.maxseq, self.realign_max, self.maxfilt = maxseq, realign_max, maxfilt
        self.min_prefilter_hits = min_prefilter_hits
        self.timeout_s = timeout_s

    def build_command(self, query_fasta: Path, out_a3m: Path) -> list[str]:
        cmd = [
            self.binary, "-i", str(query_fasta), "-cpu", str(self.cpus), "-oa3m", str(out_a3m),
            "-o", "/dev/null", "-n", str(self.n_iter), "-e", str(self.e_value),
            "-maxseq", str(self.maxseq), "-realign_max", str(self.realign_max),
            "-maxfilt", str(self.maxfilt), "-min_prefilter_hits", str(self.min_prefilter_hits),
        ]
        for db in self.databases:
            cmd += ["-d", str(db)]
        return cmd

    def run(self, query_fasta: Path, out_a3m: Path) -> ToolRun:
        return run_tool(self.build_command(query_fasta, out_a3m), timeout_s=self.timeout_s)


class HHSearch:
    """hhsearch of an A3M query MSA against PDB70, for template hits."""

    def __init__(self, *, databases: Sequence[Path], binary: str = "hhsearch", cpus: int = 1,
                 maxseq: int = 1_000_000, timeout_s: float = 86_400.0) -> None:
        """Raises: ToolNotFoundError, DatabaseNotFoundError."""
        self.binary = resolve_binary(binary)
        self.databases = _check_hh_databases("hhsearch", databases)
        self.cpus, self.maxseq, self.timeout_s = max(1, cpus), maxseq, timeout_s

    def build_command(self, query_a3m: Path, out_hhr: Path) -> list[str]:
        cmd = [self.binary, "-i", str(query_a3m), "-o", str(out_hhr),
               "-maxseq", str(self.maxseq), "-cpu", str(self.cpus)]
        for db in self.databases:
            cmd += ["-d", str(db)]
        return cmd

    def run(self, query_a3m: Path, out_hhr: Path) -> ToolRun:
        return run_tool(self.build_command(query_a3m, out_hhr), timeout_s=self.timeout_s)
