"""ColabFold-style MMseqs2 search of a whole batch of queries against local databases.

Every query of a run goes into one query database, so each MMseqs2 step runs once per batch
with the whole CPU budget: the prefilter streams a database once for all queries, which is
where MMseqs2's 40-60x over jackhmmer/hhblits comes from (ColabFold).

Two database layouts are understood (docs/layout.md, "MMseqs2 databases"):

- cluster layout (ColabFold's `uniref30_2302_db`, `colabfold_envdb_202108_db`): `<db>` holds
  one sequence per cluster, `<db>_seq` every member and `<db>_aln` the alignment of each
  cluster's representative to its members. The search finds representatives with a 3-iteration
  profile search; `expandaln` replaces each by its members, `align` realigns them to the query
  profile, `filterresult` drops weak rows, `result2msa --msa-format-mode 6` writes A3M.
- sequence layout (any `mmseqs createdb` database): `search` then `result2msa` directly.

The environmental database is searched with the query profile the UniRef30 search built, and
templates come from a search of that profile against the PDB sequences (`convertalis` with the
CIGAR, turned into AlphaFold `TemplateHit`s in `mmseqs_templates.py`). Indexes are made once per
database (`ensure_index`) and reused by every later run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from parafold.errors import DatabaseNotFoundError, ToolFailedError, ToolTimeoutError
from parafold.search.databases import mmseqs_db_files, mmseqs_fingerprint
from parafold.search.msa_search import QUERY_NAME, ToolTiming
from parafold.search.settings import SearchSettings
from parafold.search.tools import ToolRun, resolve_binary, run_tool
from parafold.store import atomic_write_text, file_lock

__all__ = ["MMSEQS_FILES", "MmseqsDatabase", "Mmseqs", "MmseqsBatchResult", "ensure_index",
           "has_index", "read_mmseqs_db", "search_batch", "M8_FIELDS"]

logger = logging.getLogger(__name__)

MMSEQS_FILES = {"uniref": "uniref.a3m", "env": "env.a3m", "pdb": "pdb_hits.m8"}
# convertalis columns of pdb_hits.m8: BLAST's twelve, then the CIGAR and the whole target
# sequence, which is all a TemplateHit needs (the profile's own `qaln` is not the query).
M8_FIELDS = ("query,target,fident,alnlen,mismatch,gapopen,qstart,qend,tstart,tend,evalue,bits,"
             "cigar,tseq")
_COMPANIONS = ("_seq", "_aln")
_DB_LOADING = frozenset({"search", "expandaln", "align", "filterresult", "result2msa",
                         "result2profile", "convertalis"})


@dataclass(frozen=True, slots=True)
class MmseqsDatabase:
    """An MMseqs2 database prefix; `clustered` when `<db>_seq` and `<db>_aln` sit beside it."""

    prefix: Path

    def __post_init__(self) -> None:
        if not self.prefix.with_name(self.prefix.name + ".dbtype").is_file():
            raise DatabaseNotFoundError(f"mmseqs: no database {self.prefix} "
                                        f"({self.prefix.name}.dbtype missing)")

    def _part(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix)

    @property
    def clustered(self) -> bool:
        return all(self._part(s + ".dbtype").is_file() for s in _COMPANIONS)

    @property
    def members(self) -> Path:
        """The database whose sequences end up in the MSA."""
        return self._part("_seq") if self.clustered else self.prefix

    @property
    def alignments(self) -> Path:
        return self._part("_aln")


class Mmseqs:
    """The `mmseqs` binary: one module (verb) per call, all through `run_tool`."""

    def __init__(self, *, binary: str = "mmseqs", threads: int = 1,
                 timeout_s: float = 86_400.0, retries: int = 0) -> None:
        """Raises: ToolNotFoundError (checked now, not at the first call)."""
        self.binary = resolve_binary(binary)
        self.threads, self.timeout_s, self.retries = max(1, threads), timeout_s, retries
        # 2: mmap the (multi-GB) index instead of reading it into memory at every call, as
        # ColabFold does; page-cached, later calls and iterations then start at once.
        self.db_load_mode = 2
        self.timings: list[ToolTiming] = []

    def build_command(self, module: str, *args: object, threads: bool = True) -> list[str]:
        cmd = [self.binary, module, *(str(a) for a in args)]
        if threads:
            cmd += ["--threads", str(self.threads)]
        if module in _DB_LOADING:  # map the databases and indexes, don't copy them
            cmd += ["--db-load-mode", str(self.db_load_mode)]
        return cmd + ["-v", "1"]

    def run(self, step: str, module: str, *args: object, threads: bool = True) -> ToolRun:
        """One module call, retried `retries` times; its cost is kept in `timings`."""
        cmd = self.build_command(module, *args, threads=threads)
        wall = cpu = 0.0
        for attempt in range(1, self.retries + 2):
            started = time.monotonic()
            try:
                run = run_tool(cmd, timeout_s=self.timeout_s)
            except (ToolFailedError, ToolTimeoutError) as exc:
                wall += time.monotonic() - started
                if attempt > self.retries:
                    exc.add_note(f"mmseqs {step} failed after {attempt} attempts")
                    raise
                logger.warning("mmseqs %s attempt %d failed: %s", step, attempt, exc)
                continue
            wall, cpu = wall + run.wall_s, cpu + run.cpu_s
            self.timings.append(ToolTiming(step, round(wall, 3), round(cpu, 3),
                                           self.threads, attempt, max_rss_mib=run.max_rss_mib))
            return run
        raise AssertionError("unreachable")


def has_index(prefix: Path) -> bool:
    return prefix.with_name(prefix.name + ".idx.dbtype").is_file()


def _stamp(prefix: Path) -> Path:
    """Beside an index parafold made: the fingerprint of the database it was made from.
    Named `.idx*`, so neither fingerprints nor shadow folders take it for the database's."""
    return prefix.with_name(prefix.name + ".idx.fingerprint")


def _index_fits(prefix: Path, fingerprint: str, *, foreign_ok: bool) -> bool:
    """Whether `prefix` has an index made from the database as it is now.

    A database replaced at the same path keeps the old index (and the shadow folder its name),
    whose search would pair the new cache key with the old sequences: the stamp tells. An
    index without a stamp is someone else's (ColabFold's setup makes them beside the database:
    `foreign_ok`), or a build killed before its stamp (in a shadow folder, always ours).
    """
    if not has_index(prefix):
        return False
    stamp = _stamp(prefix)
    if not stamp.is_file():
        return foreign_ok
    return stamp.read_text().strip() == fingerprint


def _shadow(prefix: Path, index_dir: Path) -> Path:
    """A writable twin of a read-only database: links to its files, room for an index."""
    tag = hashlib.sha256(str(prefix.absolute()).encode()).hexdigest()[:16]
    folder = index_dir / f"{prefix.name}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    for src in mmseqs_db_files(prefix):  # its own files: not a sibling's of the same stem
        link = folder / src.name
        if ".idx" not in src.name[len(prefix.name):] and not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(src.absolute())
    return folder / prefix.name


def _build_index(mmseqs: Mmseqs, prefix: Path, fingerprint: str) -> None:
    """`createindex` afresh (an old index's files removed first), stamped with `fingerprint`;
    the stamp says "building" until it ends, so a killed build is redone. Hold the lock."""
    for old in prefix.parent.glob(glob.escape(prefix.name) + ".idx*"):
        old.unlink(missing_ok=True)
    atomic_write_text(_stamp(prefix), "building\n")
    logger.info("indexing %s (once; later runs reuse the index)", prefix)
    with tempfile.TemporaryDirectory(prefix=".tmp-idx-", dir=prefix.parent) as tmp:
        mmseqs.run(f"createindex_{prefix.name}", "createindex", prefix, tmp)
    atomic_write_text(_stamp(prefix), fingerprint + "\n")


def ensure_index(mmseqs: Mmseqs, prefix: Path, index_dir: Path | None = None) -> Path:
    """The prefix to search with an index, made once (`createindex`) and reused afterwards,
    until the database changes (its fingerprint is stamped beside the index).

    The index goes next to the database when its folder is writable and no `index_dir` is
    given; otherwise into `index_dir`, beside links to the database's files.
    """
    fingerprint = mmseqs_fingerprint(prefix)
    if _index_fits(prefix, fingerprint, foreign_ok=True):
        return prefix
    if index_dir is not None or not os.access(prefix.parent, os.W_OK):
        if index_dir is None:
            raise DatabaseNotFoundError(f"{prefix}: read-only and no index made from it as it "
                                        "is now; give an index folder "
                                        "(SearchSettings.mmseqs_index_dir)")
        prefix = _shadow(prefix, index_dir)
    with file_lock(prefix.with_name(f".{prefix.name}.idx.lock")):
        if not _index_fits(prefix, fingerprint, foreign_ok=False):
            _build_index(mmseqs, prefix, fingerprint)
    return prefix


def read_mmseqs_db(prefix: Path) -> dict[int, bytes]:
    """Entries of an MMseqs2 database (data + `.index`), keyed by their integer key."""
    if prefix.is_file():
        data = prefix.read_bytes()
    else:  # written by several threads: `.0`, `.1`, ... in order, offsets run across them
        parts = sorted(prefix.parent.glob(prefix.name + ".[0-9]*"),
                       key=lambda p: int(p.name.rsplit(".", 1)[1]))
        data = b"".join(p.read_bytes() for p in parts)
    out: dict[int, bytes] = {}
    index = prefix.with_name(prefix.name + ".index")
    for line in index.read_text().splitlines():
        key, offset, length = line.split("\t")
        start = int(offset)
        out[int(key)] = data[start:start + int(length)].rstrip(b"\0")
    return out


def _lookup(qdb: Path) -> dict[int, str]:
    rows = qdb.with_name(qdb.name + ".lookup").read_text().splitlines()
    return {int(r.split("\t")[0]): r.split("\t")[1] for r in rows if r}


@dataclass(frozen=True, slots=True)
class MmseqsBatchResult:
    """What one batch did: per query, its A3M texts and m8 rows; and every call's cost."""

    msas: dict[str, dict[str, str]]
    timings: tuple[ToolTiming, ...]
    wall_s: float
    index_calls: int = 0
    commands: tuple[str, ...] = field(default=())


def _a3m_by_query(result: Path, names: dict[int, str]) -> dict[str, str]:
    """result2msa's A3M per query, '#' lines dropped and the query renamed `query`."""
    out: dict[str, str] = {}
    for key, raw in read_mmseqs_db(result).items():
        lines = [ln for ln in raw.decode().splitlines() if ln and not ln.startswith("#")]
        if lines and lines[0].startswith(">"):
            lines[0] = f">{QUERY_NAME}"
        out[names[key]] = "\n".join(lines) + "\n"
    return out


class _Batch:
    """The calls of one batch in its work folder (`w`)."""

    def __init__(self, mm: Mmseqs, work: Path, settings: SearchSettings) -> None:
        self.mm, self.w, self.s = mm, work, settings

    def sensitivity(self) -> tuple[object, ...]:
        """`-s N` when set, else ColabFold's k-mer score thresholds (its default)."""
        if self.s.mmseqs_sensitivity is None:
            return ("--k-score", "seq:96,prof:80")
        return ("-s", self.s.mmseqs_sensitivity)

    def msa(self, tag: str, query: Path, profile: Path, db: MmseqsDatabase, hits: Path) -> Path:
        """Hits -> (expanded, realigned, filtered) -> result2msa A3M database."""
        w = self.w
        final = hits
        if db.clustered:
            exp, realign, final = w / f"{tag}_exp", w / f"{tag}_realign", w / f"{tag}_filt"
            self.mm.run(f"expandaln_{tag}", "expandaln", profile, db.members, hits, db.alignments,
                        exp, "--expansion-mode", 0, "-e", "inf", "--expand-filter-clusters", 1,
                        "--max-seq-id", 0.95)
            self.mm.run(f"align_{tag}", "align", profile, db.members, exp, realign,
                        "-e", self.s.mmseqs_align_e_value, "--max-accept", 1_000_000,
                        "--alt-ali", 10, "-a")
            self.mm.run(f"filterresult_{tag}", "filterresult", query, db.members, realign, final,
                        "--qid", 0, "--qsc", 0.8, "--diff", 0, "--max-seq-id", 1.0,
                        "--filter-min-enable", 100)
        out = w / f"{tag}_msa"
        self.mm.run(f"result2msa_{tag}", "result2msa", query, db.members, final, out,
                    "--msa-format-mode", 6, "--filter-msa", 1, "--filter-min-enable", 1000,
                    "--diff", 3000, "--qid", "0.0,0.2,0.4,0.6,0.8,1.0", "--qsc", 0,
                    "--max-seq-id", 0.95)
        return out

    def uniref(self, qdb: Path, db: MmseqsDatabase) -> tuple[Path, Path]:
        """The iterative profile search; returns (A3M result database, query profiles)."""
        s, w = self.s, self.w
        res, tmp = w / "uniref_res", w / "tmp_uniref"
        self.mm.run("search_uniref", "search", qdb, db.prefix, res, tmp,
                    "--num-iterations", s.mmseqs_num_iterations, *self.sensitivity(),
                    "-a", "-e", s.mmseqs_e_value, "--max-seqs", s.mmseqs_max_seqs)
        profile = w / "prof_res"
        # iteration i searches with profile_{i-2}; the last profile holds iterations 1..n-1
        last = tmp / "latest" / f"profile_{s.mmseqs_num_iterations - 2}"
        if s.mmseqs_num_iterations > 1 and last.with_name(last.name + ".dbtype").is_file():
            self.mm.run("mvdb_profile", "mvdb", last, profile, threads=False)
        else:  # one iteration keeps no profile: make it from the hits
            self.mm.run("result2profile", "result2profile", qdb, db.prefix, res, profile)
        self.mm.run("lndb_profile_h", "lndb", qdb.with_name(qdb.name + "_h"),
                    profile.with_name(profile.name + "_h"), threads=False)
        return self.msa("uniref", qdb, profile, db, res), profile

    def env(self, qdb: Path, profile: Path, db: MmseqsDatabase) -> Path:
        s, w = self.s, self.w
        res = w / "env_res"
        self.mm.run("search_env", "search", profile, db.prefix, res, w / "tmp_env",
                    *self.sensitivity(), "-a", "-e", s.mmseqs_e_value,
                    "--max-seqs", s.mmseqs_max_seqs)
        return self.msa("env", qdb, profile, db, res)

    def pdb(self, profile: Path, db: MmseqsDatabase) -> Path:
        s, w = self.s, self.w
        res, m8 = w / "pdb_res", w / "pdb.m8"
        self.mm.run("search_pdb", "search", profile, db.prefix, res, w / "tmp_pdb",
                    "-s", s.mmseqs_template_sensitivity, "-a", "-e", s.mmseqs_e_value,
                    "--max-seqs", max(s.max_template_hits * 5, 100))
        self.mm.run("convertalis_pdb", "convertalis", profile, db.prefix, res, m8,
                    "--format-output", M8_FIELDS)
        return m8


def search_batch(queries: Sequence[tuple[str, str]], work: Path, *, uniref: Path,
                 env: Path | None, pdb: Path | None, settings: SearchSettings,
                 threads: int) -> MmseqsBatchResult:
    """Search every (name, sequence) at once; per query: uniref/env A3M and pdb m8 text.

    `uniref`, `env`, `pdb` are database prefixes (indexed first if they have no index yet).
    Nothing is written outside `work`, which the caller owns and removes.

    Raises:
        ToolError: an MMseqs2 call failed after its retries, or the binary is missing.
        DatabaseNotFoundError: a database prefix has no `.dbtype`.
    """
    started = time.monotonic()
    names = [n for n, _ in queries]
    if len(set(names)) != len(names) or not names:
        raise ValueError("query names must be unique and at least one")
    mm = Mmseqs(binary=settings.mmseqs_binary, threads=threads, timeout_s=settings.timeout_s,
                retries=settings.retries)
    index_dir = Path(settings.mmseqs_index_dir) if settings.mmseqs_index_dir else None
    dbs = {tag: MmseqsDatabase(ensure_index(mm, p, index_dir))
           for tag, p in (("uniref", uniref), ("env", env), ("pdb", pdb)) if p is not None}
    index_calls = len(mm.timings)
    work.mkdir(parents=True, exist_ok=True)
    fasta, qdb = work / "queries.fasta", work / "qdb"
    fasta.write_text("".join(f">{n}\n{seq}\n" for n, seq in queries))
    mm.run("createdb_queries", "createdb", fasta, qdb, "--shuffle", 0, threads=False)
    batch = _Batch(mm, work, settings)
    key_names = _lookup(qdb)
    uniref_msa, profile = batch.uniref(qdb, dbs["uniref"])
    per_query: dict[str, dict[str, str]] = {n: {} for n in names}
    for name, text in _a3m_by_query(uniref_msa, key_names).items():
        per_query[name]["uniref"] = text
    if "env" in dbs:
        for name, text in _a3m_by_query(batch.env(qdb, profile, dbs["env"]),
                                         key_names).items():
            per_query[name]["env"] = text
    if "pdb" in dbs:
        for name in names:
            per_query[name]["pdb"] = ""
        for line in batch.pdb(profile, dbs["pdb"]).read_text().splitlines():
            query = line.split("\t", 1)[0]
            if query in per_query:
                per_query[query]["pdb"] += line + "\n"
    for name, seq in queries:  # a query without a single hit still has its own row
        per_query[name].setdefault("uniref", f">{QUERY_NAME}\n{seq}\n")
        if "env" in dbs:
            per_query[name].setdefault("env", f">{QUERY_NAME}\n{seq}\n")
    commands = tuple(t.step for t in mm.timings)
    logger.info("mmseqs batch of %d queries: %d calls in %.1f s", len(names), len(commands),
                time.monotonic() - started)
    return MmseqsBatchResult(per_query, tuple(mm.timings), round(time.monotonic() - started, 3),
                             index_calls, commands)

