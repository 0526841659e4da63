"""`OUT/report.html`: one offline page for a whole run, usable at 10,000 targets.

The page embeds the run data as JSON and its own CSS and script; the table is drawn by the
script a page of rows at a time. Heavy things stay out of the page and load when a target is
opened: its PNG plots (relative `<img>` paths) and its structure, written beside it as
`OUT/<name>/ranked_0.pdb.js` (a script tag can load a local file from a file:// page, a fetch
cannot). The 3Dmol.js build shipped in the package is copied to `OUT/report/`.
Nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

from parafold.errors import InputError, is_storage_full
from parafold.report.collect import STRUCTURE_JS, collect, collect_run, is_target_dir
from parafold.report.results_table import write_results_table
from parafold.store import atomic_copy, atomic_write_text, remove_abandoned_parts

__all__ = ["REPORT_FILE", "ASSET_DIR", "VIEWER_JS", "render_page", "write_report",
           "write_structure_js"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
ASSET_DIR = "report"  # a name the pipeline reserves: no target can take it
VIEWER_JS = "3Dmol-min.js"
_VENDORED = (VIEWER_JS, "3Dmol-min.js.LICENSE.txt", "3Dmol-LICENSE.txt")
_PDB_RECORDS = ("ATOM", "HETATM", "TER", "MODEL", "ENDMDL", "END")
_DONE_MARKER = "ranking_debug.json"  # parafold.fold.outputs.DONE_FILE, without importing fold

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>parafold report: @@title@@</title>
<style>@@css@@</style></head>
<body>
<header><h1>parafold report: @@title@@</h1><div class="sub" id="pf-sub"></div></header>
<main>
<section><h2>Run summary</h2><div class="cards" id="pf-cards"></div><div id="pf-failures"></div></section>
<section><h2>Timeline</h2>
<div class="legend muted">what each worker ran, when:<span style="background:#f28e2b"></span>CPU search
<span style="background:#4e79a7"></span>GPU predict<span style="background:#d62728"></span>failed</div>
<div id="pf-timeline-wrap"><canvas id="pf-timeline" width="600" height="40"></canvas><div id="pf-tip"></div></div>
</section>
<section id="pf-detail"><h2 id="pf-dname"></h2><div id="pf-facts"></div><div class="fail" id="pf-derror"></div>
<div class="row"><div><div id="pf-viewer"></div><div class="muted" id="pf-viewer-msg"></div></div>
<div class="plots" id="pf-plots"></div></div>
</section>
<section><h2>Targets</h2>
<div class="controls"><input type="search" id="pf-filter" placeholder="filter: name, state or error">
<select id="pf-state"><option value="">all states</option></select>
<button id="pf-prev">&lsaquo; prev</button><button id="pf-next">next &rsaquo;</button>
<span id="pf-page" class="muted"></span></div>
<table id="pf-table"><thead><tr id="pf-head"></tr></thead><tbody id="pf-tbody"></tbody></table>
</section>
</main>
<script type="application/json" id="pf-data">@@data@@</script>
<script>@@js@@</script>
</body></html>
"""


def _asset(name: str) -> resources.abc.Traversable:
    return resources.files("parafold.report").joinpath("assets", name)


def write_structure_js(target_dir: Path) -> Path | None:
    """`ranked_0.pdb.js` beside `ranked_0.pdb`, rewritten only when the PDB is newer.

    The script calls `parafoldStructure(name, pdb_text)`; only coordinate records are kept.
    A folder without its done marker gets none: its `ranked_0.pdb` is an earlier
    prediction's (the target failed, or its sequence changed and it is queued again).
    """
    pdb = target_dir / "ranked_0.pdb"
    out = target_dir / STRUCTURE_JS
    try:
        if not pdb.is_file() or not (target_dir / _DONE_MARKER).is_file():
            return None
        if out.is_file() and out.stat().st_mtime >= pdb.stat().st_mtime:
            return out
        lines = [ln for ln in pdb.read_text(encoding="utf-8").splitlines()
                 if ln.startswith(_PDB_RECORDS)]
    except OSError as exc:
        log.warning("%s: structure unreadable (%s); no 3D view", pdb, exc)
        return None
    text = "\n".join(lines) + "\n"
    atomic_write_text(out, f"parafoldStructure({json.dumps(target_dir.name)}, "
                           f"{json.dumps(text)});\n")
    return out


def _missing_plots(folder: Path) -> bool:
    from parafold.report.plots import COVERAGE_PNG, PAE_PNG, PLDDT_PNG

    return any(
        not (folder / png).exists() and any(folder.glob(pattern))
        for png, pattern in ((PLDDT_PNG, "scores_*.json"), (PAE_PNG, "pae_*.json"),
                             (COVERAGE_PNG, "features.npz"))
    )


def _copy_assets(out_dir: Path) -> None:
    dest = out_dir / ASSET_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in _VENDORED:
        target = dest / name
        src = _asset(name)
        with resources.as_file(src) as path:
            if not target.is_file() or target.stat().st_size != path.stat().st_size:
                atomic_copy(path, target)  # a full disk leaves no half a viewer behind


def render_page(data: dict[str, Any], *, title: str) -> str:
    """The report page for data shaped like `collect_run`'s, with CSS and script inlined."""
    data = {**data, "viewer_src": f"{ASSET_DIR}/{VIEWER_JS}"}
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    parts = {
        "title": html.escape(title),
        "css": _asset("report.css").read_text(encoding="utf-8"),
        "js": _asset("report.js").read_text(encoding="utf-8"),
        "data": blob,
    }
    return re.sub(r"@@(\w+)@@", lambda m: parts[m.group(1)], _PAGE)


def write_report(out_dir: Path | str, *, plots: bool = True) -> Path:
    """Write `OUT/report.html` (and what it loads on demand) and `OUT/results.tsv` from the
    same reading of OUT; return the page's path. A table that cannot be written is logged.

    With `plots`, targets whose plots are missing get them drawn first (a run made with
    `--no-plots` can be given plots later). Targets are read as they are: a run in progress
    or a folder without a ledger gives a partial, not a failed, report.

    Raises:
        InputError: `out_dir` is not a directory.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such output directory")
    remove_abandoned_parts(out_dir)  # of a report, table or timings a killed run was writing
    folders = [p for p in sorted(out_dir.iterdir()) if is_target_dir(p)]
    if plots:
        from parafold.report.plots import write_target_plots

        for folder in folders:
            if _missing_plots(folder):
                write_target_plots(folder)
    for folder in folders:
        write_structure_js(folder)
    collected = collect(out_dir)
    try:  # first: small, and what scripts read (the viewer's copy alone is ~0.5 MB)
        write_results_table(out_dir, collected.rows)
    except Exception as exc:  # the page still shows the run; the table is extra
        log.error("could not write the results table in %s: %s", out_dir, exc,
                  exc_info=not is_storage_full(exc))
    _copy_assets(out_dir)
    data = collect_run(out_dir, collected)
    page = render_page(data, title=out_dir.resolve().name)
    path = out_dir / REPORT_FILE
    atomic_write_text(path, page)
    path.chmod(0o644)  # the temporary file's 0600 would hide the page from a web server
    log.info("report of %d targets: %s", len(data["rows"]), path)
    return path
