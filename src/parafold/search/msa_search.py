"""Running the searches of one protein and writing AlphaFold's `msas/` files (nothing else).

Three streams run at the same time (ParaFold's CPU optimization): jackhmmer on UniRef90 and
then hhsearch on PDB70 with that MSA; jackhmmer on MGnify; hhblits on BFD + UniRef30 (or
jackhmmer on small BFD). Each output file is written atomically and followed by a small timing
record, so a killed run keeps every finished search and the rerun only does the rest.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from alphafold.data import parsers

from parafold.errors import (
    PipelineError,
    ToolError,
    ToolFailedError,
    ToolKilledError,
    ToolTimeoutError,
)
from parafold.search.budget import CpuBudget
from parafold.search.databases import DatabaseSet
from parafold.search.settings import SearchSettings
from parafold.search.tools import HHBlits, HHSearch, Jackhmmer, ToolRun
from parafold.store import atomic_write_json, atomic_write_text, read_json

__all__ = ["MSA_FILES", "QUERY_NAME", "ToolTiming", "MsaSearchResult", "SearchCancelledError",
           "msa_files_for", "run_searches"]

logger = logging.getLogger(__name__)

MSA_FILES = {
    "uniref90": "uniref90_hits.sto",
    "mgnify": "mgnify_hits.sto",
    "bfd": "bfd_uniref_hits.a3m",
    "small_bfd": "small_bfd_hits.sto",
    "pdb70": "pdb_hits.hhr",
}
# The query's name inside every MSA: fixed, so identical sequences share results (the cache key
# has no id in it). Target ids go into the features' `domain_name`.
QUERY_NAME = "query"
_TIMINGS = ".timings"


def msa_files_for(preset: str, *, templates: bool = True) -> tuple[str, ...]:
    bfd = "small_bfd" if preset == "reduced_dbs" else "bfd"
    names = ("uniref90", "mgnify", bfd) + (("pdb70",) if templates else ())
    return tuple(MSA_FILES[k] for k in names)


class SearchCancelledError(PipelineError):
    """Another search of the same protein failed, so this one was not started."""


@dataclass(frozen=True, slots=True)
class ToolTiming:
    """One search step: its cost over all attempts, or `reused` from an earlier run's file."""

    step: str
    wall_s: float
    cpu_s: float
    threads: int
    attempts: int
    reused: bool = False
    max_rss_mib: float = 0.0  # peak memory of the attempt that finished (0: not measured)


@dataclass(frozen=True, slots=True)
class MsaSearchResult:
    msa_dir: Path
    timings: tuple[ToolTiming, ...]
    wall_s: float

    @property
    def tool_calls(self) -> int:
        return sum(t.attempts for t in self.timings if not t.reused)


@dataclass(frozen=True, slots=True)
class _Ctx:
    msa_dir: Path
    query_fasta: Path
    databases: DatabaseSet
    settings: SearchSettings
    budget: CpuBudget
    threads: int
    cancel: threading.Event


def _run_step(ctx: _Ctx, step: str, out_name: str,
              call: Callable[[int, Path], ToolRun], finish: Callable[[Path], str]) -> ToolTiming:
    """Run one tool with retries under the budget; write its output file, then its timing.

    An attempt killed by SIGKILL (most likely out of memory: the searches side by side share
    the node's memory) is retried alone: it waits until no other tool of the budget runs, and
    none starts before it.
    """
    out = ctx.msa_dir / out_name
    timing_file = ctx.msa_dir / _TIMINGS / f"{step}.json"
    if _reusable(out, timing_file):
        return ToolTiming(**{**read_json(timing_file), "reused": True})
    wall = cpu = 0.0
    last: ToolError | None = None
    for attempt in range(1, ctx.settings.retries + 2):
        if ctx.cancel.is_set():
            raise SearchCancelledError(f"{step}: not started, another search failed")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{step}-", dir=ctx.msa_dir.parent))
        alone = isinstance(last, ToolKilledError)
        try:
            with ctx.budget.alone() if alone else ctx.budget.hold(ctx.threads) as held:
                cores = min(held, ctx.threads)  # alone, it holds every core, with its threads
                started = time.monotonic()
                try:
                    run = call(cores, tmp)
                    text = _checked_output(run, out_name, finish, tmp)
                except (ToolFailedError, ToolTimeoutError) as exc:
                    wall += time.monotonic() - started
                    last = exc
                    again = (", retried alone" if isinstance(exc, ToolKilledError)
                             and attempt <= ctx.settings.retries else "")
                    logger.warning("%s attempt %d%s failed%s: %s", step, attempt,
                                   " (alone)" if alone else "", again, exc)
                    continue
            wall += run.wall_s
            cpu += run.cpu_s
            atomic_write_text(out, text)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        timing = ToolTiming(step, round(wall, 3), round(cpu, 3), cores, attempt,
                            max_rss_mib=run.max_rss_mib)
        atomic_write_json(timing_file, asdict(timing))
        return timing
    assert last is not None
    last.add_note(f"{step} failed after {ctx.settings.retries + 1} attempts")
    raise last


def _output_problem(out_name: str, text: str) -> str:
    """What is wrong with a search output ("": ok): A3M and HHR parsed as `build_features`
    will parse them; a Stockholm file (jackhmmer's, up to hundreds of MB on UniRef90, parsed
    once, later) checked for its header, a sequence line and its closing `//`."""
    if not text.strip():
        return "it is empty"
    suffix = Path(out_name).suffix
    if suffix == ".sto":
        return _stockholm_problem(text)
    try:
        if suffix == ".hhr":
            parsers.parse_hhr(text)
            return ""
        msa = (parsers.parse_stockholm if suffix == ".sto" else parsers.parse_a3m)(text)
    except (ValueError, IndexError, KeyError) as exc:
        return f"it does not parse: {exc!r}"
    if len(msa) == 0:
        return "it holds no sequence"
    if len({len(seq) for seq in msa.sequences}) > 1:
        return "its rows align to different lengths (cut short?)"
    return ""


_SEQUENCE_LINE = re.compile(r"^(?![#/])\S", re.MULTILINE)  # a line not markup or blank


def _stockholm_problem(text: str) -> str:
    if not text.lstrip().startswith("# STOCKHOLM"):
        return "it is not a Stockholm file"
    if text.rstrip().rsplit("\n", 1)[-1].strip() != "//":
        return "it is cut short (no closing //)"
    if _SEQUENCE_LINE.search(text) is None:
        return "it holds no sequence"
    return ""


def _reusable(out: Path, timing_file: Path) -> bool:
    """Whether an earlier run finished this step. An unusable output stored by a version that
    did not check outputs is searched again, or the target would fail at every rerun."""
    if not (out.is_file() and timing_file.is_file()):
        return False
    try:
        problem = _output_problem(out.name, out.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"it cannot be read: {exc}"
    if problem:
        logger.warning("%s: stored search output unusable (%s); searching again", out, problem)
    return not problem


def _checked_output(run: ToolRun, out_name: str, finish: Callable[[Path], str],
                    tmp: Path) -> str:
    """The step's output text, refused when the tool exited 0 but left it missing, empty or
    cut short (a full disk it ignored): stored, every rerun would reuse it and fail again.

    Raises:
        ToolFailedError: the output is unusable (an attempt that failed: it is retried).
    """
    try:
        text = finish(tmp)
    except OSError as exc:
        text, problem = "", f"it cannot be read: {exc.strerror}"
    else:
        problem = _output_problem(out_name, text)
    if problem:
        raise ToolFailedError(list(run.cmd), run.returncode,
                              f"but its output for {out_name} is unusable: {problem}")
    return text


def _jackhmmer_step(ctx: _Ctx, db_name: str, max_hits: int | None) -> ToolTiming:
    s = ctx.settings
    database = ctx.databases.require(db_name)

    def call(cores: int, tmp: Path) -> ToolRun:
        tool = Jackhmmer(database=database, binary=s.jackhmmer_binary, cpus=cores,
                         n_iter=s.jackhmmer_n_iter, e_value=s.jackhmmer_e_value,
                         filter_f1=s.jackhmmer_filters[0], filter_f2=s.jackhmmer_filters[1],
                         filter_f3=s.jackhmmer_filters[2], timeout_s=s.timeout_s)
        return tool.run(ctx.query_fasta, tmp / "out.sto")

    def finish(tmp: Path) -> str:
        if max_hits is None:
            return (tmp / "out.sto").read_text()
        return parsers.truncate_stockholm_msa(str(tmp / "out.sto"), max_hits)

    return _run_step(ctx, f"jackhmmer_{db_name}", MSA_FILES[db_name], call, finish)


def _hhblits_step(ctx: _Ctx) -> ToolTiming:
    s = ctx.settings
    dbs = [ctx.databases.require("bfd"), ctx.databases.require("uniref30")]

    def call(cores: int, tmp: Path) -> ToolRun:
        tool = HHBlits(databases=dbs, binary=s.hhblits_binary, cpus=cores,
                       n_iter=s.hhblits_n_iter, e_value=s.hhblits_e_value,
                       maxseq=s.hhblits_maxseq, realign_max=s.hhblits_realign_max,
                       maxfilt=s.hhblits_maxfilt,
                       min_prefilter_hits=s.hhblits_min_prefilter_hits, timeout_s=s.timeout_s)
        return tool.run(ctx.query_fasta, tmp / "out.a3m")

    return _run_step(ctx, "hhblits_bfd_uniref30", MSA_FILES["bfd"], call,
                     lambda tmp: (tmp / "out.a3m").read_text())


def template_query_a3m(uniref90_sto: str) -> str:
    """AlphaFold's template-search input: the UniRef90 MSA deduplicated, gap columns dropped."""
    msa = parsers.deduplicate_stockholm_msa(uniref90_sto)
    msa = parsers.remove_empty_columns_from_stockholm_msa(msa)
    return parsers.convert_stockholm_to_a3m(msa)


def _hhsearch_step(ctx: _Ctx) -> ToolTiming:
    s = ctx.settings
    dbs = [ctx.databases.require("pdb70")]
    sto = (ctx.msa_dir / MSA_FILES["uniref90"]).read_text()

    def call(cores: int, tmp: Path) -> ToolRun:
        (tmp / "query.a3m").write_text(template_query_a3m(sto))
        tool = HHSearch(databases=dbs, binary=s.hhsearch_binary, cpus=cores,
                        maxseq=s.hhsearch_maxseq, timeout_s=s.timeout_s)
        return tool.run(tmp / "query.a3m", tmp / "out.hhr")

    return _run_step(ctx, "hhsearch_pdb70", MSA_FILES["pdb70"], call,
                     lambda tmp: (tmp / "out.hhr").read_text())


def _streams(ctx: _Ctx) -> list[Callable[[], list[ToolTiming]]]:
    s = ctx.settings

    def uniref_then_templates() -> list[ToolTiming]:
        first = _jackhmmer_step(ctx, "uniref90", s.uniref_max_hits)
        return [first, _hhsearch_step(ctx)] if s.use_templates else [first]

    def bfd() -> list[ToolTiming]:
        if s.use_small_bfd:
            return [_jackhmmer_step(ctx, "small_bfd", None)]
        return [_hhblits_step(ctx)]

    return [uniref_then_templates, lambda: [_jackhmmer_step(ctx, "mgnify", s.mgnify_max_hits)],
            bfd]


def run_searches(sequence: str, msa_dir: Path, *, databases: DatabaseSet,
                 settings: SearchSettings, budget: CpuBudget | None = None, threads: int = 1,
                 concurrent: bool = True) -> MsaSearchResult:
    """All searches of one protein into `msa_dir`; finished files from a killed run are kept.

    Raises:
        ToolError: a search failed after its retries (the first failure; the other searches
            finished or were not started).
    """
    msa_dir.mkdir(parents=True, exist_ok=True)
    budget = budget or CpuBudget(max(1, threads) * 3)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".tmp-query-", dir=msa_dir.parent) as qdir:
        query = Path(qdir) / "query.fasta"
        query.write_text(f">{QUERY_NAME}\n{sequence}\n")
        ctx = _Ctx(msa_dir, query, databases, settings, budget, threads, threading.Event())
        streams = _streams(ctx)
        timings: list[ToolTiming] = []
        errors: list[BaseException] = []

        def guarded(stream: Callable[[], list[ToolTiming]]) -> list[ToolTiming]:
            try:
                return stream()
            except BaseException as exc:
                ctx.cancel.set()
                errors.append(exc)
                return []

        if concurrent:
            with ThreadPoolExecutor(len(streams), thread_name_prefix="search") as pool:
                for result in pool.map(guarded, streams):
                    timings.extend(result)
        else:
            for stream in streams:
                timings.extend(guarded(stream))
    real = [e for e in errors if not isinstance(e, SearchCancelledError)]
    if real or errors:
        raise (real or errors)[0]
    return MsaSearchResult(msa_dir, tuple(timings), round(time.monotonic() - started, 3))
