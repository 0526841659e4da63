"""Many proteins under one CPU budget, identical sequences searched once.

Each unique sequence is one job; its targets are featurized in order, so the first one fills
the cache and the others reuse it without a tool call. Jobs run in threads (the work is in the
search subprocesses); every tool call holds its threads' cores from the shared `CpuBudget`, so
as many proteins search at once as the cores allow, and a protein in its long tail (one search
left) frees cores for the next. A failure ends only its own targets.

In MMseqs2 mode all targets go to one batch search instead (`runner.featurize_batch`), with the
whole budget: MMseqs2 gains from many queries per database pass, not from many processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from parafold.errors import is_storage_full
from parafold.featureset import FeatureSet
from parafold.inputs import Target
from parafold.lifecycle import drain_requested
from parafold.search.budget import SEARCHES_PER_PROTEIN, CpuBudget, threads_per_search
from parafold.search.databases import DatabaseSet
from parafold.search.runner import featurize_batch, featurize_prepared
from parafold.search.settings import SearchSettings
from parafold.shards import Shard

__all__ = ["TargetOutcome", "featurize_many", "describe_error"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TargetOutcome:
    """What happened to one target: its features, or the error that stopped it
    (`stopped_early`: a full disk, a spent quota or a drain asked for with SIGUSR1 stopped it,
    not the target itself; a rerun does it)."""

    target: Target
    feature_set: FeatureSet | None
    error: str = ""
    tool_calls: int = 0
    reused: str = ""
    wall_s: float = 0.0
    stopped_early: bool = False

    @property
    def ok(self) -> bool:
        return self.feature_set is not None


def describe_error(exc: BaseException) -> str:
    """One line (plus the tool's stderr tail) naming the failed step and the reason."""
    notes = "; ".join(getattr(exc, "__notes__", []))
    text = f"{type(exc).__name__}: {exc}"
    return f"{notes}: {text}" if notes else text


def featurize_many(targets: Sequence[Target], *, out_dir: Path, databases: DatabaseSet,
                   settings: SearchSettings, cpus: int, cache_dir: Path,
                   write_pkl: bool = False,
                   on_done: Callable[[TargetOutcome], None] | None = None,
                   shard: Shard | None = None) -> list[TargetOutcome]:
    """Features for every target, in input order; failures are outcomes, not exceptions.
    `shard` says which part of a job array the targets are (MMseqs2 batches of other shards
    then run beside this one's on a shared cache).

    Raises:
        DatabaseNotFoundError: a database the preset needs is missing (nothing could run).
    """
    databases = databases.for_search(settings).fingerprinted()
    if settings.msa_mode == "mmseqs":
        return _featurize_mmseqs(targets, out_dir=out_dir, databases=databases,
                                 settings=settings, cpus=cpus, cache_dir=cache_dir,
                                 write_pkl=write_pkl, on_done=on_done, shard=shard)
    groups: dict[str, list[int]] = {}
    for i, target in enumerate(targets):
        groups.setdefault(target.sequence, []).append(i)
    threads = threads_per_search(cpus, len(groups), settings.threads_per_search)
    budget = CpuBudget(cpus)
    # Enough proteins in flight that every core can be busy even when each protein is down to
    # its last search; the budget keeps the tools themselves from oversubscribing.
    workers = max(1, min(len(groups), -(-cpus // threads)))
    logger.info("%d targets (%d unique sequences), %d cores, %d threads per search, "
                "up to %d proteins at once (%d searches each)", len(targets), len(groups), cpus,
                threads, workers, SEARCHES_PER_PROTEIN)
    outcomes: list[TargetOutcome | None] = [None] * len(targets)
    stop: list[str] = []  # why to start no more searches: a full disk, a drain (SIGUSR1)

    def job(indices: list[int]) -> list[tuple[int, TargetOutcome]]:
        done = []
        for i in indices:
            target, start = targets[i], time.monotonic()
            drain = drain_requested()
            if drain is not None and not stop:
                stop.append(drain)
            if stop:
                outcome = TargetOutcome(target, None, error=f"not searched: {stop[0]}",
                                        stopped_early=True)
                done.append((i, outcome))
                continue
            try:
                fs = featurize_prepared(target, out_dir=out_dir, databases=databases,
                                        settings=settings, budget=budget, threads=threads,
                                        cache_dir=cache_dir, write_pkl=write_pkl)
                outcome = TargetOutcome(target, fs, tool_calls=int(fs.extra.get("tool_calls", 0)),
                                        reused=str(fs.extra.get("reused", "")),
                                        wall_s=round(time.monotonic() - start, 3))
            except Exception as exc:  # the per-target boundary: record and go on
                logger.error("%s failed: %s", target.id, describe_error(exc))
                stopped_early = is_storage_full(exc)
                if stopped_early and not stop:
                    stop.append(describe_error(exc))
                outcome = TargetOutcome(target, None, error=describe_error(exc),
                                        wall_s=round(time.monotonic() - start, 3),
                                        stopped_early=stopped_early)
            if on_done is not None:
                on_done(outcome)
            done.append((i, outcome))
        return done

    pool = ThreadPoolExecutor(workers, thread_name_prefix="protein")
    try:
        waiting = {pool.submit(job, indices) for indices in groups.values()}
        while waiting:  # woken twice a second: a signal's Python handler runs in this thread
            done, waiting = wait(waiting, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                for i, outcome in future.result():
                    outcomes[i] = outcome
    except BaseException:  # Ctrl-C or SIGTERM: do not wait for the searches under way (hours
        pool.shutdown(wait=False, cancel_futures=True)  # on real databases); the caller exits
        raise
    pool.shutdown()
    return [o for o in outcomes if o is not None]


def _featurize_mmseqs(targets: Sequence[Target], *, out_dir: Path, databases: DatabaseSet,
                      settings: SearchSettings, cpus: int, cache_dir: Path, write_pkl: bool,
                      on_done: Callable[[TargetOutcome], None] | None,
                      shard: Shard | None) -> list[TargetOutcome]:
    start = time.monotonic()
    logger.info("%d targets, %d cores, one MMseqs2 batch", len(targets), cpus)
    results = featurize_batch(targets, out_dir=out_dir, databases=databases, settings=settings,
                              budget=CpuBudget(cpus), cache_dir=cache_dir, write_pkl=write_pkl,
                              shard=shard)
    wall = round(time.monotonic() - start, 3)
    outcomes = []
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("%s failed: %s", target.id, describe_error(result))
            outcome = TargetOutcome(target, None, error=describe_error(result), wall_s=wall,
                                    stopped_early=is_storage_full(result))
        else:
            outcome = TargetOutcome(target, result,
                                    tool_calls=int(result.extra.get("tool_calls", 0)),
                                    reused=str(result.extra.get("reused", "")), wall_s=wall)
        if on_done is not None:
            on_done(outcome)
        outcomes.append(outcome)
    return outcomes
