"""Targets with identical features are predicted once; the others get copies of the files.

Proteomes, metagenomes and screens repeat sequences: the same protein under two accessions,
a gene on two contigs. The CPU stage already searches such a sequence once (its features have
one content key, `FeatureSet.key`: the sequence, the databases' fingerprints, the search
settings). The GPU stage would still predict each copy, and AlphaFold's result is the same for
both: the seeds come from the model and `--random-seed`, never from the target. So one target
of each key, the *source*, is predicted, and every *twin* gets the source's files.

A copy is what predicting the twin would have written: every per-prediction file byte for
byte, except the ranked mmCIFs, which name their target: the source's with the twin's name in
their header (`mmcif.renamed`). `ranking_debug.json`
goes last, as after a prediction, so a killed copy is redone and a finished one never is.
Files are copied, not hard-linked: editing one target's file must not change another's.
Feature sets without a key (a `features.pkl` from elsewhere) are never twins.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from parafold.errors import OutputError, PipelineError, is_storage_full
from parafold.featureset import FeatureSet
from parafold.fold.outputs import (
    DONE_FILE,
    SETTINGS_KEY,
    is_complete,
    is_prediction_file,
    made_with,
    merge_timings,
    remove_stale,
)
from parafold.fold.reuse import PredictionIndex, done_stamp
from parafold.fold.worker import FoldOutcome
from parafold.relax import RELAX_METRICS_FILE, read_relax_metrics
from parafold.store import atomic_copy, atomic_write_text, atomic_writer

__all__ = ["TwinPlan", "CopiedPrediction", "plan_twins", "copy_prediction",
           "second_sources", "copy_twins", "with_twins"]

log = logging.getLogger(__name__)

# Copied after every other file: it marks the relaxed models (only when their files are there).
_LAST_BEFORE_DONE = (RELAX_METRICS_FILE,)
_RANKED_CIF = "ranked_{}.cif"


@dataclass(frozen=True, slots=True)
class TwinPlan:
    """`fold`: the sets to predict (sources, sets predicted before, sets without a twin), in
    their given order; `twins`: source name -> the sets that get copies of its files after it
    is predicted; `found`: a folder predicted before (`fold.reuse`) -> the sets that get
    copies of its files at once."""

    fold: list[FeatureSet]
    twins: dict[str, list[FeatureSet]] = field(default_factory=dict)
    found: dict[Path, list[FeatureSet]] = field(default_factory=dict)
    # each found folder's `reuse.done_stamp` as indexed: the copies check it still holds
    stamps: dict[Path, list[int | None]] = field(default_factory=dict)

    @property
    def copies(self) -> int:
        return sum(len(t) for t in (*self.twins.values(), *self.found.values()))


def plan_twins(feature_sets: Sequence[FeatureSet], out_root: Path,
               index: PredictionIndex | None = None, *,
               fingerprint: str | None = None) -> TwinPlan:
    """One source per twin key: a set whose prediction is complete in `out_root` (made with
    the settings of `fingerprint`, when given) if there is one (nothing to predict), else a
    folder the prediction `index` knows (another OUT's), else the first set. Sets complete
    themselves are never copied to."""
    out_root = Path(out_root)
    groups: dict[str, list[FeatureSet]] = {}
    for fs in feature_sets:
        key = fs.twin_key
        if key is not None:
            groups.setdefault(key, []).append(fs)
    complete = {fs.name for group in groups.values() if len(group) > 1 or index is not None
                for fs in group if is_complete(out_root / fs.name, fingerprint)}
    copied: set[str] = set()
    twins: dict[str, list[FeatureSet]] = {}
    found: dict[Path, list[FeatureSet]] = {}
    stamps: dict[Path, list[int | None]] = {}
    for group in groups.values():
        todo = [fs for fs in group if fs.name not in complete]
        if not todo or (len(group) < 2 and index is None):
            continue
        if len(todo) == len(group) and index is not None:
            hit = index.find_stamped(todo[0].twin_key, not_in=out_root / todo[0].name)
            if hit is not None:
                folder, stamps[hit[0]] = hit
                found.setdefault(folder, []).extend(todo)
                copied.update(fs.name for fs in todo)
                continue
        source = next((fs for fs in group if fs.name in complete), group[0])
        rest = [fs for fs in todo if fs is not source]
        if rest:
            twins[source.name] = rest
            copied.update(fs.name for fs in rest)
    return TwinPlan([fs for fs in feature_sets if fs.name not in copied], twins, found, stamps)


def with_twins(parts: Sequence[Sequence[FeatureSet]], plan: TwinPlan) -> list[list[FeatureSet]]:
    """Parts of `plan.fold` (a job array's shards), each with the twins of its sources: the
    task that predicts a source copies its twins, and no other task predicts them again."""
    return [[*part, *(twin for fs in part for twin in plan.twins.get(fs.name, ()))]
            for part in parts]


@dataclass(frozen=True, slots=True)
class CopiedPrediction:
    """A twin's files, copied from `source`: its ranking (best first) and best scores."""

    name: str
    source: str
    order: tuple[str, ...]
    mean_plddt: float | None
    ptm: float | None
    seconds: float


def copy_prediction(source_dir: Path, twin_dir: Path, twin_name: str, *,
                    expect: Sequence[int | None] | None = None) -> CopiedPrediction:
    """Give `twin_dir` the prediction files of the complete `source_dir` (see the module
    docstring); its own files (features, MSAs, search timings) stay. `expect`: the source's
    `reuse.done_stamp` when it was found in the prediction index.

    A source that changes meanwhile (predicted again with other settings, relaxed: another
    OUT's folder, found long before the copy runs) is not copied: its stamp must be `expect`
    and stay what it was at the start, and no relaxation may be under way in it (a relaxed
    file its relaxation marker does not name yet). The twin is then predicted itself.

    Raises:
        OutputError: the source has no complete prediction, one of its files is unreadable, or
            it changed (see above).
        OSError: a file could not be written (a full disk among them).
    """
    started = time.perf_counter()
    source_dir, twin_dir = Path(source_dir), Path(twin_dir)
    done = source_dir / DONE_FILE

    def refuse(why: str) -> OutputError:
        return OutputError(f"{twin_name}: cannot copy the prediction of {source_dir.name}: "
                           f"{why}")

    try:
        stamp = done_stamp(source_dir)
        marker = done.read_bytes()
        ranking = json.loads(marker.decode("utf-8"))
        order = [str(n) for n in ranking["order"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise refuse(f"no readable {DONE_FILE} ({exc})") from exc
    if expect is not None and stamp != list(expect):
        raise refuse("it was predicted or relaxed again since it was indexed")
    files = sorted(p.name for p in source_dir.iterdir()
                   if p.is_file() and is_prediction_file(p.name))
    relaxing = sorted(set(_relaxed_models(files)) - set(read_relax_metrics(source_dir)))
    if relaxing:
        raise refuse(f"its relaxation of {', '.join(relaxing)} is under way")
    missing = [name for i, model in enumerate(order)
               for name in (f"unrelaxed_{model}.pdb", f"ranked_{i}.pdb", _RANKED_CIF.format(i))
               if name not in files]
    if missing:  # a folder cleaned up in part since: the twin is predicted instead
        raise OutputError(f"{twin_name}: cannot copy the prediction of {source_dir.name}: "
                          f"it lacks {', '.join(missing[:3])}"
                          f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    last = [n for n in _LAST_BEFORE_DONE if n in files]
    (twin_dir / DONE_FILE).unlink(missing_ok=True)  # an old prediction's: not done till the end
    written: set[str] = set()
    for name in [n for n in files if n not in last] + last:
        if name.startswith("ranked_") and name.endswith(".cif"):
            continue  # written below for the twin's name
        try:
            atomic_copy(source_dir / name, twin_dir / name, link=False)
        except FileNotFoundError as exc:  # gone from the source since it was listed
            raise refuse(f"it changed while it was copied ({name} went)") from exc
        written.add(name)
    for index in range(len(order)):
        cif_name = _RANKED_CIF.format(index)
        atomic_write_text(twin_dir / cif_name, _twin_mmcif(source_dir, index, twin_name))
        written.add(cif_name)
    remove_stale(twin_dir, written)
    try:
        changed = done_stamp(source_dir) != stamp
    except OSError:
        changed = True
    if changed:  # what was copied may mix two predictions: not done, predicted instead
        raise refuse("it changed while it was copied")
    seconds = time.perf_counter() - started
    # a source in the twin's OUT by its name, any other by its folder (as the ledger says)
    same_out = source_dir.resolve().parent == twin_dir.resolve().parent
    copied_from = source_dir.name if same_out else str(source_dir.resolve())
    made = made_with(source_dir)  # the settings it was made with, as predicting would say
    merge_timings(twin_dir / "timings.json",  # the keys of `outputs.COPY_TIMINGS`
                  {"copy_prediction": round(seconds, 3), "copied_from": copied_from,
                   **({SETTINGS_KEY: made} if made is not None else {})},
                  drop=(SETTINGS_KEY,))
    with atomic_writer(twin_dir / DONE_FILE, "wb") as handle:  # the marker checked above
        handle.write(marker)
    best = order[0] if order else None
    mean_plddt, ptm = _best_scores(twin_dir, best, ranking)
    log.info("%s: same features as %s; its prediction copied (%d files, %.2f s)", twin_name,
             source_dir.name, len(written) + 1, seconds)
    return CopiedPrediction(twin_name, source_dir.name, tuple(order), mean_plddt, ptm, seconds)


def _relaxed_models(files: Sequence[str]) -> list[str]:
    return [name[len("relaxed_"):-len(".pdb")] for name in files
            if name.startswith("relaxed_") and name.endswith(".pdb")]


def _twin_mmcif(source_dir: Path, index: int, twin_name: str) -> str:
    """The source's `ranked_<index>.cif` under the twin's name; rebuilt from `ranked_<index>
    .pdb` only where that file is missing or not as parafold writes it (older versions)."""
    from alphafold.common import protein

    from parafold.fold import mmcif as fast_mmcif

    try:
        text = fast_mmcif.renamed(
            (source_dir / _RANKED_CIF.format(index)).read_text(encoding="utf-8"), twin_name)
    except (OSError, ValueError):
        text = None
    if text is not None:
        return text
    pdb_name = f"ranked_{index}.pdb"
    try:
        prot = protein.from_pdb_string((source_dir / pdb_name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{twin_name}: cannot read {source_dir.name}/{pdb_name}: "
                          f"{exc}") from exc
    return fast_mmcif.to_mmcif(prot, file_id=twin_name, model_type="Monomer")


def _best_scores(folder: Path, best: str | None, ranking: dict[str, object]
                 ) -> tuple[float | None, float | None]:
    """The best prediction's mean pLDDT and pTM, for the ledger (what a prediction reports)."""
    if best is None:
        return None, None
    plddts = ranking.get("plddts")
    mean_plddt = plddts.get(best) if isinstance(plddts, dict) else None
    ptm = None
    try:
        scores = json.loads((folder / f"scores_{best}.json").read_text(encoding="utf-8"))
        ptm = scores.get("ptm") if isinstance(scores, dict) else None
    except (OSError, ValueError):
        pass
    return (float(mean_plddt) if isinstance(mean_plddt, int | float) else None,
            float(ptm) if isinstance(ptm, int | float) else None)


def second_sources(plan: TwinPlan, outcomes: Mapping[str, FoldOutcome]
                   ) -> tuple[TwinPlan, TwinPlan]:
    """After the sources ran: (the twins whose source did, `plan` less the others) and a plan
    for the others, whose source failed for a reason of its own: the first twin of each is
    predicted itself (a damaged feature file fails only its own target), the rest copy it.
    Twins of a source stopped by a full disk or a drain wait for the rerun with it."""
    kept: dict[str, list[FeatureSet]] = {}
    fold: list[FeatureSet] = []
    again: dict[str, list[FeatureSet]] = {}
    for source, twins in plan.twins.items():
        done = outcomes[source]
        if done.ok or done.stopped_early:
            kept[source] = twins
            continue
        first, *rest = twins
        fold.append(first)
        if rest:
            again[first.name] = rest
    return TwinPlan(plan.fold, kept, plan.found, plan.stamps), TwinPlan(fold, again)


def copy_twins(plan: TwinPlan, outcomes: Mapping[str, FoldOutcome], out_root: Path, *,
               threads: int = 4) -> dict[str, FoldOutcome]:
    """Each copy's outcome: a twin's after its source's (`outcomes`), its source's failure
    when that failed (a full disk or a drain that stopped the source stops its twins too),
    and the copies from folders predicted before."""
    out_root = Path(out_root)
    results: dict[str, FoldOutcome] = {}
    with cf.ThreadPoolExecutor(max(1, threads), thread_name_prefix="twin-copy") as pool:
        copying: dict[cf.Future[CopiedPrediction], tuple[FeatureSet, str]] = {}
        for folder, sets in plan.found.items():
            for fs in sets:
                copying[pool.submit(copy_prediction, folder, out_root / fs.name, fs.name,
                                    expect=plan.stamps.get(folder))] = (fs, str(folder))
        for source, twins in plan.twins.items():
            done = outcomes[source]
            for fs in twins:
                if done.ok:
                    copying[pool.submit(copy_prediction, out_root / source, out_root / fs.name,
                                        fs.name)] = (fs, source)
                    continue
                results[fs.name] = FoldOutcome(
                    name=fs.name, ok=False, length=fs.length, output_dir=out_root / fs.name,
                    error=f"{fs.name}: same features as {source}, which failed: {done.error}",
                    stopped_early=done.stopped_early)
        for future, (fs, source) in copying.items():
            try:
                copied = future.result()
            except (PipelineError, OSError) as exc:
                log.error("%s: copying the prediction of %s failed: %s", fs.name, source, exc)
                results[fs.name] = FoldOutcome(
                    name=fs.name, ok=False, length=fs.length, output_dir=out_root / fs.name,
                    error=f"{fs.name}: copying the prediction of {source} failed: {exc}",
                    stopped_early=is_storage_full(exc))
                continue
            results[fs.name] = FoldOutcome(
                name=fs.name, ok=True, timings={"copy_prediction": round(copied.seconds, 3)},
                mean_plddt=copied.mean_plddt, ptm=copied.ptm, ranked_model_names=copied.order,
                length=fs.length, output_dir=out_root / fs.name, copied_from=source)
    return results
