"""`parafold status OUT`: where a run stands, read from its ledger (also while it runs).

Throughput is measured over the latest run only (targets finished since it started), so a
resumed run's ETA is not flattered by work an earlier run did. Counts, failures and the ETA
cover the latest run's input (the targets it registered); targets that only earlier runs had
(say, a rerun with a smaller FASTA on the same OUT) are counted on one line of their own. A
ledger whose latest run recorded no targets (older ledgers) counts every target, as before.

A run is live when its ledger row is open and OUT's run lock is held, found by probing the lock
(`lock_is_held`), not from the PID in the lock file, which may have been reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parafold.inputs import InputProblem
from parafold.ledger import (
    Ledger,
    LockHolder,
    State,
    WorkerEvent,
    lock_is_held,
    read_lock_holder,
)

__all__ = ["RunStatus", "read_status", "combined_lines", "combined_dict"]


@dataclass(frozen=True, slots=True)
class RunStatus:
    out: Path
    counts: dict[State, int]
    failures: tuple[tuple[str, str, str], ...]
    input_problems: tuple[InputProblem, ...]
    live: bool
    holder: LockHolder | None
    run_started: float | None
    run_ended: float | None
    done_this_run: int
    now: float
    other_runs: int = 0  # targets in the ledger that are not in the latest run's input
    worker_events: tuple[WorkerEvent, ...] = ()  # the latest run's (e.g. a retired GPU worker)
    last_activity: float | None = None  # the latest run's last event end or done time

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int:
        return self.total - self.counts[State.DONE] - self.counts[State.FAILED]

    @property
    def elapsed_s(self) -> float:
        """Up to now while live, else up to the recorded end; a run SIGKILLed (never ended)
        stops at its last activity, so its rate does not decay with the time since."""
        if self.run_started is None:
            return 0.0
        end = self.now
        if not self.live:
            end = self.run_ended or self.last_activity or self.now
        return end - self.run_started

    @property
    def proteins_per_hour(self) -> float | None:
        if not self.done_this_run or self.elapsed_s <= 0:
            return None
        return self.done_this_run / self.elapsed_s * 3600

    @property
    def eta_s(self) -> float | None:
        rate = self.proteins_per_hour
        if not self.live or rate is None:
            return None
        return self.remaining / rate * 3600

    def lines(self) -> list[str]:
        if self.live:
            head = f"{self.out}: running" + (f" ({self.holder.describe()})" if self.holder
                                             else "")
        else:
            head = f"{self.out}: not running"
        out = [head, "  " + ", ".join(f"{s.value} {n}" for s, n in self.counts.items()),
               f"  {self.counts[State.DONE]}/{self.total} done, {self.remaining} to go"]
        rate = self.proteins_per_hour
        if rate is not None:
            out.append(f"  latest run: {self.done_this_run} finished in {_hms(self.elapsed_s)}"
                       f" ({rate:.0f} proteins/hour)")
        if self.eta_s is not None:
            out.append(f"  estimated time left: {_hms(self.eta_s)}")
        if self.other_runs:
            out.append(f"  {self.other_runs} targets from earlier runs are not in the latest "
                       "run's input (not counted above)")
        if self.failures:
            out.append(f"  failed ({len(self.failures)}):")
            out.extend(f"    {name} [{stage}]: {error}" for name, stage, error in self.failures)
        if self.worker_events:
            out.append(f"  fold workers out of rotation ({len(self.worker_events)}):")
            out.extend(f"    {e.worker}: {e.reason}" for e in self.worker_events)
        if self.input_problems:
            out.append(f"  input records skipped ({len(self.input_problems)}):")
            out.extend(f"    {p}" for p in self.input_problems)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The status for scripts and dashboards (`parafold status --json`): the counts by
        state, the latest run's rate and time left (null when unknown), and every failure."""
        rate, eta = self.proteins_per_hour, self.eta_s
        return {
            "out": str(self.out), "running": self.live,
            "holder": None if self.holder is None else {"pid": self.holder.pid,
                                                         "host": self.holder.host},
            "counts": {state.value: n for state, n in self.counts.items()},
            "total": self.total, "done": self.counts[State.DONE],
            "failed": self.counts[State.FAILED], "remaining": self.remaining,
            "done_this_run": self.done_this_run, "elapsed_s": round(self.elapsed_s, 1),
            "proteins_per_hour": None if rate is None else round(rate, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "other_runs": self.other_runs,
            "failures": [{"name": n, "stage": stage, "error": error}
                         for n, stage, error in self.failures],
            "input_problems": [str(p) for p in self.input_problems],
            "workers_out_of_rotation": [{"worker": e.worker, "reason": e.reason}
                                        for e in self.worker_events],
        }


def combined_dict(statuses: list[RunStatus]) -> dict[str, Any]:
    """Several OUTs for scripts: each one's `as_dict`, and their sum (`combined_lines`'s)."""
    rates = [st.proteins_per_hour for st in statuses if st.live and st.proteins_per_hour]
    return {
        "outs": [st.as_dict() for st in statuses],
        "total": sum(st.total for st in statuses),
        "done": sum(st.counts[State.DONE] for st in statuses),
        "failed": sum(st.counts[State.FAILED] for st in statuses),
        "remaining": sum(st.remaining for st in statuses),
        "running": sum(st.live for st in statuses),
        "proteins_per_hour": round(sum(rates), 1) if rates else None,  # ran in parallel
    }


def combined_lines(statuses: list[RunStatus]) -> list[str]:
    """Several OUTs (the tasks of a `run --shard` job array): a line each, then the sum; the
    failures named with their OUT. The rate adds up the tasks that ran in parallel."""
    out = []
    for st in statuses:
        rate = st.proteins_per_hour
        out.append(f"{st.out}: {'running' if st.live else 'not running'}, "
                   f"{st.counts[State.DONE]}/{st.total} done, {st.counts[State.FAILED]} failed, "
                   f"{st.remaining} to go" + (f", {rate:.0f} proteins/hour" if rate else ""))
    done = sum(st.counts[State.DONE] for st in statuses)
    failed = sum(st.counts[State.FAILED] for st in statuses)
    total = sum(st.total for st in statuses)
    to_go = sum(st.remaining for st in statuses)
    live = sum(st.live for st in statuses)
    rates = [st.proteins_per_hour for st in statuses if st.live and st.proteins_per_hour]
    line = (f"all {len(statuses)}: {done}/{total} done, {failed} failed, {to_go} to go; "
            f"{live} running")
    if rates:
        line += f" ({sum(rates):.0f} proteins/hour together)"
    out.append(line)
    failures = [(st.out, f) for st in statuses for f in st.failures]
    if failures:
        out.append(f"  failed ({len(failures)}):")
        out.extend(f"    {folder}/{name} [{stage}]: {error}"
                   for folder, (name, stage, error) in failures)
    problems = [p for st in statuses for p in st.input_problems]
    if problems:
        out.append(f"  input records skipped ({len(problems)}):")
        out.extend(f"    {p}" for p in problems)
    return out


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_status(out: Path | str) -> RunStatus:
    """The ledger's view of OUT.

    Raises:
        SchedulerError: OUT holds no ledger.
    """
    out = Path(out)
    holder = read_lock_holder(out)
    held = lock_is_held(out)
    with Ledger(out, readonly=True) as ledger:
        runs = ledger.runs()
        latest = runs[-1] if runs else None
        if held is None:  # the lock file cannot be probed: fall back to the PID it names
            held = bool(holder is not None and latest is not None and holder.pid == latest.pid
                        and holder.alive_here() is not False)
        live = bool(latest is not None and latest.ended_at is None and held)
        scope = latest.id if latest is not None and ledger.has_run_targets(latest.id) else None
        counts = ledger.counts(run_id=scope)
        other_runs = 0
        if scope is not None:
            other_runs = sum(ledger.counts().values()) - sum(counts.values())
        failed = ledger.targets(State.FAILED, run_id=scope)
        problems = ledger.input_problems()
        worker_events = tuple(e for e in ledger.worker_events()
                              if latest is not None and e.run_id == latest.id)
        done_this_run = 0
        last_activity: float | None = None
        if latest is not None:
            done_at = [d for r in ledger.targets(State.DONE, run_id=scope)
                       if (d := r.stamps.get("done", 0)) >= latest.started_at]
            done_this_run = len(done_at)
            if latest.ended_at is None and not live:  # SIGKILLed: `elapsed_s` ends here
                ends = [e.end for e in ledger.events() if e.run_id == latest.id and e.end]
                last_activity = max(done_at + ends, default=None)
    return RunStatus(
        out=out, counts=counts,
        failures=tuple((r.name, r.failed_stage or "?", r.error or "") for r in failed),
        input_problems=tuple(problems), live=live, holder=holder,
        run_started=latest.started_at if latest else None,
        run_ended=latest.ended_at if latest else None, done_this_run=done_this_run,
        now=time.time(), other_runs=other_runs, worker_events=worker_events,
        last_activity=last_activity)
