"""HH-suite databases (a3m, hhm, cs219 ffindex triplets) built with the real HH-suite tools.

The recipe is HH-suite's own: `ffindex_build` packs the cluster A3Ms, `ffindex_apply hhmake`
turns each into an HMM, and `cstranslate` writes the column-state sequences that hhblits'
prefilter reads. Debian's `cstranslate` dispatcher is broken, so the SIMD variant is chosen
here from the CPU flags.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from parafold.errors import ToolFailedError, ToolNotFoundError, ToolTimeoutError

__all__ = ["HHTools", "find_hh_tools", "build_hh_databases", "run_tool"]

log = logging.getLogger(__name__)

_LIBEXEC = Path("/usr/libexec/hhsuite")
_CS_VARIANTS = ("avx2", "avx", "sse4.1", "ssse3", "sse3", "plain")
_DATE_LINE = re.compile(rb"^DATE  [^\n]*", re.MULTILINE)
_COM_LINE = re.compile(rb"^COM   [^\n]*", re.MULTILINE)
_DATA_DIRS = ("/usr/share/hhsuite/data", "/usr/share/hhsuite", "/usr/lib/hhsuite/data",
              "/usr/local/share/hhsuite/data", "/opt/hhsuite/data")


@dataclass(frozen=True, slots=True)
class HHTools:
    """Paths to everything a database build runs or reads."""

    ffindex_build: str
    ffindex_apply: str
    hhmake: str
    cstranslate: str
    cs219_lib: Path
    context_data: Path


def run_tool(cmd: list[str], *, timeout_s: float = 3600.0, cwd: Path | None = None) -> str:
    """Run one program (argument list, no shell); its stdout, or a `ToolError` with stderr."""
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ToolTimeoutError(cmd, timeout_s) from exc
    except FileNotFoundError as exc:
        raise ToolNotFoundError(f"{cmd[0]}: not found") from exc
    if proc.returncode != 0:
        raise ToolFailedError(cmd, proc.returncode, (proc.stderr or proc.stdout)[-20000:])
    return proc.stdout


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _simd_binary(name: str) -> str | None:
    """The fastest SIMD build of an HH-suite program this CPU runs, skipping Debian's
    dispatcher script (broken for cstranslate, and a bash start per call for hhmake)."""
    flags = _cpu_flags()
    for variant in _CS_VARIANTS:
        path = _LIBEXEC / f"{name}-{variant}"
        usable = variant == "plain" or variant.replace(".", "_") in flags or variant in flags
        if usable and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def _context_file(name: str) -> Path | None:
    dirs = [os.path.join(os.environ["HHLIB"], "data")] if os.environ.get("HHLIB") else []
    for folder in [*dirs, *_DATA_DIRS]:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def find_hh_tools() -> HHTools:
    """Locate the HH-suite programs and context library, failing before any work starts.

    Raises:
        ToolNotFoundError: a program or the cs219 context library is missing.
    """
    found = {name: shutil.which(name) for name in ("ffindex_build", "ffindex_apply")}
    found["hhmake"] = _simd_binary("hhmake")
    found["cstranslate"] = _simd_binary("cstranslate")
    missing = [name for name, path in found.items() if path is None]
    lib, crf = _context_file("cs219.lib"), _context_file("context_data.crf")
    if lib is None or crf is None:
        missing.append("cs219.lib/context_data.crf (HH-suite data)")
    if missing:
        raise ToolNotFoundError(f"HH-suite tools needed to build test databases: {missing}")
    assert lib is not None and crf is not None
    return HHTools(cs219_lib=lib, context_data=crf,
                   **{k: v for k, v in found.items() if v is not None})


def build_hh_databases(databases: Mapping[Path, Iterable[tuple[str, str]]], tools: HHTools,
                       *, work: Path) -> dict[Path, int]:
    """Write `<prefix>_{a3m,hhm,cs219}.ff{data,index}` for each prefix from (key, A3M) clusters.

    All clusters go through one ffindex_build, one hhmake pass and one cstranslate run (whose
    start-up, loading the context library, dominates small builds), then are split by prefix.
    Keys must be unique across databases. Returns the cluster count per prefix.
    """
    src = work / "a3m_src"
    src.mkdir(parents=True)
    owner: dict[str, Path] = {}
    for prefix, clusters in databases.items():
        for key, text in clusters:
            if key in owner or "/" in key:
                raise ValueError(f"cluster key {key!r} repeated or not a file name")
            (src / key).write_text(text, encoding="ascii")
            owner[key] = prefix
    allp = work / "all"
    run_tool([tools.ffindex_build, "-s", f"{allp}_a3m.ffdata", f"{allp}_a3m.ffindex", str(src)])
    hhmake = [tools.ffindex_apply, "-q", f"{allp}_a3m.ffdata", f"{allp}_a3m.ffindex",
              "-i", f"{allp}_hhm.ffindex", "-d", f"{allp}_hhm.ffdata",
              "--", tools.hhmake, "-i", "stdin", "-o", "stdout", "-v", "0"]
    cstranslate = [tools.cstranslate, "-f", "-x", "0.3", "-c", "4", "-I", "a3m", "-b",
                   "-i", f"{allp}_a3m", "-o", f"{allp}_cs219",
                   "-A", str(tools.cs219_lib), "-D", str(tools.context_data)]
    # Both only read the A3M database, and each is CPU-bound: run them side by side.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for job in [pool.submit(run_tool, cmd) for cmd in (cstranslate, hhmake)]:
            job.result()
    for kind in ("a3m", "hhm", "cs219"):
        _split(Path(f"{allp}_{kind}"), kind, owner, list(databases))
    shutil.rmtree(src)
    counts = dict.fromkeys(databases, 0)
    for prefix in owner.values():
        counts[prefix] += 1
    return counts


def _split(combined: Path, kind: str, owner: Mapping[str, Path], prefixes: list[Path]) -> None:
    """Copy each entry of one ffindex database into its owner's, index sorted by key."""
    data = combined.with_name(combined.name + ".ffdata").read_bytes()
    index = combined.with_name(combined.name + ".ffindex").read_text(encoding="ascii")
    entries: dict[Path, list[tuple[str, int, int]]] = {p: [] for p in prefixes}
    for line in index.splitlines():
        key, offset, length = line.split("\t")
        if key not in owner:
            raise ValueError(f"{combined}: unexpected entry {key!r}")
        entries[owner[key]].append((key, int(offset), int(length)))
    for prefix, rows in entries.items():
        with open(f"{prefix}_{kind}.ffdata", "wb") as out_data, \
                open(f"{prefix}_{kind}.ffindex", "w", encoding="ascii") as out_index:
            pos = 0
            for key, offset, length in sorted(rows):
                chunk = data[offset:offset + length]
                if kind == "hhm":
                    chunk = _stable_hhm(chunk)
                out_data.write(chunk)
                out_index.write(f"{key}\t{pos}\t{len(chunk)}\n")
                pos += len(chunk)


def _stable_hhm(hhm: bytes) -> bytes:
    """Drop the build time and binary path hhmake records, so equal seeds give equal bytes."""
    hhm = _DATE_LINE.sub(b"DATE  Thu Jan  1 00:00:00 1970", hhm, count=1)
    return _COM_LINE.sub(b"COM   hhmake -i stdin -o stdout -v 0", hhm, count=1)
