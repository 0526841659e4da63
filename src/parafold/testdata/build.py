"""Build a complete AlphaFold-layout database folder with planted families (docs/layout.md).

Where each sequence goes:

- Family members (`members_per_family` per family, identities to the ancestor spread evenly
  over `identity_range`) are dealt round-robin, lowest identity first, to uniref90, bfd,
  mgnify, uniref30 and small_bfd, so every database holds close and distant relatives. In bfd
  and uniref30 a family's members form one A3M cluster (its planted alignment).
- Every other family (0, 2, 4, ...) gets a template chain, families 0, 4, 8, ... a second one:
  an mmCIF entry, a pdb_seqres line and a pdb70 HMM built from the chain plus three fresh
  relatives (ids `PDBMSA_SYN...`).
- Unrelated random sequences fill the rest (in uniref90 optionally as clusters of close
  relatives of each other, `uniref90_redundancy`, modelling what UniRef30 clusters away): a few decoy templates, singleton clusters in bfd
  and uniref30 (a tenth of them, capped at `HH_SINGLETON_CAP` per database: cstranslate costs
  about 1 ms of CPU per column, so a million-sequence benchmark keeps its HH-suite build to
  a minute, and hhblits' cost there is the prefilter anyway), and the remainder split
  50/30/20 over uniref90, mgnify and small_bfd, streamed to disk in chunks.

The folder is built beside OUT under a temporary name and renamed into place with its marker
`.testdata_complete.json` already inside, so a killed build never looks complete.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from parafold.errors import InputError, ToolNotFoundError
from parafold.store import atomic_write_json, read_json
from parafold.testdata import structures
from parafold.testdata.folder import is_replaceable, locked, staged_folder
from parafold.testdata.hhdb import HHTools, build_hh_databases, find_hh_tools
from parafold.testdata.sequences import (
    AlignedSeq,
    mutate,
    random_sequence,
    random_sequences,
    redundant_sequences,
    to_a3m,
)

__all__ = ["TestdataSummary", "build_testdata", "read_testdata", "read_truth", "MARKER",
           "HH_SINGLETON_CAP"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: MMseqs2 cluster-layout databases with indexes
MARKER = ".testdata_complete.json"
HH_SINGLETON_CAP = 100
UNRELATED_PER_FAMILY = 8  # default number of unrelated sequences per family
UNRELATED_LENGTHS = (50, 300)
ANCESTOR_LENGTHS = (50, 200)
TEMPLATE_IDENTITY = (0.5, 0.9)
PDB70_MSA_MEMBERS = 3
MAX_TEMPLATE_DATE = datetime.date(2021, 1, 1)  # every synthetic release is before this

LAYOUT = {
    "uniref90": "uniref90/uniref90.fasta",
    "mgnify": "mgnify/mgy_clusters_2022_05.fa",
    "small_bfd": "small_bfd/bfd-first_non_consensus_sequences.fasta",
    "bfd": "bfd/bfd_metaclust_clu_complete_id30_c90_final_seq.sorted_opt",
    "uniref30": "uniref30/UniRef30_2021_03",
    "pdb70": "pdb70/pdb70",
    "mmcif_dir": "pdb_mmcif/mmcif_files",
    "obsolete": "pdb_mmcif/obsolete.dat",
    "pdb_seqres": "pdb_seqres/pdb_seqres.txt",
    "mmseqs": "mmseqs/uniref30_db",
    "queries": "queries.fasta",
    "truth": "truth.tsv",
}
_DEAL_ORDER = ("uniref90", "bfd", "mgnify", "uniref30", "small_bfd")
_FASTA_DBS = ("uniref90", "mgnify", "small_bfd")
_ID_PREFIX = {"uniref90": "UniRef90_SYN", "mgnify": "MGYP", "small_bfd": "SBFD_SYN",
              "bfd": "BFD_SYN", "uniref30": "UniRef100_SYN", "pdb70_msa": "PDBMSA_SYN"}


@dataclass(frozen=True, slots=True)
class TestdataSummary:
    """What a build wrote: counts per database and the paths of the AlphaFold layout.

    `counts` holds sequences for FASTA databases, clusters (HMMs) for HH-suite ones and
    entries for templates. `sequences` is every id in truth.tsv.
    """

    __test__ = False  # not a pytest test class despite its name

    root: Path
    seed: int
    families: int
    family_members: int
    unrelated: int
    templates: int
    counts: dict[str, int] = field(default_factory=dict)
    mmseqs: bool = True
    elapsed_s: float = 0.0
    reused: bool = False

    @property
    def sequences(self) -> int:
        return self.family_members + self.unrelated

    def path(self, name: str) -> Path:
        """A layout entry (`uniref90`, `bfd`, `pdb70`, `mmcif_dir`, `truth`, ...); HH-suite
        databases give the prefix hhblits/hhsearch take with `-d`."""
        return self.root / LAYOUT[name]

    @property
    def queries(self) -> Path:
        return self.path("queries")

    @property
    def truth(self) -> Path:
        return self.path("truth")


@dataclass(frozen=True, slots=True)
class _Template:
    pdb_id: str
    family: str
    aligned: AlignedSeq
    msa: tuple[tuple[str, AlignedSeq], ...]

    @property
    def chain_id(self) -> str:
        return f"{self.pdb_id}_A"


@dataclass(slots=True)
class _Family:
    name: str
    ancestor: str
    members: dict[str, list[tuple[str, AlignedSeq]]]
    templates: list[_Template]


class _Ids:
    """One serial number across all databases, so every id is unique."""

    def __init__(self) -> None:
        self.serial = 0
        self.templates = 0

    def next(self, db: str) -> str:
        self.serial += 1
        width = 12 if db == "mgnify" else 10
        return f"{_ID_PREFIX[db]}{self.serial:0{width}d}"

    def next_pdb(self) -> str:
        t = self.templates
        self.templates += 1
        if t >= 9 * 36 * 36:
            raise InputError("too many synthetic templates for 4-character PDB ids")
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"
        return f"{1 + t // 1296}s{digits[t // 36 % 36]}{digits[t % 36]}"


def _make_family(index: int, seed: int, members: int, identity: tuple[float, float],
                 ids: _Ids) -> _Family:
    rng = np.random.default_rng([seed, 1, index])
    name = f"fam{index:04d}"
    ancestor = random_sequence(rng, int(rng.integers(ANCESTOR_LENGTHS[0], ANCESTOR_LENGTHS[1] + 1)))
    lo, hi = identity
    identities = lo + (hi - lo) * (np.arange(members) + rng.random(members)) / members
    by_db: dict[str, list[tuple[str, AlignedSeq]]] = {db: [] for db in _DEAL_ORDER}
    for j, ident in enumerate(identities.tolist()):
        db = _DEAL_ORDER[j % len(_DEAL_ORDER)]
        by_db[db].append((ids.next(db), mutate(rng, ancestor, ident)))
    n_templates = 0 if index % 2 else (2 if index % 4 == 0 else 1)
    templates = []
    for _ in range(n_templates):
        chain = mutate(rng, ancestor, float(rng.uniform(*TEMPLATE_IDENTITY)))
        msa = tuple((ids.next("pdb70_msa"), mutate(rng, ancestor, float(rng.uniform(lo, hi))))
                    for _ in range(PDB70_MSA_MEMBERS))
        templates.append(_Template(ids.next_pdb(), name, chain, msa))
    return _Family(name, ancestor, by_db, templates)


def _plan_unrelated(unrelated: int, families: int) -> dict[str, int]:
    decoys = min(unrelated, families // 4 + 1)
    rest = unrelated - decoys
    hh = min(HH_SINGLETON_CAP, rest // 10)
    rest -= 2 * hh
    uniref90 = rest // 2
    mgnify = (rest - uniref90) * 3 // 5
    return {"decoys": decoys, "bfd": hh, "uniref30": hh, "uniref90": uniref90,
            "mgnify": mgnify, "small_bfd": rest - uniref90 - mgnify}


def _header(db: str, seq_id: str) -> str:
    if db == "uniref90":
        return (f"{seq_id} Synthetic protein n=1 Tax=synthetic construct TaxID=32630 "
                f"RepID={seq_id.removeprefix('UniRef90_')}")
    if db == "mgnify":
        return f"{seq_id} PL=00 UP=0 BIOMES=0000000000000"
    return seq_id


def _write_fasta_db(path: Path, db: str, members: list[tuple[str, str, str]], n_unrelated: int,
                    rng: np.random.Generator, ids: _Ids, truth: IO[str],
                    per_cluster: int = 1) -> int:
    """Members at random positions among streamed unrelated sequences (in background clusters
    of `per_cluster`); returns the count."""
    total = len(members) + n_unrelated
    slots = set(rng.choice(total, size=len(members), replace=False).tolist()) if members else set()
    unrelated = redundant_sequences(rng, n_unrelated, min_len=UNRELATED_LENGTHS[0],
                                    max_len=UNRELATED_LENGTHS[1], per_cluster=per_cluster)
    member_iter = iter(members)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="ascii", buffering=1 << 20) as fh:
        for pos in range(total):
            if pos in slots:
                seq_id, seq, family = next(member_iter)
            else:
                seq_id, seq, family = ids.next(db), next(unrelated), ""
            fh.write(f">{_header(db, seq_id)}\n{seq}\n")
            truth.write(f"{seq_id}\t{family}\n")
    return total


def _hh_clusters(db: str, families: list[_Family], singletons: int, rng: np.random.Generator,
                 ids: _Ids, truth: IO[str]) -> Iterator[tuple[str, str]]:
    for fam in families:
        entries = fam.members[db]
        if entries:
            for seq_id, _ in entries:
                truth.write(f"{seq_id}\t{fam.name}\n")
            yield entries[0][0], to_a3m(entries)
    for seq in random_sequences(rng, singletons, min_len=ANCESTOR_LENGTHS[0],
                                max_len=ANCESTOR_LENGTHS[1]):
        seq_id = ids.next(db)
        truth.write(f"{seq_id}\t\n")
        yield seq_id, f">{seq_id}\n{seq}\n"


def _write_templates(root: Path, families: list[_Family], decoys: int, seed: int, ids: _Ids,
                     truth: IO[str]) -> tuple[list[tuple[str, str]], int]:
    """mmCIF files, pdb_seqres and obsolete.dat; returns the pdb70 clusters and decoy-free count."""
    rng = np.random.default_rng([seed, 3])
    templates = [t for fam in families for t in fam.templates]
    for _ in range(decoys):
        length = int(rng.integers(ANCESTOR_LENGTHS[0], ANCESTOR_LENGTHS[1] + 1))
        seq = random_sequence(rng, length)
        templates.append(_Template(ids.next_pdb(), "", AlignedSeq(seq, ("",) * (length + 1)), ()))
    mmcif_dir = root / LAYOUT["mmcif_dir"]
    mmcif_dir.mkdir(parents=True)
    (root / LAYOUT["obsolete"]).write_text(
        " LIST OF OBSOLETE COORDINATE ENTRIES AND SUCCESSORS\n", encoding="ascii")
    seqres = root / LAYOUT["pdb_seqres"]
    seqres.parent.mkdir(parents=True)
    clusters = []
    with seqres.open("w", encoding="ascii") as fh:
        for i, tpl in enumerate(templates):
            seq = tpl.aligned.sequence
            release = datetime.date(2000, 1, 1) + datetime.timedelta(days=(97 * i) % 7000)
            coords = structures.backbone(np.random.default_rng([seed, 4, i]), len(seq))
            (mmcif_dir / f"{tpl.pdb_id}.cif").write_text(
                structures.mmcif_text(tpl.pdb_id, "A", seq, coords, release), encoding="ascii")
            header = f"{tpl.chain_id} mol:protein length:{len(seq)}  SYNTHETIC PROTEIN"
            fh.write(f">{header}\n{seq}\n")
            truth.write(f"{tpl.chain_id}\t{tpl.family}\n")
            for seq_id, _ in tpl.msa:
                truth.write(f"{seq_id}\t{tpl.family}\n")
            clusters.append((tpl.chain_id, to_a3m([(header, tpl.aligned), *tpl.msa])))
    return clusters, len(templates) - decoys


def _params(families: int, sequences: int | None, seed: int, members_per_family: int,
            identity_range: tuple[float, float], mmseqs: bool,
            uniref90_redundancy: int) -> dict[str, Any]:
    params = {"format": FORMAT_VERSION, "families": families, "sequences": sequences,
              "seed": seed, "members_per_family": members_per_family,
              "identity_range": list(identity_range), "mmseqs": mmseqs}
    if uniref90_redundancy != 1:  # absent when 1, so sets built before it stay reusable
        params["uniref90_redundancy"] = uniref90_redundancy
    return params


def _build_into(root: Path, params: dict[str, Any], tools: HHTools, mmseqs_bin: str | None,
                started: float) -> TestdataSummary:
    families_n, seed = params["families"], params["seed"]
    m, identity = params["members_per_family"], tuple(params["identity_range"])
    ids = _Ids()
    families = [_make_family(f, seed, m, identity, ids) for f in range(families_n)]
    family_rows = sum(m + len(f.templates) * (1 + PDB70_MSA_MEMBERS) for f in families)
    if params["sequences"] is None:
        unrelated = UNRELATED_PER_FAMILY * max(families_n, 2)
    else:
        unrelated = params["sequences"] - family_rows
        if unrelated < 0:
            raise InputError(f"{params['sequences']} sequences cannot hold the {family_rows} "
                             f"members of {families_n} planted families; use fewer families")
    plan = _plan_unrelated(unrelated, families_n)
    work = root / ".work"
    counts: dict[str, int] = {}
    with (root / LAYOUT["truth"]).open("w", encoding="ascii", buffering=1 << 20) as truth:
        truth.write("sequence_id\tfamily\n")
        for k, db in enumerate(_FASTA_DBS):
            members = [(sid, s.sequence, f.name) for f in families for sid, s in f.members[db]]
            per_cluster = params.get("uniref90_redundancy", 1) if db == "uniref90" else 1
            counts[db] = _write_fasta_db(root / LAYOUT[db], db, members, plan[db],
                                         np.random.default_rng([seed, 2, k]), ids, truth,
                                         per_cluster)
        pdb70, n_templates = _write_templates(root, families, plan["decoys"], seed, ids, truth)
        hh_dbs: dict[Path, Iterable[tuple[str, str]]] = {root / LAYOUT["pdb70"]: pdb70}
        for k, db in enumerate(("bfd", "uniref30")):
            hh_dbs[root / LAYOUT[db]] = _hh_clusters(
                db, families, plan[db], np.random.default_rng([seed, 5, k]), ids, truth)
        for prefix in hh_dbs:
            prefix.parent.mkdir()
        hh_counts = build_hh_databases(hh_dbs, tools, work=work)
    for db in ("bfd", "uniref30", "pdb70"):
        counts[db] = hh_counts[root / LAYOUT[db]]
    counts["pdb_mmcif"] = len(pdb70)
    (root / LAYOUT["queries"]).write_text(
        "".join(f">{f.name}_query synthetic ancestor of family {f.name}\n{f.ancestor}\n"
                for f in families), encoding="ascii")
    if mmseqs_bin is not None:
        from parafold.testdata.mmseqs_db import build_mmseqs_databases

        build_mmseqs_databases(root, mmseqs_binary=mmseqs_bin)
    shutil.rmtree(work, ignore_errors=True)
    return TestdataSummary(
        root=root, seed=seed, families=families_n, family_members=family_rows,
        unrelated=unrelated, templates=n_templates, counts=counts,
        mmseqs=mmseqs_bin is not None, elapsed_s=round(time.monotonic() - started, 3))


def _summary_from_marker(out: Path, data: dict[str, Any]) -> TestdataSummary:
    fields = dict(data["summary"])
    fields["root"] = out
    return TestdataSummary(**fields)


def read_testdata(out: Path | str) -> TestdataSummary:
    """The summary of a complete build in `out`.

    Raises:
        InputError: `out` holds no complete build (no marker, or files missing).
    """
    out = Path(out)
    marker = out / MARKER
    if not marker.is_file():
        raise InputError(f"{out}: no complete synthetic database set (no {MARKER})")
    try:
        summary = _summary_from_marker(out, read_json(marker))
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{marker}: malformed marker: {exc}") from exc
    needed = [summary.path(n) for n in ("uniref90", "mgnify", "small_bfd", "queries", "truth",
                                        "mmcif_dir", "obsolete", "pdb_seqres")]
    needed += [Path(f"{summary.path(db)}_{kind}.{ext}") for db in ("bfd", "uniref30", "pdb70")
               for kind in ("a3m", "hhm", "cs219") for ext in ("ffdata", "ffindex")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise InputError(f"{out}: incomplete synthetic database set, missing {missing[:3]}")
    return summary


def read_truth(path: Path | str) -> dict[str, str]:
    """truth.tsv as {sequence id: family} ('' for unrelated sequences)."""
    out: dict[str, str] = {}
    with Path(path).open(encoding="ascii") as fh:
        next(fh)
        for line in fh:
            seq_id, _, family = line.rstrip("\n").partition("\t")
            out[seq_id] = family
    return out


def build_testdata(out: Path | str, *, families: int = 8, sequences: int | None = None,
                   seed: int = 0, members_per_family: int = 16,
                   identity_range: tuple[float, float] = (0.35, 0.95),
                   mmseqs: bool = True, uniref90_redundancy: int = 1) -> TestdataSummary:
    """Write a synthetic AlphaFold database set to `out` (reused if already built alike).

    Args:
        out: the database folder (`--db-dir`); replaced if it holds an incomplete or
            differently built set, refused if it holds anything else.
        families: planted families, one query each in queries.fasta.
        sequences: total sequence ids (truth.tsv rows); None for a tiny default.
        seed: the same seed and parameters give byte-identical databases.
        members_per_family: planted members per family across the five sequence databases.
        identity_range: identity of members to their family's ancestor (the query).
        mmseqs: also write `mmseqs/uniref30_db` with `mmseqs createdb`.
        uniref90_redundancy: unrelated uniref90 sequences come in clusters of this many close
            relatives (70-95% identity), as real UniRef90 entries do within UniRef30 clusters;
            1 (default) leaves them all unrelated. The other databases stay non-redundant, as
            MGnify and BFD cluster representatives are.

    Raises:
        InputError: bad parameters, or `out` is a folder that is not ours.
        ToolNotFoundError / ToolFailedError: an HH-suite or MMseqs2 program is missing or failed.
    """
    out = Path(out).absolute()
    if families < 1 or members_per_family < len(_DEAL_ORDER):
        raise InputError(f"need >= 1 family and >= {len(_DEAL_ORDER)} members per family")
    if not 0.0 < identity_range[0] <= identity_range[1] <= 1.0:
        raise InputError(f"identity range must be within (0, 1], got {identity_range}")
    if uniref90_redundancy < 1:
        raise InputError(f"uniref90 redundancy must be >= 1, got {uniref90_redundancy}")
    params = _params(families, sequences, seed, members_per_family, identity_range, mmseqs,
                     uniref90_redundancy)
    tools = find_hh_tools()
    mmseqs_bin = shutil.which("mmseqs") if mmseqs else None
    if mmseqs and mmseqs_bin is None:
        raise ToolNotFoundError("mmseqs not found (pass mmseqs=False / --no-mmseqs to skip)")
    with locked(out):
        with contextlib.suppress(InputError, OSError, ValueError):
            if read_json(out / MARKER).get("params") == params:
                log.info("reusing complete synthetic databases in %s", out)
                summary = read_testdata(out)
                return TestdataSummary(**{**asdict(summary), "reused": True})
        if not is_replaceable(out, (MARKER, LAYOUT["truth"])):
            raise InputError(f"{out}: not empty and not a parafold testdata folder; refusing "
                             "to overwrite it")
        log.info("building synthetic databases in %s (seed %d)", out, seed)
        with staged_folder(out) as tmp:
            summary = _build_into(tmp, params, tools, mmseqs_bin, time.monotonic())
            record = asdict(summary)
            record.pop("root")
            atomic_write_json(tmp / MARKER, {"params": params, "summary": record})
    log.info("synthetic databases ready in %s (%.1f s)", out, summary.elapsed_s)
    return TestdataSummary(**{**asdict(summary), "root": out})
