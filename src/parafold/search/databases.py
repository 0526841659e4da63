"""Finding the AlphaFold database layout under one folder, and fingerprinting it.

The globs follow docs/layout.md, so database versions may differ from AlphaFold's file names.
A fingerprint is SHA-256 over each of a database's files: its name relative to the
database's folder, its size and a sample of its bytes (64 KiB at its start, middle and end;
for the PDB's mmCIF files, one per entry, name and size alone). Not over whole contents:
real databases are terabytes, and reading them for every run would cost hours. Not over
modification times either: clusters copy databases to node-local disks for every job, and a
copy (`cp` without `-p`) has new times but the same searches, so it keeps its fingerprint and
the search cache stays valid. A rebuilt or newer release differs in size or in the sampled
bytes, and gets a new fingerprint.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from parafold.errors import DatabaseNotFoundError, InputError
from parafold.search.settings import MSA_MODES, PRESETS, SearchSettings
from parafold.store import fingerprint_files

__all__ = ["DatabaseSet", "DatabaseStatus", "DB_NAMES", "find_databases", "check_databases",
           "database_fingerprint", "hh_db_files", "mmseqs_db_files", "mmseqs_fingerprint",
           "required_databases", "only_templates", "TEMPLATE_DATABASES"]

log = logging.getLogger(__name__)

DB_NAMES = ("uniref90", "mgnify", "bfd", "uniref30", "small_bfd", "pdb70", "pdb_mmcif",
            "pdb_seqres", "mmseqs_uniref30", "mmseqs_env", "mmseqs_pdb")
# MMseqs2 mode needs only the UniRef30-style database; the environmental one adds MSA rows
# and pdb sequences (with pdb_mmcif) add templates when present.
MMSEQS_OPTIONAL = ("mmseqs_env", "mmseqs_pdb", "pdb_mmcif")
# What the template search and featurizer read; a set made without templates reads none.
TEMPLATE_DATABASES = ("pdb70", "pdb_mmcif", "pdb_seqres", "mmseqs_pdb")
_REQUIRED = {
    "full_dbs": ("uniref90", "mgnify", "bfd", "uniref30", "pdb70", "pdb_mmcif"),
    "reduced_dbs": ("uniref90", "mgnify", "small_bfd", "pdb70", "pdb_mmcif"),
}
# (sub-folder, glob, kind): kind "file" is the file itself, "hh" the prefix before `suffix`.
_LAYOUT: dict[str, tuple[str, str, str]] = {
    "uniref90": ("uniref90", "*.fasta", "file"),
    "mgnify": ("mgnify", "*.fa*", "file"),
    "bfd": ("bfd", "*_a3m.ffdata", "hh"),
    "uniref30": ("uniref30", "*_a3m.ffdata", "hh"),
    "small_bfd": ("small_bfd", "*.fasta", "file"),
    "pdb70": ("pdb70", "*_hhm.ffdata", "hh"),
    "pdb_mmcif": ("pdb_mmcif", "mmcif_files", "dir"),
    "pdb_seqres": ("pdb_seqres", "pdb_seqres.txt", "file"),
    # MMseqs2 databases: the prefix of `<prefix>.dbtype` (ColabFold names match these globs).
    "mmseqs_uniref30": ("mmseqs", "uniref30*.dbtype", "mmseqs"),
    "mmseqs_env": ("mmseqs", "*env*.dbtype", "mmseqs"),
    "mmseqs_pdb": ("mmseqs", "pdb*.dbtype", "mmseqs"),
}
HH_PARTS = ("a3m", "cs219", "hhm")  # sorted: fingerprints list files in name order
# The parts of an MMseqs2 database `P` (headers, cluster members, alignments, taxonomy), each
# `P_<part>`: a `.dbtype` of such a name is not a database in its own right.
_MMSEQS_PARTS = ("h", "seq", "seq_h", "aln", "ss", "ss_h", "ca3m", "ca3m_h", "mapping",
                 "taxonomy", "nodes", "names", "merged", "delnodes")
_MMSEQS_COMPANIONS = tuple(f"_{part}" for part in _MMSEQS_PARTS)
# What may follow an MMseqs2 database prefix in the name of one of its own files: nothing (the
# data), `.<ext>` (`.dbtype`, `.index`, `.lookup`, `.source`, `.idx*`, `.0`, `.1`, ... of a
# threaded write), or one of its parts, itself followed by nothing or `.<ext>`. Anything else
# is a sibling database whose name merely starts the same (`pdb` and `pdb100_db`,
# `uniref30_db` and `uniref30_db2`).
_MMSEQS_OWN_SUFFIX = re.compile(
    "(?:_(?:" + "|".join(sorted(_MMSEQS_PARTS, key=len, reverse=True)) + r"))?(?:\..+)?")


def only_templates(names: list[str]) -> bool:
    """Whether the databases `names` are all template databases (`--no-templates` needs none)."""
    return set(names) <= set(TEMPLATE_DATABASES)


def required_databases(preset: str, msa_mode: str = "classic", *,
                       templates: bool = True) -> tuple[str, ...]:
    """The databases a run cannot start without (precomputed and single-sequence need none;
    without `templates`, no template database)."""
    if preset not in _REQUIRED:
        raise InputError(f"unknown database preset {preset!r}; use one of {PRESETS}")
    if msa_mode not in MSA_MODES:
        raise InputError(f"unknown MSA mode {msa_mode!r}; use one of {MSA_MODES}")
    if msa_mode == "mmseqs":
        return ("mmseqs_uniref30",)
    if msa_mode != "classic":
        return ()
    return tuple(n for n in _REQUIRED[preset] if templates or n not in TEMPLATE_DATABASES)


@dataclass(frozen=True, slots=True)
class DatabaseSet:
    """Where each database is. HH-suite databases are prefixes (path minus `_a3m.ffdata`).

    `fingerprints` is filled by `fingerprinted()`; it is computed once per run, not per target.
    Without `templates` (`--no-templates`: no template search, as ColabFold's default) the
    template databases count as absent, whether or not they are on disk: nothing searches or
    fingerprints them, and each MSA mode's own "no template database" path is taken.
    """

    preset: str
    paths: tuple[tuple[str, Path | None], ...]
    fingerprints: tuple[tuple[str, str], ...] = field(default=())
    msa_mode: str = "classic"
    templates: bool = True

    def __post_init__(self) -> None:
        required_databases(self.preset, self.msa_mode)
        unknown = {name for name, _ in self.paths} - set(DB_NAMES)
        if unknown:
            raise InputError(f"unknown databases: {sorted(unknown)}")

    def path(self, name: str) -> Path | None:
        if not self.templates and name in TEMPLATE_DATABASES:
            return None
        return dict(self.paths).get(name)

    def require(self, name: str) -> Path:
        """The path of a database the preset needs.

        Raises:
            DatabaseNotFoundError: it was not found.
        """
        path = self.path(name)
        if path is None:
            raise DatabaseNotFoundError(f"database {name} is missing (needed by {self.preset})")
        return path

    @property
    def required(self) -> tuple[str, ...]:
        return required_databases(self.preset, self.msa_mode, templates=self.templates)

    @property
    def used(self) -> tuple[str, ...]:
        """What this mode reads: the required databases plus the optional ones present."""
        optional = MMSEQS_OPTIONAL if self.msa_mode == "mmseqs" else ()
        return self.required + tuple(n for n in optional if self.path(n) is not None)

    def for_search(self, settings: SearchSettings) -> DatabaseSet:
        """The same paths seen by these settings' MSA mode, with or without templates (their
        own required set and fingerprints)."""
        if (settings.msa_mode, settings.use_templates) == (self.msa_mode, self.templates):
            return self
        return replace(self, msa_mode=settings.msa_mode, templates=settings.use_templates,
                       fingerprints=())

    def missing(self) -> list[str]:
        return [name for name in self.required if self.path(name) is None]

    @property
    def needed_by(self) -> str:
        """What needs the required databases, as the user named it: the preset, or the mode."""
        return self.preset if self.msa_mode == "classic" else f"--msa-mode {self.msa_mode}"

    @property
    def mmcif_dir(self) -> Path:
        return self.require("pdb_mmcif") / "mmcif_files"

    @property
    def obsolete_pdbs(self) -> Path | None:
        mmcif = self.path("pdb_mmcif")
        path = mmcif / "obsolete.dat" if mmcif else None
        return path if path is not None and path.is_file() else None

    def fingerprinted(self) -> DatabaseSet:
        """This set with a fingerprint for every database the preset uses.

        Raises:
            DatabaseNotFoundError: a required database is missing.
        """
        if self.fingerprints:
            return self
        missing = self.missing()
        if missing:
            hint = " (or run without templates: --no-templates)" if only_templates(missing) else ""
            raise DatabaseNotFoundError(
                f"missing databases for {self.needed_by}: {', '.join(missing)}{hint}")
        prints = tuple((name, database_fingerprint(name, self.require(name)))
                       for name in self.used)
        return replace(self, fingerprints=prints)

    def fingerprint_map(self) -> dict[str, str]:
        return dict(self.fingerprinted().fingerprints)


def _database_files(name: str, path: Path) -> list[Path]:
    kind = _LAYOUT[name][2]
    if kind == "file":
        return [path]
    if kind == "hh":
        return hh_db_files(path)
    if kind == "mmseqs":
        return _mmseqs_data_files(path)
    files = sorted(p for p in (path / "mmcif_files").iterdir() if p.is_file())
    return files + [p for p in (path / "obsolete.dat",) if p.is_file()]


def hh_db_files(prefix: Path) -> list[Path]:
    """The ffindex files of the HH-suite database `prefix` (`_a3m`, `_hhm`, `_cs219`), sorted;
    never a sibling's (`pdb70` vs `pdb70_2023_...`), which a `prefix_*` glob would take."""
    return [f for part in HH_PARTS for ext in (".ffdata", ".ffindex")
            if (f := prefix.with_name(f"{prefix.name}_{part}{ext}")).is_file()]


def mmseqs_db_files(prefix: Path) -> list[Path]:
    """The files of the MMseqs2 database `prefix` (its parts and indexes included), sorted.

    Never a sibling database's files, though its name starts with `prefix` too.
    """
    if not prefix.parent.is_dir():
        return []
    return sorted(p for p in prefix.parent.glob(glob.escape(prefix.name) + "*")
                  if _MMSEQS_OWN_SUFFIX.fullmatch(p.name[len(prefix.name):]) and p.is_file())


def _mmseqs_data_files(prefix: Path) -> list[Path]:
    """An MMseqs2 database's files but its indexes: those are ours, made later, and must not
    change the fingerprint."""
    return [p for p in mmseqs_db_files(prefix) if ".idx" not in p.name[len(prefix.name):]]


def mmseqs_fingerprint(prefix: Path) -> str:
    """The fingerprint of the MMseqs2 database `prefix` (what `database_fingerprint` gives)."""
    return fingerprint_files(_mmseqs_data_files(prefix))


def database_fingerprint(name: str, path: Path) -> str:
    """The fingerprint of database `name` at `path` (see the module docstring)."""
    return fingerprint_files(_database_files(name, path), sample=_LAYOUT[name][2] != "dir")


def _glob_in(name: str, folder: Path) -> Path | None:
    _, pattern, kind = _LAYOUT[name]
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if kind == "mmseqs":
        found = [p for p in found if not p.stem.endswith(_MMSEQS_COMPANIONS)
                 and ".idx" not in p.stem]
    if not found:
        return None
    if len(found) > 1:
        _warn_several(name, folder, found)
    if kind == "mmseqs":
        return found[0].with_suffix("")
    if kind == "hh":
        return found[0].with_name(found[0].name[: -len(pattern.lstrip("*"))])
    return found[0]


_WARNED: set[tuple[str, Path]] = set()


def _warn_several(name: str, folder: Path, found: list[Path]) -> None:
    """Say once which of several candidates is used: an upgrade that kept the old release
    beside the new one would otherwise search the old one without a word."""
    if (name, folder) in _WARNED:
        return
    _WARNED.add((name, folder))
    choose = (f"give --{name.replace('_', '-')} PATH to choose" if not name.startswith("mmseqs")
              else "move the others out to choose")
    log.warning("%s: %d candidates in %s (%s); using %s (%s)", name, len(found), folder,
                ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else ""),
                found[0].name, choose)


def _find_one(name: str, db_dir: Path) -> Path | None:
    sub, pattern, kind = _LAYOUT[name]
    if kind == "dir":
        return db_dir / sub if (db_dir / sub / pattern).is_dir() else None
    return _glob_in(name, db_dir / sub)


def _override(name: str, path: Path) -> Path | None:
    """A user's path: the file or HH-suite prefix itself, or a folder holding it."""
    kind = _LAYOUT[name][2]
    if kind == "dir":
        return path if (path / "mmcif_files").is_dir() else None
    if path.is_dir():
        return _glob_in(name, path)
    if kind == "hh":
        return path if hh_db_files(path) else None
    if kind == "mmseqs":
        return path if path.with_name(path.name + ".dbtype").is_file() else None
    return path if path.is_file() else None


def find_databases(db_dir: Path | str | None, preset: str = "full_dbs",
                   overrides: dict[str, Path | str | None] | None = None,
                   msa_mode: str = "classic", templates: bool = True) -> DatabaseSet:
    """Every database found under `db_dir` (AlphaFold layout), with per-database overrides
    (`templates`: see `DatabaseSet`).

    A missing database is recorded as None here; `fingerprinted()` or `require()` fail on it.

    Raises:
        InputError: an unknown preset or database name, or an override that does not exist.
    """
    required_databases(preset, msa_mode)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(DB_NAMES)
    if unknown:
        raise InputError(f"unknown database overrides: {sorted(unknown)}")
    paths: list[tuple[str, Path | None]] = []
    for name in DB_NAMES:
        if name in overrides:
            given = Path(overrides[name]).expanduser()
            found = _override(name, given)
            if found is None:
                raise InputError(f"--{name.replace('_', '-')} {given}: not found")
        else:
            found = _find_one(name, Path(db_dir).expanduser()) if db_dir is not None else None
        paths.append((name, found.absolute() if found is not None else None))
    return DatabaseSet(preset=preset, paths=tuple(paths), msa_mode=msa_mode, templates=templates)


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    name: str
    path: Path | None
    required: bool
    fingerprint: str

    @property
    def present(self) -> bool:
        return self.path is not None


def check_databases(dbs: DatabaseSet) -> list[DatabaseStatus]:
    """Present/missing and fingerprint of every known database, marking what the preset needs."""
    out = []
    for name in DB_NAMES:
        path = dbs.path(name)
        fp = database_fingerprint(name, path) if path is not None else ""
        out.append(DatabaseStatus(name, path, name in dbs.required, fp))
    return out
