"""Per-target confidence and MSA plots, the PNGs users triage predictions with.

Figures are drawn on `matplotlib.figure.Figure` with an explicit Agg canvas, never through
`pyplot`: no global backend switch, no figure registry to leak from worker threads, and safe
to call from the GPU stage's output threads. Every file is written atomically.

`write_target_plots(target_dir)` reads whatever a target folder holds and draws what it can:
a target without PAE gets no PAE plot, one without features gets no coverage plot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from parafold.store import atomic_writer

__all__ = [
    "PLDDT_PNG",
    "PAE_PNG",
    "COVERAGE_PNG",
    "GAP_ID",
    "plot_plddt",
    "plot_pae",
    "plot_pae_models",
    "plot_msa_coverage",
    "coverage_stats",
    "read_model_scores",
    "read_pae",
    "plddt_of",
    "model_order",
    "write_target_plots",
]

log = logging.getLogger(__name__)

PLDDT_PNG = "plddt.png"
PAE_PNG = "pae.png"
COVERAGE_PNG = "coverage.png"
GAP_ID = 21  # residue_constants.HHBLITS_AA_TO_ID["-"]
_DPI = 100
_MAX_IMAGE_ROWS = 2000  # rows drawn in the coverage image; the depth line uses every row


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_writer(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=_DPI)
    return path


def plot_plddt(per_model: Mapping[str, np.ndarray], path: Path | str) -> Path:
    """pLDDT per residue, one line per model, over AlphaFold's confidence bands.

    Raises:
        ValueError: no model has any pLDDT values.
    """
    curves = {m: np.asarray(v, dtype=float).ravel() for m, v in per_model.items()}
    curves = {m: v for m, v in curves.items() if v.size}
    if not curves:
        raise ValueError("no pLDDT values to plot")
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    for lo, hi, colour in ((90, 100, "#0053d6"), (70, 90, "#65cbf3"), (50, 70, "#ffdb13"),
                           (0, 50, "#ff7d45")):
        ax.axhspan(lo, hi, color=colour, alpha=0.12, lw=0)
    for model, values in curves.items():
        ax.plot(np.arange(1, values.size + 1), values, lw=1.2,
                label=f"{model} ({values.mean():.1f})")
    ax.set_xlim(1, max(v.size for v in curves.values()))
    ax.set_ylim(0, 100)
    ax.set_xlabel("residue")
    ax.set_ylabel("pLDDT")
    ax.set_title("Predicted lDDT per position")
    ax.legend(fontsize=7, loc="lower right", ncol=2 if len(curves) > 3 else 1)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9)
    return _save(fig, path)


def _draw_pae(fig: Figure, ax: Any, pae: np.ndarray, title: str, vmax: float) -> None:
    image = ax.imshow(pae, cmap="bwr", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("scored residue")
    ax.set_ylabel("aligned residue")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="expected error (Å)")


def plot_pae(pae: np.ndarray, path: Path | str, title: str = "Predicted aligned error") -> Path:
    """One PAE heatmap (Å), 0 to the matrix maximum (at least 30 Å, AlphaFold's usual scale)."""
    pae = _check_pae(pae)
    fig = Figure(figsize=(4.6, 4))
    _draw_pae(fig, fig.add_subplot(), pae, title, max(30.0, float(pae.max())))
    fig.subplots_adjust(left=0.14, right=0.88, bottom=0.12, top=0.92)
    return _save(fig, path)


def plot_pae_models(per_model: Mapping[str, np.ndarray], path: Path | str) -> Path:
    """PAE heatmaps of several models side by side on one shared scale, in the given order.

    Raises:
        ValueError: no matrices, or one that is not square.
    """
    mats = {m: _check_pae(p) for m, p in per_model.items()}
    if not mats:
        raise ValueError("no PAE matrices to plot")
    vmax = max(30.0, *(float(p.max()) for p in mats.values()))
    fig = Figure(figsize=(4.4 * len(mats), 3.8))
    for i, (model, pae) in enumerate(mats.items(), start=1):
        _draw_pae(fig, fig.add_subplot(1, len(mats), i), pae, model, vmax)
    fig.subplots_adjust(left=0.75 / fig.get_figwidth(), right=1 - 0.6 / fig.get_figwidth(),
                        bottom=0.13, top=0.92, wspace=0.45)
    return _save(fig, path)


def _check_pae(pae: np.ndarray) -> np.ndarray:
    pae = np.asarray(pae, dtype=float)
    if pae.ndim != 2 or pae.shape[0] != pae.shape[1] or pae.size == 0:
        raise ValueError(f"PAE must be a non-empty square matrix, got shape {pae.shape}")
    return pae


def coverage_stats(msa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: identity to the query over the row's non-gap columns; per column: depth.

    Raises:
        ValueError: the MSA is not a non-empty 2-D array.
    """
    msa = np.asarray(msa)
    if msa.ndim != 2 or msa.shape[0] == 0 or msa.shape[1] == 0:
        raise ValueError(f"MSA must be a non-empty 2-D array, got shape {msa.shape}")
    covered = msa != GAP_ID
    same = (msa == msa[0]) & covered
    identity = same.sum(axis=1) / np.maximum(covered.sum(axis=1), 1)
    return identity, covered.sum(axis=0)


def plot_msa_coverage(msa: np.ndarray, path: Path | str) -> Path:
    """MSA rows (sorted by identity to the query, row 0) coloured by identity, plus depth.

    `msa` holds AlphaFold's HHBLITS residue ids (gap = 21). White cells are gaps; the black
    line is the number of non-gap sequences at each position, what a user checks first when a
    region folds badly.

    Raises:
        ValueError: the MSA is not a non-empty 2-D array.
    """
    msa = np.asarray(msa)
    identity, depth = coverage_stats(msa)
    covered = msa != GAP_ID
    order = np.argsort(-identity, kind="stable")
    if order.size > _MAX_IMAGE_ROWS:
        order = order[np.linspace(0, order.size - 1, _MAX_IMAGE_ROWS).astype(int)]
    image = np.where(covered[order], identity[order, None], np.nan)
    n_rows, length = msa.shape

    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    shown = ax.imshow(image, cmap="rainbow_r", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest", extent=(0.5, length + 0.5, n_rows, 0))
    ax.plot(np.arange(1, length + 1), depth, color="black", lw=1.2)
    ax.set_xlim(0.5, length + 0.5)
    ax.set_ylim(0, n_rows)
    ax.set_xlabel("position")
    ax.set_ylabel("sequences")
    ax.set_title(f"Sequence coverage ({n_rows} sequences)")
    fig.colorbar(shown, ax=ax, label="identity to query")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9)
    return _save(fig, path)


# --- reading a target folder -------------------------------------------------------------


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); skipped", path, exc)
        return None


def model_order(target_dir: Path) -> list[str]:
    """Models best first, from `ranking_debug.json`; empty when the file is absent."""
    path = Path(target_dir) / "ranking_debug.json"
    data = _read_json(path) if path.is_file() else None
    order = data.get("order") if isinstance(data, dict) else None
    return [str(m) for m in order] if isinstance(order, list) else []


def _ordered(names: list[str], order: list[str]) -> list[str]:
    rank = {m: i for i, m in enumerate(order)}
    return sorted(names, key=lambda m: (rank.get(m, len(rank)), m))


def read_model_scores(target_dir: Path) -> dict[str, dict[str, Any]]:
    """`scores_<model>.json` of a target keyed by model, best model first."""
    target_dir = Path(target_dir)
    found: dict[str, dict[str, Any]] = {}
    for path in target_dir.glob("scores_*.json"):
        data = _read_json(path)
        if isinstance(data, dict):
            found[path.stem.removeprefix("scores_")] = data
    return {m: found[m] for m in _ordered(list(found), model_order(target_dir))}


def plddt_of(scores: Mapping[str, Any]) -> np.ndarray | None:
    """The per-residue pLDDT list of one model's scores, whatever the writer called it; None
    for a list that is no numbers (["n/a", 50], ragged rows): one odd file must not stop the
    plots or the report of every target."""
    for key in ("plddt", "plddts", "per_residue_plddt"):
        value = scores.get(key)
        if isinstance(value, list) and value:
            try:
                curve = np.asarray(value, dtype=float)
            except (TypeError, ValueError, OverflowError) as exc:
                log.debug("pLDDT %r is not numbers (%s); skipped", key, exc)
                return None
            return curve if curve.size else None
    return None


def read_pae(path: Path) -> np.ndarray | None:
    """A PAE matrix from AlphaFold DB's format (`[{"predicted_aligned_error": ...}]`)."""
    data = _read_json(path)
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return None
    matrix = data.get("predicted_aligned_error", data.get("pae"))
    if matrix is None:
        return None
    try:
        return _check_pae(np.asarray(matrix, dtype=float))
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("%s: %s; skipped", path, exc)
        return None


def _read_msa(target_dir: Path) -> np.ndarray | None:
    if not (target_dir / "features.npz").is_file():
        return None
    from parafold.errors import InputError
    from parafold.featureset import load_features

    try:
        return load_features(target_dir).get("msa")
    except (InputError, OSError, ValueError) as exc:
        log.warning("%s: features unreadable (%s); no coverage plot", target_dir, exc)
        return None


def _draw(draw: Callable[[Any, Path], Path], data: Any, path: Path) -> list[Path]:
    """One plot, or none when its data cannot be drawn (a foreign or hand-edited file): the
    target's other plots and the report go on. A full disk still raises."""
    try:
        return [draw(data, path)]
    except (TypeError, ValueError, OverflowError) as exc:
        log.debug("%s: not drawn (%s)", path, exc)
        return []


def write_target_plots(target_dir: Path | str) -> list[Path]:
    """Draw every plot the target folder has inputs for; return the files written.

    The GPU stage (or the pipeline, after a target finishes) calls this once per target.
    Missing inputs mean a missing plot, never an error: the report shows what exists.
    """
    target_dir = Path(target_dir)
    written: list[Path] = []
    scores = read_model_scores(target_dir)
    curves = {m: c for m, s in scores.items() if (c := plddt_of(s)) is not None}
    if curves:
        written += _draw(plot_plddt, curves, target_dir / PLDDT_PNG)
    order = model_order(target_dir)
    pae_files = {p.stem.removeprefix("pae_"): p for p in target_dir.glob("pae_*.json")}
    paes = {m: mat for m in _ordered(list(pae_files), order)
            if (mat := read_pae(pae_files[m])) is not None}
    if paes:
        written += _draw(plot_pae_models, paes, target_dir / PAE_PNG)
    msa = _read_msa(target_dir)
    if msa is not None and msa.ndim == 2 and msa.size:
        written += _draw(plot_msa_coverage, msa, target_dir / COVERAGE_PNG)
    log.debug("%s: wrote %d plots", target_dir.name, len(written))
    return written
