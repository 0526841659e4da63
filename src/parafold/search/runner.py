"""One target through the CPU stage, through the content-addressed cache.

A cache entry (`cache_dir/<key[:2]>/<key>/`) holds `msas/`, `timings.json` and `features/`;
its `features/features.json` is written last and is the only thing that makes the entry
trusted. A target folder gets hard links (or copies) of the entry's MSAs and `features.npz`,
its own timings, and last its own manifest, which names the target. An entry is computed
under an exclusive `flock`, so two processes never search the same sequence at once, and a
lock held by a killed process is released by the kernel.

Every MSA mode goes through the same entries, keys and target folders: `classic` searches one
protein at a time (`featurize_prepared`); `mmseqs` searches every missing sequence of a call
in one MMseqs2 batch (`featurize_batch`, under one cache-wide batch lock); `precomputed` and
`single_sequence` run no tool. The key holds the mode's settings and the databases it reads,
and for precomputed MSAs the file's content.

After an MMseqs2 batch, building each query's features (mostly Biopython parsing template
mmCIFs, pure Python under the GIL) runs in spawned worker processes when the batch is large
enough to repay their start-up; threads would use one core's worth of it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from parafold.errors import PipelineError
from parafold.featureset import (
    MANIFEST_FILE,
    FeatureSet,
    read_feature_set,
    share_feature_set,
    write_feature_set,
)
from parafold.inputs import Target
from parafold.search.budget import CpuBudget, threads_per_search
from parafold.search.databases import DatabaseSet
from parafold.search.features import (
    build_features,
    mmseqs_features,
    msa_feature_dict,
    single_sequence_features,
)
from parafold.search.mmseqs import MMSEQS_FILES, search_batch
from parafold.search.msa_search import QUERY_NAME, ToolTiming, msa_files_for, run_searches
from parafold.search.precomputed import file_digest, find_msa_file, read_msa, stored_msa_name
from parafold.search.settings import SearchSettings
from parafold.shards import Shard
from parafold.store import (
    atomic_copy,
    atomic_write_json,
    atomic_write_text,
    content_key,
    file_lock,
    read_json,
)

__all__ = ["featurize_target", "featurize_prepared", "featurize_batch", "cache_key",
           "target_key", "msa_names", "TIMINGS_FILE"]

logger = logging.getLogger(__name__)

TIMINGS_FILE = "timings.json"
# Smaller MMseqs2 batches build features in threads: a spawned process spends ~0.5 s importing
# AlphaFold's feature code, more than a few queries' features cost.
PROCESS_FILL_MIN_QUERIES = 8


def cache_key(sequence: str, databases: DatabaseSet, settings: SearchSettings, *,
              msa_digest: str = "") -> str:
    """Content key of a sequence's features: sequence, fingerprints of the databases the MSA
    mode reads, the mode's settings, and (precomputed mode) the MSA file's digest."""
    dbs = databases.for_search(settings)
    parts = {"sequence": sequence, "databases": dbs.fingerprint_map(),
             "settings": settings.cache_fields()}
    if not dbs.templates:
        parts["templates"] = False
    if msa_digest:
        parts["msa"] = msa_digest
    return content_key(**parts)


def target_key(target: Target, databases: DatabaseSet,
               settings: SearchSettings) -> tuple[str, Path | None]:
    """The target's cache key and, in precomputed mode, its MSA file.

    Raises:
        InputError: precomputed mode and the target has no MSA file.
    """
    if settings.msa_mode == "precomputed":
        path = find_msa_file(settings.msa_dir, target)
        return cache_key(target.sequence, databases, settings,
                         msa_digest=file_digest(path)), path
    return cache_key(target.sequence, databases, settings), None


def msa_names(settings: SearchSettings, databases: DatabaseSet,
              msa_file: Path | None = None) -> tuple[str, ...]:
    """The files a finished target has in `msas/` for this mode."""
    mode = settings.msa_mode
    if mode == "classic":
        return msa_files_for(settings.preset, templates=settings.use_templates)
    if mode == "mmseqs":
        optional = (("env", "mmseqs_env"), ("pdb", "mmseqs_pdb"))
        return (MMSEQS_FILES["uniref"],) + tuple(
            MMSEQS_FILES[tag] for tag, db in optional if databases.path(db) is not None)
    if mode == "precomputed" and msa_file is not None:
        return (stored_msa_name(msa_file),)
    return ()


def _mode_label(settings: SearchSettings) -> str:
    return settings.preset if settings.msa_mode == "classic" else settings.msa_mode


def _target_done(folder: Path, target: Target, key: str,
                 msa_names: tuple[str, ...]) -> FeatureSet | None:
    """The target's finished feature set if it was made for this target under the same key,
    else None. The key alone is not enough: ids whose safe names collide get their folders
    by input order, so a reordered input would hand one id's folder to the other."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    try:
        fs = read_feature_set(folder)
    except Exception:  # a foreign or damaged manifest is simply recomputed
        return None
    ok = (fs.key == key and fs.target_id == target.id and fs.name == target.name
          and (folder / TIMINGS_FILE).is_file()
          and all((folder / "msas" / n).is_file() for n in msa_names))
    return fs if ok else None


def _fill_local(entry: Path, target: Target, msa_file: Path | None, *,
                settings: SearchSettings, key: str) -> int:
    """Precomputed or single-sequence features into a cache entry: no tool runs."""
    started = time.monotonic()
    if msa_file is not None:
        msa = read_msa(msa_file, target)
        # a copy, never a link: the user's file must not become the cache's (an edit to it
        # would change an entry under its old key, and an edit in OUT the user's input)
        atomic_copy(msa_file, entry / "msas" / stored_msa_name(msa_file), link=False)
        feats = msa_feature_dict(target.sequence, QUERY_NAME, (msa,))
    else:
        feats = single_sequence_features(target.sequence, QUERY_NAME)
    elapsed = round(time.monotonic() - started, 3)
    atomic_write_json(entry / TIMINGS_FILE, {"tools": {}, "searches_wall_s": 0.0,
                                             "features_s": elapsed, "total_wall_s": elapsed})
    write_feature_set(entry / "features", name="cache", target_id=key, features=feats, key=key,
                      msa_mode=_mode_label(settings))
    return 0


def _fill_entry(entry: Path, sequence: str, *, databases: DatabaseSet,
                settings: SearchSettings, budget: CpuBudget, threads: int, key: str,
                locked: bool = True) -> int:
    """Search and featurize into a cache entry; returns the number of tool calls made.
    `locked`: this process holds the entry's lock, so what a killed run left there is no
    one's (without locks it may be another search's, in progress: it is left alone)."""
    if locked:
        for stale in entry.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        for partial in entry.rglob("*.part"):  # half-written files of a killed atomic write
            partial.unlink(missing_ok=True)
    started = time.monotonic()
    search = run_searches(sequence, entry / "msas", databases=databases, settings=settings,
                          budget=budget, threads=threads)
    t_feat = time.monotonic()
    feats = build_features(sequence, QUERY_NAME, entry / "msas", databases=databases,
                           settings=settings)
    features_s = time.monotonic() - t_feat
    atomic_write_json(entry / TIMINGS_FILE, {
        **_tool_timings(search.timings),
        "searches_wall_s": search.wall_s,
        "features_s": round(features_s, 3),
        "total_wall_s": round(time.monotonic() - started, 3),
    })
    write_feature_set(entry / "features", name="cache", target_id=key, features=feats, key=key,
                      msa_mode=_mode_label(settings))
    return search.tool_calls


def _write_target(folder: Path, target: Target, entry: Path, *, key: str,
                  msa_names: tuple[str, ...], timings: dict[str, Any],
                  databases: DatabaseSet, settings: SearchSettings,
                  write_pkl: bool) -> FeatureSet:
    (folder / MANIFEST_FILE).unlink(missing_ok=True)  # never pair an old manifest with new files
    for name in msa_names:
        atomic_copy(entry / "msas" / name, folder / "msas" / name)
    atomic_write_json(folder / TIMINGS_FILE, timings)
    return share_feature_set(
        read_feature_set(entry / "features"), folder, name=target.name, target_id=target.id,
        key=key, msa_mode=_mode_label(settings), write_pickle=write_pkl,
        extra={"timings": TIMINGS_FILE, "databases": databases.fingerprint_map()})


def featurize_prepared(target: Target, *, out_dir: Path, databases: DatabaseSet,
                       settings: SearchSettings, budget: CpuBudget, threads: int,
                       cache_dir: Path, write_pkl: bool = False) -> FeatureSet:
    """`featurize_target` with a shared budget and fingerprinted databases (for the scheduler).

    The returned set's `extra` says what this call did: `tool_calls`, `reused` ("target":
    already finished, "cache": features from the cache, "": computed now) and, computed now,
    `search_max_rss_mib` (the most memory one of its search tools took).
    """
    if settings.msa_mode == "mmseqs":
        result = featurize_batch([target], out_dir=out_dir, databases=databases,
                                 settings=settings, budget=budget, cache_dir=cache_dir,
                                 write_pkl=write_pkl)[0]
        if isinstance(result, BaseException):
            raise result
        return result
    key, msa_file = target_key(target, databases, settings)
    folder = Path(out_dir) / target.name
    names = msa_names(settings, databases, msa_file)
    done = _target_done(folder, target, key, names)
    if done is not None:
        logger.info("%s: already finished", target.id)
        return replace(done, extra={**done.extra, "tool_calls": 0, "reused": "target"})
    entry = _entry(cache_dir, key)
    tool_calls, filled = 0, False
    with file_lock(entry / ".lock") as locked:
        if not (entry / "features" / MANIFEST_FILE).is_file():
            filled = True
            if settings.msa_mode == "classic":
                logger.info("%s: searching (%d residues)", target.id, target.length)
                tool_calls = _fill_entry(entry, target.sequence, databases=databases,
                                         settings=settings, budget=budget, threads=threads,
                                         key=key, locked=locked)
            else:
                tool_calls = _fill_local(entry, target, msa_file, settings=settings, key=key)
    timings = {**read_json(entry / TIMINGS_FILE), "key": key, "tool_calls": tool_calls,
               "cache_hit": not filled}
    fs = _write_target(folder, target, entry, key=key, msa_names=names, timings=timings,
                       databases=databases, settings=settings, write_pkl=write_pkl)
    return replace(fs, extra={**fs.extra, **_did(timings, tool_calls, fresh=filled)})


def _tool_timings(timings: Sequence[ToolTiming]) -> dict[str, Any]:
    """A cache entry's `timings.json` entries for its search tools: each step's cost, and the
    most memory one tool took (`search_max_rss_mib`: what to size a node's memory by)."""
    return {"tools": {t.step: {k: v for k, v in asdict(t).items() if k != "step"}
                      for t in timings},
            "search_max_rss_mib": max((t.max_rss_mib for t in timings), default=0.0)}


def _did(timings: dict[str, Any], tool_calls: int, *, fresh: bool) -> dict[str, Any]:
    """What a featurize call did, for its feature set's `extra` (see `featurize_prepared`)."""
    did: dict[str, Any] = {"tool_calls": tool_calls, "reused": "" if fresh else "cache"}
    if fresh and timings.get("search_max_rss_mib"):
        did["search_max_rss_mib"] = timings["search_max_rss_mib"]
    return did


def featurize_target(target: Target, *, out_dir: Path, databases: DatabaseSet,
                     settings: SearchSettings, cpus: int, cache_dir: Path,
                     write_pkl: bool = False) -> FeatureSet:
    """Search and featurize one target into `out_dir/<target.name>/`; reuse the cache.

    Top-level and built from picklable arguments, so it runs in a process pool or a Ray task.

    Raises:
        ToolError: a search failed after its retry (its stderr tail is in the message).
        DatabaseNotFoundError: a database the preset (or MSA mode) needs is missing.
        FeatureError: search outputs could not be turned into features.
        InputError: precomputed mode and the target's MSA file is missing or invalid.
    """
    threads = threads_per_search(cpus, 1, settings.threads_per_search)
    databases = databases.for_search(settings).fingerprinted()
    return featurize_prepared(target, out_dir=out_dir, databases=databases,
                              settings=settings, budget=CpuBudget(cpus), threads=threads,
                              cache_dir=cache_dir, write_pkl=write_pkl)


def _entry(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / key[:2] / key


def has_cached_features(cache_dir: Path, key: str) -> bool:
    """Whether the cache holds finished features for `key`."""
    return (_entry(cache_dir, key) / "features" / MANIFEST_FILE).is_file()


def cached_feature_set(cache_dir: Path, key: str) -> FeatureSet | None:
    """The finished features the cache holds for `key` (their manifest: length, MSA depth,
    templates), or None."""
    if not has_cached_features(cache_dir, key):
        return None
    try:
        return read_feature_set(_entry(cache_dir, key) / "features")
    except (PipelineError, TypeError, ValueError, OSError):  # unreadable: searched again
        return None


def _batch_lock_name(shard: Shard | None) -> str:
    return ".mmseqs-batch.lock" if shard is None else (
        f".mmseqs-batch-{shard.index}-of-{shard.count}.lock")


def _fill_mmseqs_entry(entry: Path, sequence: str, msas: dict[str, str], *,
                       databases: DatabaseSet, settings: SearchSettings, key: str,
                       batch: dict[str, Any]) -> None:
    """One query's MSAs, features and timings into its cache entry (runs in a fill process).

    Raises:
        PipelineError: this query's features could not be built (see `mmseqs_features`).
    """
    started = time.monotonic()
    with file_lock(entry / ".lock") as locked:
        if (entry / "features" / MANIFEST_FILE).is_file():
            # filled meanwhile by another batch (a job array's tasks and an unsharded run
            # may search one sequence at once): keep those files, which targets link to
            logger.info("%s: features already in the cache; this batch's are not stored", key)
            return
        for partial in entry.rglob("*.part") if locked else ():  # a killed fill's leftovers
            partial.unlink(missing_ok=True)
        for tag, text in msas.items():
            atomic_write_text(entry / "msas" / MMSEQS_FILES[tag], text)
        feats = mmseqs_features(sequence, QUERY_NAME, entry / "msas", databases=databases,
                                settings=settings)
        features_s = round(time.monotonic() - started, 3)
        atomic_write_json(entry / TIMINGS_FILE, {
            **batch["tool_timings"], "batch": batch["info"],
            "searches_wall_s": batch["info"]["wall_s"], "features_s": features_s,
            "total_wall_s": round(batch["info"]["wall_s"] + features_s, 3)})
        write_feature_set(entry / "features", name="cache", target_id=key, features=feats,
                          key=key, msa_mode=_mode_label(settings))


def _fill_child_init(log_level: int, absl_level: int) -> None:
    """A fill process (`lifecycle.helper_process_init`: the parent alone decides to stop, and
    lets the fills in flight finish), logging like its parent."""
    from parafold.lifecycle import helper_process_init

    helper_process_init()
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s")
    logging.getLogger("absl").setLevel(absl_level)


def _fill_child_ready() -> None:
    """A no-op: submitted once per process so that all of them start (and import) at once."""


@contextlib.contextmanager
def _fill_pool(workers: int, queries: int) -> Iterator[cf.ProcessPoolExecutor | None]:
    """Spawn fill processes (not fork: the parent has threads) for a batch that repays them,
    started now so that they import while MMseqs2 searches; None: fill in threads."""
    if workers < 2 or queries < PROCESS_FILL_MIN_QUERIES:
        yield None
        return
    pool = cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_fill_child_init,
        initargs=(logging.getLogger().getEffectiveLevel(),
                  logging.getLogger("absl").getEffectiveLevel()))
    try:
        for _ in range(workers):
            pool.submit(_fill_child_ready)
        yield pool
    finally:  # also on Ctrl-C: fills not started are dropped, those in flight finish
        pool.shutdown(wait=True, cancel_futures=True)


def _fill_in_processes(pool: cf.ProcessPoolExecutor, names: Sequence[str],
                       job: Callable[[str], tuple[tuple[Any, ...], dict[str, Any]]]
                       ) -> tuple[dict[str, BaseException], list[str]]:
    """`_fill_mmseqs_entry(*args, **kwargs)` for each query name in the pool; returns the
    per-query failures by name and the names a dead process left unfinished."""
    futures: dict[str, cf.Future[None]] = {}
    for name in names:
        args, kwargs = job(name)
        try:
            futures[name] = pool.submit(_fill_mmseqs_entry, *args, **kwargs)
        except BrokenProcessPool:
            break
    cf.wait(futures.values())
    failed: dict[str, BaseException] = {}
    lost = [n for n in names if n not in futures]
    for name, future in futures.items():
        exc = future.exception()
        if isinstance(exc, BrokenProcessPool):
            lost.append(name)
        elif isinstance(exc, PipelineError):
            failed[name] = exc
        elif exc is not None:
            raise exc
    return failed, lost


_WORKDIR_PREFIX = ".tmp-mmseqs-"
_UNLOCKED_WORKDIR_AGE_S = 24 * 3600  # a work folder without a lock file (older parafold)


@contextlib.contextmanager
def _batch_workdir(cache_dir: Path) -> Iterator[Path]:
    """A work folder for one MMseqs2 batch in the cache folder, locked while the batch runs.
    Those killed batches left (their lock free: the kernel drops it with its holder) are
    removed first: MMseqs2's temporary files of a proteome batch take hundreds of GB."""
    _remove_abandoned_workdirs(cache_dir)
    # made under another name and locked, then renamed: a sweep never sees it unlocked
    making = Path(tempfile.mkdtemp(prefix=".making-mmseqs-", dir=cache_dir))
    tmp = making
    try:
        with open(making / ".lock", "a+b") as lock:
            with contextlib.suppress(OSError):  # no locks on this mount: never swept
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            tmp = making.with_name(_WORKDIR_PREFIX + making.name.removeprefix(".making-mmseqs-"))
            making.rename(tmp)
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned_workdirs(cache_dir: Path) -> None:
    """Delete the batch work folders no live process holds (see `_batch_workdir`)."""
    def remove_if_old(folder: Path) -> None:
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > _UNLOCKED_WORKDIR_AGE_S:
                shutil.rmtree(folder, ignore_errors=True)

    for folder in cache_dir.glob(".making-mmseqs-*"):  # a maker killed in the instant
        remove_if_old(folder)                          # before its rename: empty, old
    for folder in cache_dir.glob(f"{_WORKDIR_PREFIX}*"):
        try:
            fd = os.open(folder / ".lock", os.O_RDWR)
        except FileNotFoundError:  # an older version's (no lock file): only when old
            remove_if_old(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live batch (or no locks here): not ours to touch
            continue
        finally:
            os.close(fd)
        logger.info("removing %s, left by a killed MMseqs2 batch", folder)
        shutil.rmtree(folder, ignore_errors=True)


def _search_and_fill(pending: dict[str, str], *, databases: DatabaseSet,
                     settings: SearchSettings, budget: CpuBudget,
                     cache_dir: Path) -> tuple[dict[str, BaseException], int]:
    """One MMseqs2 batch for every pending (key -> sequence); returns failures and calls.

    Each query's features are built in one of min(cores, queries) spawned processes (threads
    below `PROCESS_FILL_MIN_QUERIES` queries or with one core): the work is GIL-bound Python.
    A query's `PipelineError` is its failure, the others go on; queries left unfinished by a
    process that died are filled here, in threads, so the batch's searches are not lost.
    """
    names = {f"q{i}": key for i, key in enumerate(pending)}
    logger.info("mmseqs: searching %d sequences in one batch", len(names))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with budget.hold(budget.total) as cores, _batch_workdir(Path(cache_dir)) as tmp, \
            _fill_pool(min(cores, len(names)), len(names)) as pool:
        try:
            result = search_batch([(n, pending[k]) for n, k in names.items()], Path(tmp),
                                  uniref=databases.require("mmseqs_uniref30"),
                                  env=databases.path("mmseqs_env"),
                                  pdb=databases.path("mmseqs_pdb"), settings=settings,
                                  threads=cores)
        except PipelineError as exc:
            exc.add_note(f"mmseqs batch of {len(names)} sequences")
            return dict.fromkeys(pending, exc), 0
        batch = {"tool_timings": _tool_timings(result.timings),
                 "info": {"queries": len(names), "calls": len(result.timings),
                          "wall_s": result.wall_s, "threads": cores}}
        failed: dict[str, BaseException] = {}

        def job(name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
            key = names[name]
            return ((_entry(cache_dir, key), pending[key], result.msas[name]),
                    {"databases": databases, "settings": settings, "key": key, "batch": batch})

        def fill(name: str) -> None:
            args, kwargs = job(name)
            try:
                _fill_mmseqs_entry(*args, **kwargs)
            except PipelineError as exc:  # one query's features; the others go on
                failed[names[name]] = exc

        in_threads: Sequence[str] = list(names)
        if pool is not None:
            by_name, lost = _fill_in_processes(pool, in_threads, job)
            failed.update({names[n]: exc for n, exc in by_name.items()})
            in_threads = [n for n in lost if not has_cached_features(cache_dir, names[n])]
            if in_threads:
                logger.warning("mmseqs: a feature process died; building the features of %d "
                               "queries in this process", len(in_threads))
        if in_threads:
            with ThreadPoolExecutor(max(1, cores), thread_name_prefix="mmseqs-features") as tp:
                list(tp.map(fill, in_threads))
    return failed, len(result.timings)


def featurize_batch(targets: Sequence[Target], *, out_dir: Path, databases: DatabaseSet,
                    settings: SearchSettings, budget: CpuBudget, cache_dir: Path,
                    write_pkl: bool = False, shard: Shard | None = None
                    ) -> list[FeatureSet | BaseException]:
    """MMseqs2 mode: every target whose features are not cached yet, in one search batch.

    Results follow `targets`; a failure is returned in its target's place. `extra` says what
    each target cost: the batch's tool calls are counted on the first target searched.
    Batches of one cache run one at a time (no sequence is searched twice at once), except
    those of different shards: shards hold disjoint sequences.
    """
    databases = databases.for_search(settings).fingerprinted()
    keys = [cache_key(t.sequence, databases, settings) for t in targets]
    names = msa_names(settings, databases)
    results: list[FeatureSet | BaseException | None] = [None] * len(targets)
    pending: dict[str, str] = {}
    for i, (target, key) in enumerate(zip(targets, keys, strict=True)):
        done = _target_done(Path(out_dir) / target.name, target, key, names)
        if done is not None:
            results[i] = replace(done, extra={**done.extra, "tool_calls": 0, "reused": "target"})
        elif not has_cached_features(cache_dir, key):
            pending[key] = target.sequence
    failed: dict[str, BaseException] = {}
    calls, searched = 0, set()
    if pending:
        with file_lock(Path(cache_dir) / _batch_lock_name(shard)):
            pending = {k: s for k, s in pending.items() if not has_cached_features(cache_dir, k)}
            if pending:
                failed, calls = _search_and_fill(pending, databases=databases,
                                                 settings=settings, budget=budget,
                                                 cache_dir=cache_dir)
                searched = set(pending) - set(failed)
    for i, (target, key) in enumerate(zip(targets, keys, strict=True)):
        if results[i] is not None:
            continue
        if key in failed:
            results[i] = failed[key]
            continue
        entry = _entry(cache_dir, key)
        fresh = key in searched
        searched.discard(key)  # the first target of a sequence was searched, twins reuse it
        tool_calls, calls = (calls, 0) if fresh else (0, calls)
        try:
            timings = {**read_json(entry / TIMINGS_FILE), "key": key, "tool_calls": tool_calls,
                       "cache_hit": not fresh}
            fs = _write_target(Path(out_dir) / target.name, target, entry, key=key,
                               msa_names=names, timings=timings, databases=databases,
                               settings=settings, write_pkl=write_pkl)
        except (PipelineError, OSError) as exc:
            results[i] = exc
            continue
        results[i] = replace(fs, extra={**fs.extra, **_did(timings, tool_calls, fresh=fresh)})
    return [r for r in results if r is not None]
