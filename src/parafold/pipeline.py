"""`parafold run`: the CPU and GPU stages overlapped, every transition in the ledger.

targets -> featurize (CPU jobs under the CPU budget; one batch job in MMseqs2 mode) -> ready
list -> grouped by shape, with a bounded wait for a group to fill -> long-lived fold workers ->
OUT/<name>/ -> plots (small CPU jobs) -> OUT/report.html at the end.

The parent process only schedules: it never imports jax, and it is the only writer of the
ledger. On start it reconciles the ledger with what is on disk (disk wins: a manifest means
features are done, the fold marker means the prediction is done), so a run killed at any
moment resumes without redoing finished work. Workers write every file atomically, so a killed
worker leaves nothing a rerun would trust.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from parafold.engine import Executor, make_executor
from parafold.engine.jobs import describe_error
from parafold.engine.scheduler import Scheduler
from parafold.errors import (
    DatabaseNotFoundError,
    InputError,
    PipelineError,
    StorageFullError,
    is_storage_full,
    storage_full_advice,
)
from parafold.featureset import MANIFEST_FILE, FeatureSet, read_feature_set
from parafold.inputs import InputProblem, Target, read_targets
from parafold.ledger import LEDGER_FILE, LOCK_FILE, Ledger, RunLock, State
from parafold.lifecycle import (  # the ledger records these
    EXIT_INTERRUPTED,
    EXIT_STOPPED_EARLY,
    interrupted_code,
)
from parafold.relax import relax_pending
from parafold.report import RESULTS_FILE
from parafold.shards import Shard
from parafold.store import atomic_write_json, read_json

__all__ = ["RunSettings", "RunSummary", "Failure", "run_pipeline", "prediction_complete",
           "RESERVED_NAMES", "EXIT_INTERRUPTED"]

logger = logging.getLogger(__name__)

# Names in OUT that are not target folders (a target may not take them).
RESERVED_NAMES = frozenset({LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm",
                            f"{LEDGER_FILE}-journal", LOCK_FILE, "timings.json", "databases",
                            "params", "report", "report.html", RESULTS_FILE,
                            "demo_queries.fasta"})


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything `parafold run` needs; `search`/`model` are SearchSettings/ModelSettings.

    `cpus` is the CPU budget for searches (0: every core here, or the whole Ray cluster);
    `cpus_per_search` is the share one protein's searches get (0: 3, one per concurrent
    search, capped by the budget); `max_batch` caps the proteins of one shape handed to a fold
    worker at once (the last idle worker may take up to 4 such groups in one call);
    `max_wait_s` bounds how long a worker waits for a same-shape group to fill while searches
    are still running; `plots` draws each finished target's PNGs (the report is written
    either way); `shard` runs only that part of the input (a job array task, its own OUT).
    """

    input: Path
    out: Path
    params_dir: Path
    search: Any
    model: Any
    db_dir: Path | None = None
    db_overrides: tuple[tuple[str, Path], ...] = ()
    cache_dir: Path | None = None
    cpus: int = 0
    cpus_per_search: int = 0
    gpus: tuple[str, ...] | None = None
    engine: str = "local"
    address: str | None = None
    max_batch: int = 32
    max_wait_s: float = 5.0
    progress: bool = True
    log_every_s: float = 30.0
    plots: bool = True
    shard: Shard | None = None

    def __post_init__(self) -> None:
        # absolute: processes elsewhere (Ray tasks run in the folder `ray start` ran in, on
        # their node) must find the same files
        for name in ("input", "out", "params_dir", "db_dir", "cache_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser().absolute())
        object.__setattr__(self, "db_overrides", tuple(
            (db, Path(path).expanduser().absolute()) for db, path in self.db_overrides))
        if self.cpus < 0 or self.cpus_per_search < 0:
            raise InputError("--cpus and --cpus-per-search must be >= 0")
        if self.max_batch < 1 or self.max_wait_s < 0:
            raise InputError("--max-batch must be >= 1 and --max-wait >= 0")

    @property
    def search_cpus(self) -> int:
        """CPUs one protein's searches ask for (the scheduler caps it at the engine's CPUs)."""
        return self.cpus_per_search or 3

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.out / ".cache"

    def describe(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True, slots=True)
class Failure:
    name: str
    stage: str
    error: str

    def __str__(self) -> str:
        return f"{self.name} [{self.stage}]: {self.error}"


@dataclass(frozen=True, slots=True)
class RunSummary:
    """How a run ended. `exit_code` is 0 only when every target and every input record is fine."""

    out: Path
    targets: int
    done: int
    failures: tuple[Failure, ...]
    input_problems: tuple[InputProblem, ...]
    wall_s: float
    searched: int
    predicted: int
    compiles: int | None
    engine: str
    copied: int = 0  # targets given a copy of an identical target's prediction
    from_cache: int = 0  # targets whose features came from the (shared) cache, no search
    # the most memory one search tool of this run took (MiB) and its target: to size --mem by
    search_peak: tuple[float, str] = (0.0, "")
    report: Path | None = None
    stopped: str | None = None  # why the run stopped early: a disk full, a drain, ...
    stop_advice: str = ""  # and what to do before the rerun

    @property
    def left(self) -> int:
        """Targets neither done nor failed: what a rerun would do."""
        return max(0, self.targets - self.done - len(self.failures))

    @property
    def exit_code(self) -> int:
        """75 when stopped early with targets left (a job script requeues on it), else 0
        when every target and input record is fine, else 1."""
        if self.stopped is not None and self.left:
            return EXIT_STOPPED_EARLY
        return 0 if not self.failures and not self.input_problems and \
            self.done == self.targets else 1

    @property
    def proteins_per_hour(self) -> float:
        return self.predicted / self.wall_s * 3600 if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        rate = f", {self.proteins_per_hour:.0f} proteins/hour" if self.predicted else ""
        compiles = f", {self.compiles} compiles" if self.compiles is not None else ""
        copied = (f", {self.copied} copied from identical targets" if self.copied else "")
        cached = f", {self.from_cache} features from the cache" if self.from_cache else ""
        out = [f"{self.done}/{self.targets} targets done in {self.out} "
               f"({self.searched} searched{cached} and {self.predicted} predicted{copied} in "
               "this run, "
               f"{self.wall_s:.1f} s{rate}{compiles})"]
        peak_mib, peak_target = self.search_peak
        if peak_mib:
            size = f"{peak_mib / 1024:.1f} GiB" if peak_mib >= 1024 else f"{peak_mib:.0f} MiB"
            out.append(f"largest search: {size} of memory at its peak ({peak_target}; each "
                       "target's timings.json has its own)")
        if self.failures:
            out.append(f"{len(self.failures)} failed:")
            out.extend(f"  {f}" for f in self.failures)
        if self.input_problems:
            out.append(f"{len(self.input_problems)} input records skipped:")
            out.extend(f"  {p}" for p in self.input_problems)
        if self.stopped is not None and self.left:
            out.append(f"stopped early: {self.stopped}")
            out.append(self.stop_advice or "Rerun the same command to resume.")
        elif self.stopped is not None:
            out.append(f"asked to stop early ({self.stopped}), but nothing was left to do")
        if self.report is not None:
            out.append(f"report: {self.report}")
            table = self.report.with_name(RESULTS_FILE)
            if table.is_file():
                out.append(f"results: {table}")
        return out


def prediction_complete(folder: Path, made: str | None = None) -> bool:
    """Whether the GPU stage finished this target folder (its done marker is there), with
    the model settings and params of `made` (`reuse.prediction_fingerprint`) when given."""
    from parafold.fold.outputs import is_complete

    return bool(is_complete(folder, made))


def _prediction_made(settings: RunSettings) -> str:
    """What this run's predictions record they were made with (relaxation apart)."""
    from parafold.fold.reuse import prediction_fingerprint

    return prediction_fingerprint(settings.model, settings.params_dir, relaxation=False)


def _read_input(settings: RunSettings) -> tuple[list[Target], list[InputProblem]]:
    """The run's targets (its shard's, if one) and the input problems it reports."""
    parsed = read_targets(settings.input)
    targets, problems = [], list(parsed.problems)
    for t in parsed.targets:
        if t.name in RESERVED_NAMES:
            problems.append(InputProblem(t.source, 0, t.id, f"name {t.name!r} is reserved in OUT"))
        else:
            targets.append(t)
    shard = settings.shard
    if shard is None:
        return targets, problems
    mine = shard.own_targets(targets)
    logger.info("%s: %d of the input's %d targets", shard, len(mine), len(targets))
    return mine, shard.problems_to_tell(problems)


def _databases(settings: RunSettings) -> Any:
    from parafold.search import find_databases

    dbs = find_databases(settings.db_dir, settings.search.preset, dict(settings.db_overrides),
                         msa_mode=settings.search.msa_mode,
                         templates=settings.search.use_templates)
    return dbs.fingerprinted()


def _databases_if_found(settings: RunSettings) -> Any:
    """The run's databases, or None when some are missing or none were given: that is fine
    if nothing needs searching (callers raise through `_databases` if something does)."""
    if settings.db_dir is not None or settings.db_overrides or not _needs_databases(settings):
        with contextlib.suppress(DatabaseNotFoundError):
            return _databases(settings)
    return None


def _needs_databases(settings: RunSettings) -> bool:
    """Whether the MSA mode reads databases (precomputed and single-sequence read none)."""
    from parafold.search.databases import required_databases

    return bool(required_databases(settings.search.preset, settings.search.msa_mode))


def _expected_key(target: Target, databases: Any, settings: RunSettings) -> str | None:
    """The key the target's features must have, so a resumed run keeps only matching ones.

    Raises:
        InputError: precomputed mode and the target's MSA file is missing.
    """
    if databases is None:
        return None
    from parafold.search.runner import target_key

    return str(target_key(target, databases, settings.search)[0])


def _usable_features(target: Target, folder: Path, key: str | None) -> FeatureSet | None:
    """The target's finished feature set in OUT, if it is for this sequence (and settings)."""
    try:
        fs = read_feature_set(folder)
    except PipelineError:
        return None
    if fs.sequence != target.sequence or (key is not None and fs.key != key):
        return None
    return fs


def _standing(t: Target, folder: Path, key: str | None, settings: RunSettings,
              made: str | None = None) -> tuple[State, FeatureSet | None]:
    """Where a target stands on disk, with its usable features: DONE (predicted, with the
    settings of `made` when given, and relaxed as asked), FEATURES_READY (features for this
    key: to predict, or to relax) or QUEUED."""
    fs = _usable_features(t, folder, key)
    if fs is None:
        return State.QUEUED, None
    if (prediction_complete(folder, made)
            and not relax_pending(folder, settings.model.models_to_relax)):
        return State.DONE, fs
    return State.FEATURES_READY, fs


def _remove_partial_files(folder: Path) -> None:
    """Temporary files a killed writer left (`.<name>.<random>.part`): never trusted, and safe
    to delete because we hold the run lock, so no live run writes here."""
    for pattern in ("*.part", "*/*.part"):
        for path in folder.glob(pattern):
            logger.debug("removing %s, left by a killed run", path)
            path.unlink(missing_ok=True)


def _forget_stale_prediction(target: Target, folder: Path, key: str | None) -> None:
    """A folder whose features are for another sequence (the input changed under the same
    name), or another search (databases, settings or precomputed MSA changed: another key),
    holds a prediction from those features too: drop its done marker so it is redone from the
    features this run makes."""
    from parafold.fold.outputs import DONE_FILE

    try:
        old = read_json(folder / MANIFEST_FILE)
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    if old.get("sequence") not in (None, target.sequence):
        why = "the sequence changed"
    elif key is not None and old.get("key") not in (None, "", key):
        why = "its features are searched again (databases, settings or MSA changed)"
    else:
        return
    if (folder / DONE_FILE).is_file():
        logger.warning("%s: %s since the last run; predicting it again", target.name, why)
        (folder / DONE_FILE).unlink(missing_ok=True)
    _remove_old_prediction(folder)


def _remove_old_prediction(folder: Path) -> None:
    """The files of a prediction from other features, and what was drawn from them: until the
    new one is made (or if its search fails) no table, report or script may take them for
    this target's."""
    from parafold.fold.outputs import remove_stale
    from parafold.report.collect import STRUCTURE_JS
    from parafold.report.plots import COVERAGE_PNG, PAE_PNG, PLDDT_PNG

    if not folder.is_dir():
        return
    remove_stale(folder, set())
    for name in (STRUCTURE_JS, PLDDT_PNG, PAE_PNG, COVERAGE_PNG):
        (folder / name).unlink(missing_ok=True)


@dataclass(slots=True)
class _Plan:
    to_search: list[Target] = field(default_factory=list)
    ready: list[FeatureSet] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    done_sources: dict[str, str] = field(default_factory=dict)  # twin key -> a done target


def _fail_at_start(ledger: Ledger, name: str, state: State, error: str) -> None:
    """A target that cannot even be keyed (its precomputed MSA is missing) fails alone."""
    logger.warning("%s: %s", name, error)
    if state in (State.DONE, State.FAILED):  # no way from these to FAILED but through QUEUED
        ledger.reconcile(name, State.QUEUED)
    ledger.fail(name, "search", error)


def _reconcile(ledger: Ledger, targets: Sequence[Target], settings: RunSettings,
               databases: Any) -> _Plan:
    """Bring the ledger in line with disk and decide what is left to do."""
    plan = _Plan()
    made = _prediction_made(settings)
    for t in targets:
        folder = settings.out / t.name
        _remove_partial_files(folder)
        rec = ledger.get(t.name)
        state = rec.state if rec is not None else State.QUEUED
        try:
            key = _expected_key(t, databases, settings)
        except InputError as exc:
            _fail_at_start(ledger, t.name, state, str(exc))
            plan.failed.append(t.name)
            continue
        standing, fs = _standing(t, folder, key, settings, made)
        if fs is None:
            _forget_stale_prediction(t, folder, key)
        if fs is not None and standing is State.DONE:
            if state is not State.DONE:
                ledger.reconcile(t.name, State.DONE)
            plan.done.append(t.name)
            twin = fs.twin_key
            if twin is not None:
                plan.done_sources.setdefault(twin, t.name)
        elif fs is not None:  # to predict, or predicted and to relax (the worker sees which)
            if state is not State.FEATURES_READY:
                ledger.reconcile(t.name, State.FEATURES_READY)
            plan.ready.append(fs)
        else:
            if state is not State.QUEUED:
                ledger.reconcile(t.name, State.QUEUED)
            plan.to_search.append(t)
    return plan


@dataclass(frozen=True, slots=True)
class RunPreview:
    """What `run` would do now (`preview_run`): the targets by the work left to each."""

    out: Path
    targets: int
    bad_records: int
    cannot_start: tuple[str, ...]  # "name: reason" (a precomputed MSA missing)
    done: int
    to_relax: int  # predicted; a relaxation asked for is missing
    features_in_out: int
    features_in_cache: int  # searched before: features copied into OUT, no search
    to_search: int
    searches: int  # distinct searches among them: identical sequences are searched once
    to_predict: int  # GPU predictions
    copies: int  # copies of an identical prediction: this run's, or an OUT's sharing the cache
    params_problem: str = ""
    gpu_plan: Any = None  # `costs.StagePlan` of the predictions whose features exist
    gpu_platform: str = "gpu"
    gpu_unplanned: int = 0  # predictions whose features are still to be searched

    def lines(self) -> list[str]:
        out = [f"dry run: nothing searched, predicted or written in {self.out}",
               f"{self.targets} targets ({self.bad_records} bad input records skipped)",
               f"  done: {self.done}" + (f", {self.to_relax} more to relax" if self.to_relax
                                         else ""),
               f"  features: {self.features_in_out} in OUT, {self.features_in_cache} in the "
               f"cache; to search: {self.to_search} targets, {self.searches} distinct searches",
               f"  to predict: {self.to_predict}, and {self.copies} copies of identical "
               "predictions (made in this run, or in an OUT sharing the cache)"]
        if self.gpu_plan is not None and self.gpu_plan.targets:
            out.append(f"  GPU stage of the {self.gpu_plan.targets} to predict whose features "
                       "exist" + (f" ({self.gpu_unplanned} more once searched: their MSA "
                                  "depths are not known yet)" if self.gpu_unplanned else "")
                       + ":")
            out.extend("  " + line for line in self.gpu_plan.lines(self.gpu_platform))
        if self.cannot_start:
            out.append(f"  cannot start: {len(self.cannot_start)}, e.g. {self.cannot_start[0]}")
        if self.params_problem:
            out.append(f"params: {self.params_problem}")
        return out


def preview_run(settings: RunSettings) -> RunPreview:
    """What `run_pipeline(settings)` would do, found without doing it: no lock, no ledger, no
    file written, no search or prediction. To size a job before it is queued: the searches
    (CPU) and predictions (GPU) left once OUT and a shared cache are counted in.

    Raises:
        InputError: the input path or an option is unusable.
        DatabaseNotFoundError: proteins need searching and a database is missing.
    """
    from parafold.featureset import twin_key_of
    from parafold.fold.costs import plan_stage
    from parafold.fold.params import check_params_files
    from parafold.fold.reuse import PredictionIndex
    from parafold.search.runner import cached_feature_set

    targets, problems = _read_input(settings)
    databases = _databases_if_found(settings)
    cache = settings.resolved_cache_dir
    made = _prediction_made(settings)
    counts = dict.fromkeys(("done", "relax", "out", "cache", "search"), 0)
    cannot_start: list[str] = []
    predicted: set[str] = set()  # twin keys of predictions there will be
    # (twin key, folder, features if they exist) of the targets to predict
    pending: list[tuple[str | None, Path, FeatureSet | None]] = []
    searches: set[str] = set()
    for t in targets:
        folder = settings.out / t.name
        try:
            key = _expected_key(t, databases, settings)
        except InputError as exc:
            cannot_start.append(f"{t.name}: {exc}")
            continue
        standing, fs = _standing(t, folder, key, settings, made)
        if fs is not None:
            twin = fs.twin_key
            if standing is State.DONE or prediction_complete(folder, made):
                counts["done" if standing is State.DONE else "relax"] += 1
                predicted.update([twin] if twin else [])
            else:
                counts["out"] += 1
                pending.append((twin, folder, fs))
        elif key is not None and (cached := cached_feature_set(cache, key)) is not None:
            counts["cache"] += 1
            pending.append((twin_key_of(key, t.sequence), folder, cached))
        else:
            counts["search"] += 1
            searches.add(key or t.sequence)
            pending.append((twin_key_of(key, t.sequence) if key else None, folder, None))
    if counts["search"] and databases is None:
        _databases(settings)  # raises: names what is missing
    index = PredictionIndex.for_settings(settings.model.prediction_cache_dir or cache,
                                         settings.model, settings.params_dir)
    copies = 0
    plannable: list[FeatureSet] = []  # predictions whose shapes are known
    for twin, folder, fs in pending:
        if twin is not None and (twin in predicted
                                 or index.find_key(twin, not_in=folder) is not None):
            copies += 1
        elif fs is not None:
            plannable.append(fs)
        predicted.update([twin] if twin else [])
    platform = "cpu" if settings.gpus == () else "gpu"
    params_problem = ""
    if pending or counts["relax"]:
        try:
            check_params_files(settings.params_dir, settings.model.model_names)
        except PipelineError as exc:
            params_problem = f"{exc} (a run would stop here)"
    return RunPreview(
        out=settings.out, targets=len(targets), bad_records=len(problems),
        cannot_start=tuple(cannot_start), done=counts["done"], to_relax=counts["relax"],
        features_in_out=counts["out"], features_in_cache=counts["cache"],
        to_search=counts["search"], searches=len(searches), to_predict=len(pending) - copies,
        copies=copies, params_problem=params_problem,
        gpu_plan=plan_stage(plannable, settings.model, platform), gpu_platform=platform,
        gpu_unplanned=len(pending) - copies - len(plannable))


def run_pipeline(settings: RunSettings, *,
                 executor_factory: Callable[[RunSettings], Executor] | None = None) -> RunSummary:
    """Run (or resume) the whole pipeline on `settings.input` into `settings.out`.

    Raises:
        RunLockedError: another live run holds OUT.
        InputError: the input path or an option is unusable.
        DatabaseNotFoundError: proteins need searching and a database is missing.
    """
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with RunLock(out):
        with Ledger(out) as ledger:
            run_id = ledger.begin_run(settings.describe())
            exit_code = 2
            try:
                summary = _run(settings, ledger, run_id, started,
                               executor_factory or _default_executor)
                exit_code = summary.exit_code
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`lifecycle.Terminated`)
                exit_code = interrupted_code(exc)
                raise
            except SystemExit as exc:  # a library's signal handler (Ray's: exit 15)
                exit_code = exc.code if isinstance(exc.code, int) else 1
                raise
            except Exception as exc:  # the ledger's own disk full: the run cannot go on
                if not is_storage_full(exc):
                    raise
                exit_code = EXIT_STOPPED_EARLY
                raise StorageFullError(f"{describe_error(exc)}. {storage_full_advice(out)}"
                                       ) from exc
            finally:
                _end_run(ledger, run_id, exit_code)
        # Still under the lock, after the run is closed in the ledger: the report shows it ended.
        return replace(summary, report=_write_report(out, plots=settings.plots))


def _end_run(ledger: Ledger, run_id: int, exit_code: int) -> None:
    """Close the run in the ledger; on a full disk that may fail too, and the next run reads
    the run as ended by its process's death, as after a kill."""
    try:
        ledger.end_run(run_id, exit_code)
    except Exception as exc:
        if not is_storage_full(exc):
            raise
        logger.error("could not record the end of the run in the ledger: %s", exc)


def _run(settings: RunSettings, ledger: Ledger, run_id: int, started: float,
         factory: Callable[[RunSettings], Executor]) -> RunSummary:
    targets, problems = _read_input(settings)
    ledger.record_input_problems(run_id, problems)
    for p in problems:
        logger.warning("input: %s", p)
    ledger.register(targets, run_id=run_id)
    databases = _databases_if_found(settings)
    plan = _reconcile(ledger, targets, settings, databases)
    if plan.to_search and databases is None:
        databases = _databases(settings)  # raises: names what is missing
    if plan.to_search or plan.ready:
        from parafold.fold.params import check_params_files

        check_params_files(settings.params_dir, settings.model.model_names)
    logger.info("%d targets: %d done before, %d with features, %d to search, %d failed at start",
                len(targets), len(plan.done), len(plan.ready), len(plan.to_search),
                len(plan.failed))
    with factory(settings) as executor:
        logger.info("%s", executor.describe())
        sched = Scheduler(settings, ledger, run_id, executor, databases, plan.to_search,
                          plan.ready, total=len(targets), done_before=len(plan.done),
                          failed_before=len(plan.failed), done_sources=plan.done_sources)
        sched.run()
    summary = _summary(settings, ledger, targets, problems, started, sched)
    _write_run_timings(settings.out, summary)
    return summary


def _write_report(out: Path, *, plots: bool) -> Path | None:
    """OUT/report.html; a report that cannot be written is logged, never fails the run."""
    from parafold.report import write_report

    try:
        return write_report(out, plots=plots)
    except Exception as exc:  # the predictions are done and on disk; the report is extra
        logger.error("could not write the report in %s: %s", out, exc,
                     exc_info=not is_storage_full(exc))  # a full disk needs no traceback
        return None


def _default_executor(settings: RunSettings) -> Executor:
    return make_executor(settings.engine, cpus=settings.cpus, gpus=settings.gpus,
                         address=settings.address)


def _summary(settings: RunSettings, ledger: Ledger, targets: Sequence[Target],
             problems: Sequence[InputProblem], started: float, sched: Any) -> RunSummary:
    names = {t.name for t in targets}
    records = [r for r in ledger.targets() if r.name in names]
    failures = tuple(Failure(r.name, r.failed_stage or "?", r.error or "no reason recorded")
                     for r in records if r.state is State.FAILED)
    return RunSummary(
        out=settings.out, targets=len(targets),
        done=sum(1 for r in records if r.state is State.DONE), failures=failures,
        input_problems=tuple(problems), wall_s=time.time() - started,
        searched=sched.searched, from_cache=sched.from_cache, predicted=sched.predicted,
        compiles=sched.compiles(),
        engine=settings.engine, copied=sched.copied, search_peak=sched.search_peak,
        stopped=sched.stopped,
        stop_advice=sched.stop_advice)


def _write_run_timings(out: Path, summary: RunSummary) -> None:
    try:
        atomic_write_json(out / "timings.json", {
            "wall_s": round(summary.wall_s, 3), "searched": summary.searched,
            "predicted": summary.predicted, "copied": summary.copied,
            "search_max_rss_mib": summary.search_peak[0],
            "compile_count": summary.compiles,
            "proteins_per_hour": round(summary.proteins_per_hour, 1), "engine": summary.engine,
        })
    except OSError as exc:  # a summary of numbers the ledger keeps too; a full disk says so
        if not is_storage_full(exc):
            raise
        logger.error("could not write %s: %s", out / "timings.json", exc)

