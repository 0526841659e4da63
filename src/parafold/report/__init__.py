"""Plots and the run report: what users triage predictions with, and where a run spent time.

`write_target_plots(target_dir)` is the per-target hook for the GPU stage or the pipeline;
`write_report(out_dir)` writes `OUT/report.html` and `OUT/results.tsv`;
`write_results_table(out_dir)` the table alone (`predict`). All are imported lazily here so
that `import parafold.report` does not pull matplotlib in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["RESULTS_FILE", "write_target_plots", "write_report", "write_results_table"]

RESULTS_FILE = "results.tsv"  # here, so that naming it imports nothing heavy


def write_target_plots(target_dir: Path | str) -> list[Path]:
    """See `parafold.report.plots.write_target_plots`."""
    from parafold.report.plots import write_target_plots as _write

    return _write(target_dir)


def write_report(out_dir: Path | str, **kwargs: Any) -> Path:
    """See `parafold.report.html.write_report`."""
    from parafold.report.html import write_report as _write

    return _write(out_dir, **kwargs)


def write_results_table(out_dir: Path | str, **kwargs: Any) -> Path:
    """See `parafold.report.results_table.write_results_table`."""
    from parafold.report.results_table import write_results_table as _write

    return _write(out_dir, **kwargs)
