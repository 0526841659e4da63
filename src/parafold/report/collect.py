"""Gather what a run left in OUT into one JSON-ready dict for the report page.

Two sources, both optional: the ledger (`OUT/parafold.sqlite`: states, errors, timings, the
worker events of the timeline) and the target folders (scores, rankings, plots, structures).
Targets seen in either appear; a field nobody wrote is `null`, never a crash, so a report of a
run still going, or of a folder copied without its ledger, still opens.

`collect` reads both once into one `_Row` per target; `collect_run` turns that into the page's
data and `results_table` into `OUT/results.tsv`. Rows are stored in the page as arrays in
`COLUMNS` order, not as objects: at 10,000 targets the keys would be most of the page.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parafold.relax import RELAX_METRICS_FILE
from parafold.report.plots import COVERAGE_PNG, PAE_PNG, PLDDT_PNG, model_order, plddt_of

__all__ = ["COLUMNS", "FLAG_PLDDT", "FLAG_PAE", "FLAG_COVERAGE", "FLAG_STRUCTURE",
           "STRUCTURE_JS", "RANKED_PDB", "Collected", "collect", "collect_run", "is_target_dir"]

log = logging.getLogger(__name__)

COLUMNS = ["name", "length", "msa_depth", "plddt", "ptm", "search_s", "predict_s", "state",
           "error", "flags", "model"]
FLAG_PLDDT, FLAG_PAE, FLAG_COVERAGE, FLAG_STRUCTURE = 1, 2, 4, 8
STRUCTURE_JS = "ranked_0.pdb.js"
RANKED_PDB = "ranked_0.pdb"
_MARKERS = ("features.json", "ranking_debug.json", RANKED_PDB, "timings.json", "msas")


@dataclass(slots=True)
class _Row:
    name: str
    length: int | None = None
    msa_depth: int | None = None
    plddt: float | None = None
    ptm: float | None = None
    search_s: float | None = None
    predict_s: float | None = None
    state: str = "unknown"
    error: str | None = None
    flags: int = 0
    model: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    # Not on the page, in OUT/results.tsv only: the record id as given in the input, the
    # best model's max PAE, whether it was relaxed, whether the folder holds ranked_0.pdb,
    # the most memory one of its search tools took, the target its prediction was copied from,
    # the templates its features hold.
    target_id: str | None = None
    max_pae: float | None = None
    relaxed: bool = False
    has_ranked_pdb: bool = False
    search_max_rss_mib: float | None = None
    copied_from: str | None = None
    templates: int | None = None

    def as_list(self) -> list[Any]:
        return [getattr(self, c) for c in COLUMNS]


def is_target_dir(path: Path) -> bool:
    """Whether a subfolder of OUT looks like one target's output folder."""
    return path.is_dir() and not path.name.startswith(".") and any(
        (path / m).exists() for m in _MARKERS)


def _json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    """An int from a JSON field, None for one that is not ("n/a", NaN, inf, a list): one
    hand-edited or foreign file must not stop the report of every target."""
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _round(value: float | None, digits: int) -> float | None:
    value = _num(value)
    return None if value is None else round(value, digits)


# The state shown for a target the latest run's input no longer holds, left unfinished by an
# earlier run: no run works on it, so "searching" or "predicting" would wait for ever.
REMOVED = "removed"
_FINAL = ("done", "failed")


def _read_ledger(out_dir: Path) -> tuple[list[Any], list[Any], list[Any], list[Any],
                                         set[str] | None]:
    """Targets, events, runs and worker events from the ledger, and the names in the latest
    run's input (None: not recorded); empty when there is no ledger."""
    from parafold.errors import SchedulerError

    try:
        from parafold.ledger import LEDGER_FILE, Ledger
    except ImportError:  # a tree without the pipeline: folders only
        return [], [], [], [], None
    if not (out_dir / LEDGER_FILE).is_file():
        return [], [], [], [], None
    try:
        with Ledger(out_dir, readonly=True) as ledger:
            runs = ledger.runs()
            latest = runs[-1].id if runs else None
            in_latest = ({r.name for r in ledger.targets(run_id=latest)}
                         if latest is not None and ledger.has_run_targets(latest) else None)
            return ledger.targets(), ledger.events(), runs, ledger.worker_events(), in_latest
    except (SchedulerError, sqlite3.Error, OSError, ValueError) as exc:
        log.warning("%s: ledger unreadable (%s); report from folders only", out_dir, exc)
        return [], [], [], [], None


def _fill_from_folder(row: _Row, folder: Path) -> None:
    """Scores, depth and files from the folder; its state only where the ledger had none."""
    folder_state = "unknown"
    manifest = _json(folder / "features.json")
    if isinstance(manifest, dict):
        row.msa_depth = _int(manifest.get("msa_depth")) or None
        if isinstance(manifest.get("num_templates"), int):
            row.templates = manifest["num_templates"]
        seq = manifest.get("sequence")
        if row.length is None and isinstance(seq, str):
            row.length = len(seq)
        if row.target_id is None and isinstance(manifest.get("target_id"), str):
            row.target_id = manifest["target_id"]
        folder_state = "features_ready"
    order = model_order(folder)
    ranking = _json(folder / "ranking_debug.json") if order else None
    if order:
        row.model = order[0]
        folder_state = "done"
    scores = _json(folder / f"scores_{order[0]}.json") if order else None
    if isinstance(scores, dict):
        curve = plddt_of(scores)
        row.plddt = _num(scores.get("mean_plddt")) or (
            float(curve.mean()) if curve is not None else None)
        row.ptm = _num(scores.get("ptm"))
        row.max_pae = _num(scores.get("max_pae"))
        if row.length is None and curve is not None:
            row.length = int(curve.size)
    if order:  # relaxed as `parafold.relax` counts it: a metrics entry and its structure
        metrics = _json(folder / RELAX_METRICS_FILE)
        row.relaxed = (isinstance(metrics, dict) and order[0] in metrics
                       and (folder / f"relaxed_{order[0]}.pdb").is_file())
    if row.plddt is None and isinstance(ranking, dict):
        plddts = ranking.get("plddts")
        if isinstance(plddts, dict):
            row.plddt = _num(plddts.get(order[0]))
    if row.state == "unknown":
        row.state = folder_state
    if not row.timings.get("predict") or row.search_max_rss_mib is None:
        timings = _json(folder / "timings.json")
        if isinstance(timings, dict):
            if not row.timings.get("predict"):  # the ledger's wins: never count them twice
                row.timings["predict"] = timings
            if row.search_max_rss_mib is None:
                row.search_max_rss_mib = _num(timings.get("search_max_rss_mib"))
            if row.copied_from is None and isinstance(timings.get("copied_from"), str) \
                    and folder_state == "done":
                row.copied_from = timings["copied_from"]
    if not order:  # no done marker (failed, or queued again): structure and plots are stale
        return
    row.has_ranked_pdb = (folder / RANKED_PDB).is_file()
    for flag, name in ((FLAG_PLDDT, PLDDT_PNG), (FLAG_PAE, PAE_PNG),
                       (FLAG_COVERAGE, COVERAGE_PNG), (FLAG_STRUCTURE, STRUCTURE_JS)):
        if (folder / name).is_file():
            row.flags |= flag


def _compile_stats(timings: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
    """Compiles and their seconds from timing dicts: keys naming 'compile' anywhere inside.

    An explicit count (a key with 'compile' and 'count' or 'n_') wins over counting non-zero
    compile times; nested dicts (ledger timings hold {'search': ..., 'predict': ...}) are walked.
    """
    count, seconds, explicit = 0, 0.0, 0

    def walk(obj: Mapping[str, Any]) -> None:
        nonlocal count, seconds, explicit
        for key, value in obj.items():
            if isinstance(value, Mapping):
                walk(value)
                continue
            num = _num(value)
            k = str(key).lower()
            if num is None or "compile" not in k:
                continue
            if "count" in k or k.startswith("n_") or k.endswith("compiles"):
                explicit += int(num)
            elif num > 0:
                seconds += num
                count += 1

    for t in timings:
        walk(t)
    return (explicit or count), seconds


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by possibly overlapping intervals (the members of one batch share one)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _wall_seconds(events: list[Any], runs: list[Any]) -> float:
    """Seconds the runs ran, summed: each run's first to last event, or its recorded start to
    end when it has none. The downtime between a killed run and its resume is no work time,
    so it must not dilute the rate and GPU busy fraction (`parafold status` counts the same).
    A run never ended and without events counts up to now only when no run has events (a run
    still starting); one killed before its first event would count its downtime."""
    spans: dict[Any, tuple[float, float]] = {}
    for e in events:
        if e.end is not None:
            lo, hi = spans.get(e.run_id, (e.start, e.end))
            spans[e.run_id] = (min(lo, e.start), max(hi, e.end))
    now = time.time()
    return sum(hi - lo for lo, hi in spans.values()) + sum(
        (r.ended_at or now) - r.started_at for r in runs
        if r.id not in spans and (r.ended_at is not None or not spans))


def _timeline(events: list[Any], index: Mapping[str, int]) -> tuple[list[dict[str, Any]],
                                                                    list[list[Any]], float]:
    """Lanes (CPU search workers, then GPU predict workers) and events relative to t0."""
    closed = [e for e in events if e.end is not None]
    if not closed:
        return [], [], 0.0
    t0 = min(e.start for e in closed)
    keys = sorted({(e.kind, e.worker) for e in closed},
                  key=lambda kw: (kw[0] != "search", kw[1]))
    lane_of = {kw: i for i, kw in enumerate(keys)}
    lanes = [{"kind": k, "worker": w} for k, w in keys]
    rows = [[lane_of[(e.kind, e.worker)], round(e.start - t0, 3), round(e.end - t0, 3),
             index.get(e.target, -1), 0 if e.ok is False else 1] for e in closed]
    return lanes, rows, t0


@dataclass(frozen=True, slots=True)
class Collected:
    """What a run left in OUT, read once: a `_Row` per target (sorted by name) and the
    ledger's events, runs and worker events (empty without a ledger)."""

    rows: dict[str, _Row]
    events: list[Any]
    runs: list[Any]
    worker_events: list[Any]


def collect(out_dir: Path | str) -> Collected:
    """Read the ledger and every target folder of `out_dir` once (see the module docstring)."""
    out_dir = Path(out_dir)
    records, events, runs, worker_events, in_latest = _read_ledger(out_dir)
    rows: dict[str, _Row] = {}
    for rec in records:
        row = rows.setdefault(rec.name, _Row(rec.name))
        row.length = rec.length
        row.target_id = rec.target_id
        row.state = str(rec.state.value if hasattr(rec.state, "value") else rec.state)
        if in_latest is not None and rec.name not in in_latest and row.state not in _FINAL:
            row.state = REMOVED
        if rec.error:
            stage = f"[{rec.failed_stage}] " if rec.failed_stage else ""
            row.error = stage + rec.error
        if isinstance(rec.timings, Mapping):
            row.timings.update(rec.timings)
            search, predict = rec.timings.get("search"), rec.timings.get("predict")
            if isinstance(search, Mapping):
                row.search_max_rss_mib = _num(search.get("max_rss_mib"))
            if isinstance(predict, Mapping) and isinstance(predict.get("copied_from"), str):
                row.copied_from = predict["copied_from"]
        stamps = rec.stamps
        if "features_ready" in stamps and "searching" in stamps:
            row.search_s = stamps["features_ready"] - stamps["searching"]
        if "done" in stamps and "predicting" in stamps:
            row.predict_s = stamps["done"] - stamps["predicting"]
    for folder in sorted(p for p in out_dir.iterdir() if is_target_dir(p)) \
            if out_dir.is_dir() else []:
        _fill_from_folder(rows.setdefault(folder.name, _Row(folder.name)), folder)

    rows = {n: rows[n] for n in sorted(rows)}
    busy: dict[tuple[str, str], float] = {}  # worker time beats ledger stamps (queue waits)
    for e in events:
        if e.end is not None and e.target in rows and e.kind in ("search", "predict"):
            busy[e.target, e.kind] = busy.get((e.target, e.kind), 0.0) + e.end - e.start
    for (name, kind), seconds in busy.items():
        setattr(rows[name], f"{kind}_s", seconds)
    for row in rows.values():
        predicted = row.timings.get("predict")
        if isinstance(predicted, Mapping):
            row.plddt = row.plddt if row.plddt is not None else _num(predicted.get("mean_plddt"))
            row.ptm = row.ptm if row.ptm is not None else _num(predicted.get("ptm"))
            # a batch's event spans all its members: the GPU stage's own per-target share wins
            own = [_num(v) for k, v in predicted.items() if str(k).startswith("predict_")]
            if own and all(v is not None for v in own):
                row.predict_s = float(sum(v for v in own if v is not None))
        row.search_s, row.predict_s = _round(row.search_s, 2), _round(row.predict_s, 3)
        row.plddt, row.ptm = _round(row.plddt, 2), _round(row.ptm, 4)
    return Collected(rows, events, runs, worker_events)


def collect_run(out_dir: Path | str, collected: Collected | None = None) -> dict[str, Any]:
    """Everything the report page shows, as JSON-ready data (see `COLUMNS` for the rows);
    from `collected` when the caller has read OUT already."""
    out_dir = Path(out_dir)
    c = collected if collected is not None else collect(out_dir)
    rows, events, runs, worker_events = c.rows, c.events, c.runs, c.worker_events
    index = {n: i for i, n in enumerate(rows)}
    lanes, timeline, t0 = _timeline(events, index)
    span = _wall_seconds(events, runs)
    done = [r for r in rows.values() if r.state == "done"]
    failed = [r for r in rows.values() if r.state == "failed"]
    compiles, compile_s = _compile_stats(r.timings.get("predict") or {} for r in rows.values())
    run_timings = _json(out_dir / "timings.json")  # the pipeline's count, when it wrote one
    if isinstance(run_timings, dict) and _num(run_timings.get("compile_count")) is not None:
        compiles = int(run_timings["compile_count"])
    gpu_busy = sum(_union_seconds([(ev[1], ev[2]) for ev in timeline if ev[0] == lane])
                   for lane, info in enumerate(lanes) if info["kind"] == "predict")
    n_gpu = sum(1 for lane in lanes if lane["kind"] == "predict")
    states: dict[str, int] = {}
    for r in rows.values():
        states[r.state] = states.get(r.state, 0) + 1
    summary = {
        "out_dir": str(out_dir.resolve()),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "run_started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)) if t0 else None,
        "targets": len(rows),
        "done": len(done),
        "failed": len(failed),
        "states": states,
        "wall_s": round(span, 1),
        "proteins_per_hour": round(len(done) / span * 3600, 1) if span > 0 and done else None,
        "compiles": compiles,
        "compile_s": round(compile_s, 1),
        "gpu_busy": round(gpu_busy / (span * n_gpu), 3) if span > 0 and n_gpu else None,
        "failures": [[r.name, r.error or "no reason recorded"] for r in failed],
        # fold workers taken out of rotation (a GPU that failed to start or kept failing)
        "workers_retired": [[e.worker, e.reason] for e in worker_events if e.kind == "retired"],
    }
    return {"summary": summary, "columns": COLUMNS,
            "rows": [row.as_list() for row in rows.values()], "lanes": lanes,
            "events": timeline}
