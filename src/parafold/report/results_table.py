"""`OUT/results.tsv`: one line per target for downstream tools (filter by pLDDT, collect PDBs).

The rows are the report's (`collect.collect`: the ledger and the target folders, read once),
sorted by folder name, in `RESULTS_COLUMNS` order after a header line. A value nobody wrote is
an empty cell; a tab, CR or newline inside a value (record ids and errors come from outside)
becomes a space, so every line has the same number of cells; a value with a double quote is
quoted as CSV readers expect (in double quotes, its own doubled), as pandas, R and Python's csv
read it back (bare, an id starting with a quote made them merge the lines that follow). The
file is replaced atomically: a killed run leaves the previous table or the new one, never half
of one.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from parafold.ledger import LEDGER_FILE
from parafold.report import RESULTS_FILE
from parafold.report.collect import RANKED_PDB, _Row, collect
from parafold.store import atomic_write_text

__all__ = ["RESULTS_FILE", "RESULTS_COLUMNS", "format_results", "read_results",
           "write_results_table"]

log = logging.getLogger(__name__)

RESULTS_COLUMNS = ("name", "id", "length", "msa_depth", "state", "best_model", "plddt", "ptm",
                   "max_pae", "relaxed", "ranked_pdb", "search_s", "predict_s", "error",
                   "search_max_rss_mib", "copied_from", "templates")
_FLATTEN = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def _fixed(value: float | None, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _cells(row: _Row) -> list[Any]:
    return [row.name, row.target_id, row.length, row.msa_depth, row.state, row.model,
            _fixed(row.plddt, 2), _fixed(row.ptm, 4), _fixed(row.max_pae, 2),
            int(row.relaxed), f"{row.name}/{RANKED_PDB}" if row.has_ranked_pdb else None,
            _fixed(row.search_s, 2), _fixed(row.predict_s, 3), row.error,
            _fixed(row.search_max_rss_mib, 1), row.copied_from, row.templates]


def format_results(rows: Iterable[_Row]) -> str:
    """The table's text: the header, then a line per row in the order given."""
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(RESULTS_COLUMNS)
    for row in rows:
        writer.writerow("" if v is None else str(v).translate(_FLATTEN) for v in _cells(row))
    return text.getvalue()


def read_results(text: str) -> list[dict[str, str]]:
    """A `results.tsv` text as one {column: cell} dict per line (quoted cells unquoted)."""
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def _int(cell: str | None) -> int | None:
    return int(cell) if cell and cell.isdigit() else None


def _fill_blanks(row: _Row, **values: Any) -> None:
    """Set each of the row's fields that nobody filled yet."""
    for name, value in values.items():
        if getattr(row, name) is None:
            setattr(row, name, value)


def _keep_what_only_the_last_table_knew(table: dict[str, _Row], path: Path) -> None:
    """`predict`'s OUT has no ledger and its folders no manifest: the id, length, MSA depth
    and templates of a target, and a target that failed (it has no folder), are known only to
    the `predict` that wrote the table. A later `report` (or another shard's `predict`) keeps
    them from that table instead of dropping them; a row of its own wins."""
    try:
        lines = read_results(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    for cells in lines:
        name = cells.get("name") or ""
        row = table.get(name)
        if row is None:
            if not name or cells.get("state") != "failed":
                continue
            row = table[name] = _Row(name, state="failed", error=cells.get("error") or None)
        _fill_blanks(row, target_id=cells.get("id") or None, length=_int(cells.get("length")),
                     msa_depth=_int(cells.get("msa_depth")),
                     templates=_int(cells.get("templates")))


def write_results_table(out_dir: Path | str, rows: Mapping[str, _Row] | None = None, *,
                        feature_sets: Iterable[Any] = (),
                        failures: Mapping[str, str | None] | None = None) -> Path:
    """Write `OUT/results.tsv`; return its path.

    `rows` are `collect(out_dir).rows` when the caller has them (the report does), else OUT is
    read here. `predict` has no ledger: its rows come from the target folders, and it passes
    what only it knows: its `feature_sets` (their `target_id`, length and MSA depth fill cells
    a folder without `features.json` leaves empty) and its `failures` ({name: error}; such a
    target is `failed` whatever its folder holds, e.g. a prediction whose relaxation failed).

    Raises:
        OSError: the table could not be written (callers log it: the table never fails a run).
    """
    out_dir = Path(out_dir)
    table = dict(rows) if rows is not None else collect(out_dir).rows
    for fs in feature_sets:
        row = table.setdefault(fs.name, _Row(fs.name))
        _fill_blanks(row, target_id=fs.target_id, length=fs.length, msa_depth=fs.msa_depth,
                     templates=fs.num_templates)
    for name, error in (failures or {}).items():
        row = table.setdefault(name, _Row(name))
        row.state, row.error = "failed", error or row.error
    path = out_dir / RESULTS_FILE
    if not (out_dir / LEDGER_FILE).is_file():
        _keep_what_only_the_last_table_knew(table, path)
    atomic_write_text(path, format_results(table[n] for n in sorted(table)))
    log.info("results of %d targets: %s", len(table), path)
    return path
