"""MSAs the user already has: `<dir>/<target id or name>.a3m` (or `.sto`, either extension in
any case), checked, then features.

A precomputed MSA is trusted only after checks that catch the usual mix-ups (another
protein's file, a truncated or hand-edited alignment): its first sequence must be the target
(gaps removed), and every row must align to the query's columns (A3M: uppercase letters plus
'-' count the columns; lowercase letters are insertions, '.' gaps between them). A bad file is
an `InputError` naming the file and the line, never a silently wrong feature dict.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path

from alphafold.data import parsers

from parafold.errors import InputError
from parafold.inputs import Target

__all__ = ["MSA_SUFFIXES", "find_msa_file", "read_msa", "file_digest", "stored_msa_name"]

MSA_SUFFIXES = (".a3m", ".sto")
# A3M's '.' (HH-suite) and Stockholm's (hmmalign): a gap in an insert column
_MSA_ROW = re.compile(r"^[A-Za-z.\-]*$")


def colabfold_msa_stem(header: str) -> str:
    """The name `colabfold_search` gives a query's A3M: its whole FASTA header with every
    character but letters, digits, '_', '.' and '-' made '_' (ColabFold's `safe_filename`):
    `sp|P12345|NAME_HUMAN Some protein OS=Homo sapiens` -> `sp_P12345_NAME_HUMAN_Some_protein_
    OS_Homo_sapiens`."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in header)


def find_msa_file(msa_dir: Path | str, target: Target) -> Path:
    """The target's MSA file: `<id>` first, then `<name>`, then ColabFold's name for its
    header (`colabfold_msa_stem`), `.a3m` before `.sto`.

    Raises:
        InputError: no such file (the names tried are in the message).
    """
    folder = Path(msa_dir)
    tried = []
    stems = (target.id, target.name, colabfold_msa_stem(target.header) if target.header else "")
    for stem in dict.fromkeys(s for s in stems if s):
        if "/" in stem or stem in (".", ".."):
            continue
        for suffix in MSA_SUFFIXES:
            tried.append(f"{stem}{suffix}")
            found = _existing(folder, stem, suffix)
            if found is not None:
                return found
    raise InputError(f"{target.id}: no precomputed MSA in {folder} (tried {', '.join(tried)}, "
                     "the extensions in any case)")


def _existing(folder: Path, stem: str, suffix: str) -> Path | None:
    """`<stem><suffix>` with the suffix in any case (`P2.A3M` too), lower case first; each
    spelling tried by name, not by listing a folder that may hold a million MSAs."""
    spellings = itertools.product(*(dict.fromkeys((c.lower(), c.upper())) for c in suffix))
    for spelling in spellings:
        path = folder / f"{stem}{''.join(spelling)}"
        try:
            if path.is_file():
                return path
        except OSError:  # e.g. a very long id: ENAMETOOLONG; the safe name comes next
            return None
    return None


def stored_msa_name(path: Path) -> str:
    """The name a precomputed MSA gets in a feature folder's `msas/`."""
    return f"precomputed{path.suffix.lower()}"


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes: a changed MSA is a new cache key."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _a3m_rows(path: Path, text: str) -> list[tuple[int, str, str]]:
    """(line of the header, name, sequence) per record; characters checked per line."""
    rows: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(">"):
            rows.append((lineno, line[1:].split("\t")[0].strip(), ""))
        elif not rows:
            raise InputError(f"{path}:{lineno}: sequence data before the first '>' header")
        elif not _MSA_ROW.match(line):
            bad = sorted(set(re.sub(r"[A-Za-z.\-]", "", line)))
            raise InputError(f"{path}:{lineno}: characters not allowed in A3M: {bad[:5]}")
        else:
            start, name, seq = rows[-1]
            rows[-1] = (start, name, seq + line)
    return rows


def _one_query(path: Path, text: str) -> str:
    """The text without the NUL bytes MMseqs2's databases end each entry with (ColabFold's
    MSA server files: `uniref.a3m`, the environmental one, or the two joined). Entries of one
    query (the same first header) are one MSA, as ColabFold reads them.

    Raises:
        InputError: the entries are of several queries.
    """
    if "\0" not in text:
        return text
    parts = [part.strip() for part in text.split("\0") if part.strip()]
    queries = dict.fromkeys(part.split("\n", 1)[0].strip() for part in parts)
    if len(queries) > 1:
        shown = ", ".join(list(queries)[:3])
        raise InputError(f"{path}: holds the MSAs of {len(queries)} queries ({shown}) "
                         "separated by NUL bytes (an MMseqs2 database file): give one query's "
                         "MSA per file")
    return "\n".join(parts) + "\n"


def _check_query(where: str, first: str, target: Target) -> None:
    query = first.replace("-", "").replace(".", "").upper()
    if query != target.sequence:
        raise InputError(
            f"{where}: the first sequence is not target {target.id!r} "
            f"({len(query)} residues, starting {query[:20]!r}; the target has "
            f"{target.length}, starting {target.sequence[:20]!r})")


def read_msa(path: Path, target: Target) -> parsers.Msa:
    """The validated MSA of `target` from an A3M or Stockholm file.

    Raises:
        InputError: unreadable, empty, first sequence not the target, or ragged rows.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read MSA: {exc}") from exc
    text = _one_query(path, text)
    if not text.strip():
        raise InputError(f"{path}: empty MSA file")
    if path.suffix.lower() == ".sto":
        return _read_stockholm(path, text, target)
    rows = _a3m_rows(path, text)
    if not rows or not rows[0][2]:
        raise InputError(f"{path}: no sequences in the MSA")
    _check_query(f"{path}:{rows[0][0]}", rows[0][2], target)
    for lineno, name, seq in rows:
        columns = sum(1 for c in seq if c.isupper() or c == "-")
        if columns != target.length:
            raise InputError(f"{path}:{lineno}: row {name!r} aligns {columns} columns; the "
                             f"query has {target.length} (uppercase letters and '-' count)")
    return parsers.parse_a3m(_for_alphafold_a3m(text))


def _for_alphafold_a3m(text: str) -> str:
    """The A3M as AlphaFold's parser takes it. It has no comments: a '#' line (ColabFold's
    first line) would crash it before the first header, or be glued onto a sequence after it.
    Nor does it know '.': like an insertion's letters, it is no column of the query."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line if line.startswith(">") else line.replace(".", "")
                     for line in lines if not line.startswith("#"))


def _stockholm_rows(path: Path, text: str) -> list[tuple[str, str]]:
    """(name, sequence) per sequence line, as AlphaFold's parser expects them: '.' gaps (insert
    columns, hmmalign's) as '-', and letters upper-cased, so a query residue in an insert
    column is a column and a hit's inserted letters are its deletions.

    Raises:
        InputError: a line is not '<name> <sequence>' or has characters no MSA holds.
    """
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(("#", "//")):
            continue
        fields = line.split(None, 1)  # any run of spaces or tabs between name and sequence
        if len(fields) != 2 or len(fields[1].split()) != 1:
            raise InputError(f"{path}:{lineno}: expected '<name> <aligned sequence>', got "
                             f"{line[:60]!r}")
        name, seq = fields
        if not _MSA_ROW.match(seq):
            bad = sorted(set(re.sub(r"[A-Za-z.\-]", "", seq)))
            raise InputError(f"{path}:{lineno}: characters not allowed in Stockholm: {bad[:5]}")
        rows.append((name, seq.replace(".", "-").upper()))
    return rows


def _read_stockholm(path: Path, text: str, target: Target) -> parsers.Msa:
    """The validated MSA of a Stockholm file (see `read_msa`)."""
    rows = _stockholm_rows(path, text)
    lengths: dict[str, int] = {}
    for name, seq in rows:
        lengths[name] = lengths.get(name, 0) + len(seq)
    if not lengths:
        raise InputError(f"{path}: no sequences in the Stockholm MSA")
    first = rows[0][0]
    ragged = {n: ln for n, ln in lengths.items() if ln != lengths[first]}
    if ragged:
        name, length = next(iter(ragged.items()))
        raise InputError(f"{path}: row {name!r} has {length} columns, the first row "
                         f"{lengths[first]}")
    try:
        msa = parsers.parse_stockholm("\n".join(f"{name} {seq}" for name, seq in rows))
    except (ValueError, IndexError, KeyError) as exc:
        raise InputError(f"{path}: malformed Stockholm MSA: {exc}") from exc
    _check_query(str(path), msa.sequences[0], target)
    return msa
