"""One target through the CPU stage, through the content-addressed cache.

A cache entry (`cache_dir/<key[:2]>/<key>/`) holds `msas/`, `timings.json` and `features/`;
its `features/features.json` is written last and is the only thing that makes the entry
trusted. A target folder gets hard links (or copies) of the entry's MSAs, its own features
(the target id as `domain_name`) and timings, and its manifest last as well. An entry is
computed under an exclusive `flock`, so two processes never search the same sequence at once,
and a lock held by a killed process is released by the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from parafold.featureset import MANIFEST_FILE, FeatureSet, read_feature_set, write_feature_set
from parafold.inputs import Target
from parafold.search.budget import CpuBudget, threads_per_search
from parafold.search.databases import DatabaseSet
from parafold.search.features import build_features
from parafold.search.msa_search import QUERY_NAME, msa_files_for, run_searches
from parafold.search.settings import SearchSettings
from parafold.store import atomic_copy, atomic_write_json, content_key, read_json

__all__ = ["featurize_target", "cache_key", "TIMINGS_FILE"]

logger = logging.getLogger(__name__)

TIMINGS_FILE = "timings.json"


def cache_key(sequence: str, databases: DatabaseSet, settings: SearchSettings) -> str:
    """Content key of a sequence's features: sequence, database fingerprints, search settings."""
    return content_key(sequence=sequence, databases=databases.fingerprint_map(),
                       settings=settings.cache_fields())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _target_done(folder: Path, key: str, msa_names: tuple[str, ...]) -> FeatureSet | None:
    """The target's finished feature set if it was made under the same key, else None."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        fs = read_feature_set(folder)
    except Exception:  # a foreign or damaged manifest is simply recomputed
        return None
    ok = fs.key == key and (folder / TIMINGS_FILE).is_file() and all(
        (folder / "msas" / n).is_file() for n in msa_names)
    return fs if ok else None


def _fill_entry(entry: Path, sequence: str, *, databases: DatabaseSet,
                settings: SearchSettings, budget: CpuBudget, threads: int, key: str) -> int:
    """Search and featurize into a cache entry; returns the number of tool calls made."""
    for stale in entry.glob(".tmp-*"):  # left by a killed run; we hold the entry's lock
        shutil.rmtree(stale, ignore_errors=True)
    started = time.monotonic()
    search = run_searches(sequence, entry / "msas", databases=databases, settings=settings,
                          budget=budget, threads=threads)
    t_feat = time.monotonic()
    feats = build_features(sequence, QUERY_NAME, entry / "msas", databases=databases,
                           settings=settings)
    features_s = time.monotonic() - t_feat
    atomic_write_json(entry / TIMINGS_FILE, {
        "tools": {t.step: {k: v for k, v in asdict(t).items() if k != "step"}
                  for t in search.timings},
        "searches_wall_s": search.wall_s,
        "features_s": round(features_s, 3),
        "total_wall_s": round(time.monotonic() - started, 3),
    })
    write_feature_set(entry / "features", name="cache", target_id=key, features=feats, key=key,
                      msa_mode=settings.preset)
    return search.tool_calls


def _write_target(folder: Path, target: Target, entry: Path, *, key: str,
                  msa_names: tuple[str, ...], timings: dict[str, Any],
                  databases: DatabaseSet, settings: SearchSettings,
                  write_pkl: bool) -> FeatureSet:
    (folder / MANIFEST_FILE).unlink(missing_ok=True)  # never pair an old manifest with new files
    for name in msa_names:
        atomic_copy(entry / "msas" / name, folder / "msas" / name)
    atomic_write_json(folder / TIMINGS_FILE, timings)
    feats = read_feature_set(entry / "features").load()
    feats["domain_name"] = np.array([target.id.encode("utf-8")], dtype=object)
    return write_feature_set(
        folder, name=target.name, target_id=target.id, features=feats, key=key,
        msa_mode=settings.preset, write_pickle=write_pkl,
        extra={"timings": TIMINGS_FILE, "databases": databases.fingerprint_map()})


def featurize_prepared(target: Target, *, out_dir: Path, databases: DatabaseSet,
                       settings: SearchSettings, budget: CpuBudget, threads: int,
                       cache_dir: Path, write_pkl: bool = False) -> FeatureSet:
    """`featurize_target` with a shared budget and fingerprinted databases (for the scheduler).

    The returned set's `extra` says what this call did: `tool_calls` and `reused`
    ("target": already finished, "cache": features from the cache, "": computed now).
    """
    key = cache_key(target.sequence, databases, settings)
    folder = Path(out_dir) / target.name
    msa_names = msa_files_for(settings.preset)
    done = _target_done(folder, key, msa_names)
    if done is not None:
        logger.info("%s: already finished", target.id)
        return replace(done, extra={**done.extra, "tool_calls": 0, "reused": "target"})
    entry = Path(cache_dir) / key[:2] / key
    tool_calls, filled = 0, False
    with _locked(entry / ".lock"):
        if not (entry / "features" / MANIFEST_FILE).is_file():
            logger.info("%s: searching (%d residues)", target.id, target.length)
            filled = True
            tool_calls = _fill_entry(entry, target.sequence, databases=databases,
                                     settings=settings, budget=budget, threads=threads, key=key)
    timings = {**read_json(entry / TIMINGS_FILE), "key": key, "tool_calls": tool_calls,
               "cache_hit": not filled}
    fs = _write_target(folder, target, entry, key=key, msa_names=msa_names, timings=timings,
                       databases=databases, settings=settings, write_pkl=write_pkl)
    reused = "" if filled else "cache"
    return replace(fs, extra={**fs.extra, "tool_calls": tool_calls, "reused": reused})


def featurize_target(target: Target, *, out_dir: Path, databases: DatabaseSet,
                     settings: SearchSettings, cpus: int, cache_dir: Path,
                     write_pkl: bool = False) -> FeatureSet:
    """Search and featurize one target into `out_dir/<target.name>/`; reuse the cache.

    Top-level and built from picklable arguments, so it runs in a process pool or a Ray task.

    Raises:
        ToolError: a search failed after its retry (its stderr tail is in the message).
        DatabaseNotFoundError: a database the preset needs is missing.
        FeatureError: search outputs could not be turned into features.
    """
    threads = threads_per_search(cpus, 1, settings.threads_per_search)
    return featurize_prepared(target, out_dir=out_dir, databases=databases.fingerprinted(),
                              settings=settings, budget=CpuBudget(cpus), threads=threads,
                              cache_dir=cache_dir, write_pkl=write_pkl)
