"""MMseqs2 databases for the synthetic set, in ColabFold's cluster layout, built with mmseqs.

- `mmseqs/uniref30_db` from the UniRef-like sequences (uniref90 FASTA and the uniref30
  clusters' members), `mmseqs/env_db` from the environmental ones (bfd clusters' members,
  mgnify, small_bfd): each as `<db>` (cluster representatives), `<db>_seq` (all members) and
  `<db>_aln` (representative-to-member alignments), which is what ColabFold's `tsv2exprofiledb`
  databases hold, so the search code takes the same path on real and synthetic data.
- `mmseqs/pdb_seqres_db`: a sequence database of pdb_seqres.txt, for template search.

Every database gets its search index here, so runs never pay for `createindex`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from parafold.search.mmseqs import Mmseqs, ensure_index

__all__ = ["build_mmseqs_databases", "MMSEQS_LAYOUT"]

log = logging.getLogger(__name__)

MMSEQS_LAYOUT = {"uniref30": "mmseqs/uniref30_db", "env": "mmseqs/env_db",
                 "pdb_seqres": "mmseqs/pdb_seqres_db"}
_SOURCES = {
    "uniref30": ("uniref90/uniref90.fasta", "uniref30/UniRef30_2021_03_a3m.ffdata"),
    "env": ("bfd/bfd_metaclust_clu_complete_id30_c90_final_seq.sorted_opt_a3m.ffdata",
            "mgnify/mgy_clusters_2022_05.fa",
            "small_bfd/bfd-first_non_consensus_sequences.fasta"),
}
# Clusters at 50% identity and 80% coverage: family members group with their close relatives
# and unrelated sequences stay singletons, as in UniRef30's profile clusters.
_CLUSTER_ARGS = ("--min-seq-id", 0.5, "-c", 0.8, "--cov-mode", 0)


def _fasta_records(path: Path) -> Iterator[tuple[str, str]]:
    header, chunks = "", []
    with path.open(encoding="ascii") as fh:
        for line in fh:
            line = line.strip()
            if line.startswith(">"):
                if header:
                    yield header, "".join(chunks)
                header, chunks = line[1:].split()[0], []
            elif line:
                chunks.append(line)
    if header:
        yield header, "".join(chunks)


def _a3m_ffdata_records(path: Path) -> Iterator[tuple[str, str]]:
    """Every member of every cluster of an HH-suite A3M database, gaps removed."""
    for entry in path.read_bytes().split(b"\0"):
        text = entry.decode("ascii")
        for header, aligned in _records_of(text):
            yield header, aligned.replace("-", "").replace(".", "").upper()


def _records_of(text: str) -> Iterator[tuple[str, str]]:
    header, chunks = "", []
    for line in text.splitlines():
        if line.startswith(">"):
            if header:
                yield header, "".join(chunks)
            header, chunks = line[1:].split()[0], []
        elif line and not line.startswith("#"):
            chunks.append(line.strip())
    if header:
        yield header, "".join(chunks)


def _write_fasta(out: Path, sources: Iterable[Path]) -> int:
    n = 0
    with out.open("w", encoding="ascii", buffering=1 << 20) as fh:
        for src in sources:
            records = (_a3m_ffdata_records(src) if src.name.endswith("ffdata")
                       else _fasta_records(src))
            for seq_id, seq in records:
                fh.write(f">{seq_id}\n{seq}\n")
                n += 1
    return n


def _cluster_layout(mm: Mmseqs, fasta: Path, prefix: Path, work: Path) -> None:
    """`<prefix>_seq` of every sequence, `<prefix>` of the representatives, `<prefix>_aln`."""
    seq, clu = Path(f"{prefix}_seq"), work / f"{prefix.name}_clu"
    mm.run("createdb", "createdb", fasta, seq, "--shuffle", 0, threads=False)
    mm.run("linclust", "linclust", seq, clu, work / f"tmp_{prefix.name}", *_CLUSTER_ARGS)
    mm.run("createsubdb", "createsubdb", clu, seq, prefix, threads=False)
    mm.run("createsubdb_h", "createsubdb", clu, Path(f"{seq}_h"), Path(f"{prefix}_h"),
           threads=False)
    mm.run("align", "align", seq, seq, clu, Path(f"{prefix}_aln"), "-a", "-e", "inf",
           "--cov-mode", 0, "-c", 0)


def build_mmseqs_databases(root: Path, *, mmseqs_binary: str = "mmseqs",
                           threads: int = 2) -> dict[str, Path]:
    """Write and index the MMseqs2 databases of the synthetic set under `root/mmseqs`.

    Returns the prefix of each database by name (`uniref30`, `env`, `pdb_seqres`).

    Raises:
        ToolNotFoundError / ToolFailedError: mmseqs is missing or a build step failed.
    """
    root = Path(root)
    mm = Mmseqs(binary=mmseqs_binary, threads=threads)
    folder = root / "mmseqs"
    work = folder / ".work"
    work.mkdir(parents=True, exist_ok=True)
    out = {name: root / rel for name, rel in MMSEQS_LAYOUT.items()}
    for name, sources in _SOURCES.items():
        fasta = work / f"{name}.fasta"
        count = _write_fasta(fasta, [root / s for s in sources])
        _cluster_layout(mm, fasta, out[name], work)
        log.info("mmseqs %s: %d sequences", name, count)
    mm.run("createdb", "createdb", root / "pdb_seqres" / "pdb_seqres.txt", out["pdb_seqres"],
           "--shuffle", 0, threads=False)
    # createindex is mostly single-threaded set-up work: the three run side by side.
    one = Mmseqs(binary=mmseqs_binary, threads=max(1, threads // len(out)))
    with ThreadPoolExecutor(len(out)) as pool:
        list(pool.map(lambda prefix: ensure_index(one, prefix), out.values()))
    shutil.rmtree(work, ignore_errors=True)
    _resolve_links(folder)
    return out


def _resolve_links(folder: Path) -> None:
    """mmseqs links some files by absolute path (createsubdb); the set is built in a staging
    folder and renamed, so each link becomes a copy of what it points to."""
    for link in sorted(folder.iterdir()):
        if link.is_symlink():
            target = link.resolve()
            link.unlink()
            if target.is_file():
                shutil.copyfile(target, link)
