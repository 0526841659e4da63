"""Reading the user's proteins: FASTA files, a folder of them, or a ColabFold-style CSV.

FASTA and CSV files may be compressed (`.gz`, `.bz2`, `.xz`), as proteomes are downloaded
(UniProt's `UP000005640_9606.fasta.gz`). Every record is validated on its own. A bad record
becomes an `InputProblem` naming the file, line and reason, and the good records go on. Ids
from input files are never used as paths: each target gets a `name` made safe for the file
system, unique within the run.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import lzma
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parafold.errors import InputError

__all__ = [
    "Target",
    "InputProblem",
    "ParsedInput",
    "read_targets",
    "a3m_share",
    "safe_name",
    "UniqueNames",
    "sequence_hash",
    "STANDARD_AA",
    "ACCEPTED_AA",
]

STANDARD_AA = frozenset("ACDEFGHIKLMNPQRSTVWY")
# X is unknown; B, Z, U, O are kept as written and mapped by AlphaFold's featurizer
# (aatype: unknown; MSA: B->D, Z->E, U->C, O->X), exactly as AlphaFold does.
ACCEPTED_AA = STANDARD_AA | frozenset("XBZUO")
# Genes given instead of proteins (a .fna file for a .faa) are all amino-acid letters too. A
# protein of 30 or more residues made of A, C, G, T (Thr), U and N alone, at least three of
# them, is not met in nature, so such a record is refused rather than searched and folded.
_NUCLEOTIDE_LETTERS = frozenset("ACGTUN")
_NUCLEOTIDE_MIN_LENGTH = 30
FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas", ".fna", ".seq")
# An A3M file as input is one target: its first sequence, named after the file (so the same
# folder serves as --msa-dir for precomputed MSAs).
A3M_SUFFIXES = (".a3m",)
TABLE_SUFFIXES = (".csv", ".tsv")
# Compressed FASTA and CSV files are read as they are; the opener reads text.
_OPENERS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open,
                                              ".xz": lzma.open}
MAX_NAME_LEN = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class Target:
    """One protein to fold.

    `id` is the identifier as the user wrote it (for display and reports); `name` is the
    file-system-safe, run-unique name used for every path; `header` is the whole FASTA
    header (ColabFold names its MSA files after it).
    """

    id: str
    name: str
    sequence: str
    source: str = ""
    header: str = ""

    def __post_init__(self) -> None:
        if not self.sequence:
            raise InputError(f"{self.id}: empty sequence")
        bad = set(self.sequence) - ACCEPTED_AA
        if bad:
            raise InputError(f"{self.id}: invalid residue letters {''.join(sorted(bad))!r}")
        if not self.name or self.name != safe_name(self.name) or self.name in (".", ".."):
            raise InputError(f"{self.id}: unsafe target name {self.name!r}")

    @property
    def length(self) -> int:
        return len(self.sequence)

    @property
    def sequence_hash(self) -> str:
        return sequence_hash(self.sequence)


@dataclass(frozen=True, slots=True)
class InputProblem:
    """A record that could not be used, with where it came from and why."""

    source: str
    line: int
    record_id: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        rid = f" record {self.record_id!r}" if self.record_id else ""
        return f"{where}{rid}: {self.message}"


@dataclass(frozen=True, slots=True)
class ParsedInput:
    targets: tuple[Target, ...]
    problems: tuple[InputProblem, ...]


def sequence_hash(sequence: str) -> str:
    """Stable content id of a sequence (the cache shares work between identical sequences)."""
    return hashlib.sha256(sequence.encode("ascii")).hexdigest()


def safe_name(raw: str) -> str:
    """A file name made from an untrusted id: letters, digits, '.', '_' and '-' only."""
    name = _UNSAFE.sub("_", raw).strip("._-")
    name = name[:MAX_NAME_LEN].rstrip("._-")
    return name or "target"


class UniqueNames:
    """Target names made unique: `base`, else `base_2`, `base_3`, ... (the first not taken).

    Compared case-insensitively, so two names never share a folder on a case-insensitive file
    system either. Each base remembers its last number, so a million ids that share their
    first `MAX_NAME_LEN` characters (long contig ids) cost linear time, and the base is cut
    to leave room for the number: a name never outgrows `MAX_NAME_LEN`.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._last: dict[str, int] = {}

    def add(self, base: str) -> str:
        name, n = base, self._last.get(base.lower(), 1)
        while name.lower() in self._taken:
            n += 1
            suffix = f"_{n}"
            name = base[: MAX_NAME_LEN - len(suffix)].rstrip("._-") + suffix
        self._last[base.lower()] = n
        self._taken.add(name.lower())
        return name


@dataclass(slots=True)
class _RawRecord:
    source: str
    line: int
    header: str
    sequence: str
    whole_header_is_id: bool = False  # an A3M file's stem: `my prot.a3m` is `my prot`


def _kind(path: Path) -> str:
    """The file's format suffix, under any compression suffix: `x.fasta.gz` -> `.fasta`."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _read_text(path: Path) -> str:
    """The file's text, decompressed if its name says so; utf-8-sig, so that a byte-order
    mark (Windows editors) does not hide the first header."""
    opener = _OPENERS.get(path.suffix.lower())
    try:
        if opener is None:
            return path.read_text(encoding="utf-8-sig", errors="replace")
        if _kind(path) in A3M_SUFFIXES:
            raise InputError(f"{path}: compressed A3M files are not read (precomputed MSAs are "
                             "looked up as <id>.a3m); decompress it first")
        with opener(path, "rt", encoding="utf-8-sig", errors="replace") as handle:
            return str(handle.read())
    except (OSError, EOFError, lzma.LZMAError) as exc:  # BadGzipFile is an OSError
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(f"{path}: cannot read: {reason}") from exc


def _fasta_records(path: Path, comments: tuple[str, ...] = (";",)) -> list[_RawRecord]:
    records: list[_RawRecord] = []
    current: _RawRecord | None = None
    chunks: list[str] = []
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip().strip("\0")  # MMseqs2's entry ends (ColabFold's MSA files)
        if not line or line.startswith(comments):
            continue
        if line.startswith(">"):
            if current is not None:
                current.sequence = "".join(chunks)
                records.append(current)
            current = _RawRecord(str(path), lineno, line[1:].strip(), "")
            chunks = []
        elif current is None:
            records.append(_RawRecord(str(path), lineno, "", "\0sequence data before any '>' header"))
            current = None
        else:
            chunks.append(line)
    if current is not None:
        current.sequence = "".join(chunks)
        records.append(current)
    return records


def _csv_records(path: Path) -> list[_RawRecord]:
    text = _read_text(path)
    dialect = "excel-tab" if _kind(path) == ".tsv" else "excel"
    rows = list(csv.reader(text.splitlines(), dialect=dialect))
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if "id" not in header or "sequence" not in header:
        raise InputError(f"{path}:1: CSV needs a header with columns 'id' and 'sequence'")
    id_col, seq_col = header.index("id"), header.index("sequence")
    records = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(id_col, seq_col):
            records.append(_RawRecord(str(path), lineno, row[0] if row else "", "\0missing column"))
            continue
        records.append(_RawRecord(str(path), lineno, row[id_col].strip(), row[seq_col]))
    return records


def _a3m_records(path: Path) -> list[_RawRecord]:
    """The first sequence of an A3M file (gaps removed) as one record named after the file.

    '#' lines (ColabFold's `#<length>\t<cardinality>` first line) are comments, as in
    `precomputed.read_msa`.
    """
    records = _fasta_records(path, comments=(";", "#"))
    if not records:
        return [_RawRecord(str(path), 1, path.stem, "\0no sequence in the A3M file",
                       whole_header_is_id=True)]
    first = records[0]
    return [_RawRecord(first.source, first.line, path.stem,
                       first.sequence if first.sequence.startswith("\0")
                       else first.sequence.replace("-", "").replace(".", ""),
                       whole_header_is_id=True)]


def a3m_share(path: Path | str) -> str:
    """How much of INPUT is A3M files: "all", "some" (a folder that mixes them with FASTA
    or CSV files) or "none"."""
    path = Path(path)
    if not path.is_dir():  # a compressed one is refused when read
        return "all" if path.suffix.lower() in A3M_SUFFIXES else "none"
    try:
        kinds = {p.suffix.lower() in A3M_SUFFIXES for p in _input_files(path)}
    except InputError:
        return "none"
    return "all" if kinds == {True} else "some" if True in kinds else "none"


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and (p.suffix.lower() in A3M_SUFFIXES
                                or _kind(p) in FASTA_SUFFIXES + TABLE_SUFFIXES)
        )
        if not files:
            raise InputError(f"{path}: folder holds no FASTA, A3M or CSV files")
        return files
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    return [path]


def _clean_sequence(raw: str) -> tuple[str, str | None]:
    """Upper-cased sequence without whitespace, or the reason it is unusable."""
    if raw.startswith("\0"):
        return "", raw[1:]
    seq = "".join(raw.split())
    if not seq.isascii():  # str.upper() would turn 'ß' into 'SS' and 'ı' into 'I'
        shown = ", ".join(repr(c) for c in sorted({c for c in seq if not c.isascii()})[:10])
        return "", f"characters that are not amino-acid letters: {shown}"
    seq = seq.upper().rstrip("*")
    if not seq:
        return "", "empty sequence"
    if ":" in seq:
        return "", "':' marks a complex; parafold folds single chains (monomer presets)"
    bad = sorted(set(seq) - ACCEPTED_AA)
    if bad:
        shown = ", ".join(repr(c) for c in bad[:10])
        return "", f"characters that are not amino-acid letters: {shown}"
    letters = set(seq)
    if (len(seq) >= _NUCLEOTIDE_MIN_LENGTH and letters <= _NUCLEOTIDE_LETTERS
            and len(letters - {"N"}) >= 3):
        return "", ("looks like DNA or RNA (only the letters A, C, G, T, U, N): give protein "
                    "sequences (translate genes first)")
    return seq, None


def _records(file: Path) -> list[_RawRecord]:
    kind = _kind(file)
    if kind in TABLE_SUFFIXES:
        return _csv_records(file)
    return _a3m_records(file) if kind in A3M_SUFFIXES else _fasta_records(file)


def _file_problem(file: Path, message: str) -> InputProblem:
    """A whole file of an INPUT folder that cannot be read, as a problem of its own."""
    for prefix, line in ((f"{file}:1: ", 1), (f"{file}: ", 0)):
        if message.startswith(prefix):
            return InputProblem(str(file), line, "", message[len(prefix):])
    return InputProblem(str(file), 0, "", message)


def read_targets(path: Path | str) -> ParsedInput:
    """All good targets from a FASTA file, a folder of FASTA/CSV files, or a CSV. In a
    folder, a file that cannot be read (a download cut short, a CSV without its header) is a
    problem like a bad record, and the other files go on.

    Raises:
        InputError: the path itself is unusable (missing, unreadable, a CSV without header).
    """
    path = Path(path)
    targets: list[Target] = []
    problems: list[InputProblem] = []
    seen_ids: dict[str, str] = {}
    used_names = UniqueNames()
    for file in _input_files(path):
        try:
            records = _records(file)
        except InputError as exc:
            if not path.is_dir():
                raise
            problems.append(_file_problem(file, str(exc)))  # the folder's other files go on
            continue
        if not records:
            problems.append(InputProblem(str(file), 0, "", "no records (an empty file?)"))
        for rec in records:
            record_id = (rec.header.strip() if rec.whole_header_is_id
                         else rec.header.split()[0] if rec.header.split() else "")
            seq, problem = _clean_sequence(rec.sequence)
            if problem is None and not record_id:
                problem = "record has no id"
            if problem is None and record_id in seen_ids:
                problem = f"duplicate id (first seen at {seen_ids[record_id]})"
            if problem is not None:
                problems.append(InputProblem(rec.source, rec.line, record_id, problem))
                continue
            seen_ids[record_id] = f"{rec.source}:{rec.line}"
            name = used_names.add(safe_name(record_id))
            targets.append(Target(record_id, name, seq, f"{rec.source}:{rec.line}",
                                  header=rec.header.strip()))
    return ParsedInput(tuple(targets), tuple(problems))
