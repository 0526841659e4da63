"""AlphaFold-compatible files for one target, every one written atomically.

Names and formats follow `run_alphafold.py`: `unrelaxed_<model>.pdb`, `ranked_<i>.pdb` (and
`.cif`) with pLDDT in the B-factor column, `ranking_debug.json` (written last: the done
marker), `timings.json`, `result_<model>.pkl` on request, plus per-model `scores_<model>.json`
and `pae_<model>.json` in the AlphaFold Database's PAE format. Files of these kinds left by an
earlier prediction of the same target (other models, more ranks) are removed before the marker.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parafold.store import (
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    remove_abandoned_parts,
)

__all__ = ["Prediction", "write_target_outputs", "is_complete", "DONE_FILE", "rank",
           "merge_timings", "is_prediction_file", "remove_stale", "COPY_TIMINGS",
           "SETTINGS_KEY", "made_with"]

DONE_FILE = "ranking_debug.json"
# What a copy from an identical target (`fold.twins`) adds to `timings.json`: its seconds and
# its source (a name in the same OUT, else a folder); the target's own prediction drops them.
COPY_TIMINGS = ("copy_prediction", "copied_from")
# The `timings.json` entry naming the settings a prediction was made with
# (`reuse.prediction_fingerprint`): a rerun with other models, recycles, seeds or params
# predicts again instead of taking the old files for done.
SETTINGS_KEY = "prediction_settings"
# The per-prediction files `write_target_outputs` owns; any it did not write this time is stale.
_PREDICTION_FILE = re.compile(
    r"(ranked_\d+\.(pdb|cif)|unrelaxed_.+\.pdb|scores_.+\.json|pae_.+\.json|result_.+\.pkl"
    r"|relaxed_.+\.pdb|relax_metrics\.json)"  # a relaxation of an earlier prediction
)


@dataclass(frozen=True, slots=True)
class Prediction:
    """One model's unpadded result for one target, with what it cost."""

    name: str
    model_name: str
    seed: int
    result: dict[str, Any]
    aatype: np.ndarray
    residue_index: np.ndarray
    timings: dict[str, float]

    @property
    def plddt(self) -> np.ndarray:
        return np.asarray(self.result["plddt"], np.float64)

    @property
    def mean_plddt(self) -> float:
        return float(self.plddt.mean())

    @property
    def ptm(self) -> float | None:
        return float(self.result["ptm"]) if "ptm" in self.result else None

    @property
    def ranking_confidence(self) -> float:
        """AlphaFold's for monomer and monomer_ptm alike: the mean pLDDT."""
        return self.mean_plddt


def is_complete(folder: Path, fingerprint: str | None = None) -> bool:
    """Whether `folder` holds a finished prediction: its done marker and the files it ranks
    (a scratch purge or a user's clean-up that took some of them leaves it to predict again),
    made with the settings of `fingerprint` when given (one that records none, from an older
    parafold, counts)."""
    try:
        names = set(os.listdir(folder))  # one directory read, not a stat per file
    except OSError:
        return False
    if DONE_FILE not in names or not _has_ranked_files(Path(folder), names):
        return False
    if fingerprint is None:
        return True
    recorded = made_with(folder)
    return recorded is None or recorded == fingerprint


def _has_ranked_files(folder: Path, names: set[str]) -> bool:
    """Whether every prediction the done marker orders has its files among `names` (a marker
    without an order, as no parafold writes it, is taken at its word)."""
    try:
        order = json.loads((folder / DONE_FILE).read_text(encoding="utf-8")).get("order")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(order, list):
        return True
    return all({f"ranked_{i}.pdb", f"ranked_{i}.cif", f"unrelaxed_{model}.pdb",
                f"scores_{model}.json"} <= names for i, model in enumerate(order))


def made_with(folder: Path) -> str | None:
    """The settings fingerprint `folder`'s prediction records, if any."""
    try:
        timings = json.loads((Path(folder) / "timings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = timings.get(SETTINGS_KEY) if isinstance(timings, dict) else None
    return value if isinstance(value, str) else None


def is_prediction_file(file_name: str) -> bool:
    """Whether a file of a target folder belongs to its prediction (or its relaxation)."""
    return _PREDICTION_FILE.fullmatch(file_name) is not None


def rank(predictions: Sequence[Prediction]) -> list[Prediction]:
    """Best first; a prediction whose confidence is not a number (a numerical blow-up) last,
    never ranked_0 by the accident of where a NaN leaves a sort."""
    def key(p: Prediction) -> tuple[bool, float]:
        confidence = p.ranking_confidence
        return math.isfinite(confidence), confidence if math.isfinite(confidence) else 0.0

    return sorted(predictions, key=key, reverse=True)


def _json_number(value: float) -> float | None:
    """JSON has no NaN or infinity (jq and browsers refuse the file): null instead."""
    return value if math.isfinite(value) else None


def _protein(pred: Prediction) -> Any:
    from alphafold.common import protein, residue_constants

    b_factors = np.repeat(pred.plddt[:, None], residue_constants.atom_type_num, axis=-1)
    feats = {"aatype": pred.aatype, "residue_index": pred.residue_index}
    return protein.from_prediction(feats, pred.result, b_factors=b_factors,
                                   remove_leading_feature_dimension=False)


def _json_numbers(values: Any, decimals: int) -> list[Any]:
    """An array as (nested) JSON lists of rounded numbers, null where one is not finite."""
    rounded = np.round(np.asarray(values, np.float64), decimals)
    finite = np.isfinite(rounded)
    if finite.all():
        return rounded.tolist()
    out = rounded.astype(object)
    out[~finite] = None
    return out.tolist()


def _scores(pred: Prediction) -> dict[str, Any]:
    out: dict[str, Any] = {"plddt": _json_numbers(pred.plddt, 2),
                           "mean_plddt": _json_number(round(pred.mean_plddt, 3)),
                           "num_recycles": int(pred.result.get("num_recycles", 0))}
    if pred.ptm is not None:
        out["ptm"] = _json_number(round(pred.ptm, 4))
        out["max_pae"] = _json_number(
            round(float(pred.result["max_predicted_aligned_error"]), 3))
    return out


def _pae_json(pred: Prediction) -> str:
    pae = _json_numbers(pred.result["predicted_aligned_error"], 2)
    top = _json_number(round(float(pred.result["max_predicted_aligned_error"]), 2))
    doc = [{"predicted_aligned_error": pae, "max_predicted_aligned_error": top}]
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def write_target_outputs(folder: Path, name: str, predictions: Sequence[Prediction],
                         timings: dict[str, float], *, save_raw: bool,
                         fingerprint: str | None = None) -> list[str]:
    """Write every file for one target; returns prediction names best first. `fingerprint`
    (the settings it was made with) goes into `timings.json`."""
    from alphafold.common import protein

    from parafold.fold import mmcif as fast_mmcif

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # First: a folder predicted before (other settings) must not look done with the old
    # ranking until the new one is written, whatever stops this on the way.
    (folder / DONE_FILE).unlink(missing_ok=True)
    written: set[str] = set()

    def write_text(file_name: str, text: str) -> None:
        atomic_write_text(folder / file_name, text)
        written.add(file_name)

    pdbs: dict[str, str] = {}
    prots: dict[str, Any] = {}
    for pred in predictions:
        prots[pred.name] = _protein(pred)
        pdbs[pred.name] = protein.to_pdb(prots[pred.name])
        write_text(f"unrelaxed_{pred.name}.pdb", pdbs[pred.name])
        atomic_write_json(folder / f"scores_{pred.name}.json", _scores(pred))
        written.add(f"scores_{pred.name}.json")
        if "predicted_aligned_error" in pred.result:
            write_text(f"pae_{pred.name}.json", _pae_json(pred))
        if save_raw:
            with atomic_writer(folder / f"result_{pred.name}.pkl", "wb") as handle:
                pickle.dump(pred.result, handle, protocol=4)
            written.add(f"result_{pred.name}.pkl")
    ranked = rank(predictions)
    for index, pred in enumerate(ranked):
        write_text(f"ranked_{index}.pdb", pdbs[pred.name])
        cif = fast_mmcif.to_mmcif(prots[pred.name], file_id=name, model_type="Monomer")
        write_text(f"ranked_{index}.cif", cif)
    made = {SETTINGS_KEY: fingerprint} if fingerprint is not None else {}
    merge_timings(folder / "timings.json",
                  {**{k: round(v, 3) for k, v in timings.items()}, **made},
                  drop=(*COPY_TIMINGS, SETTINGS_KEY))
    remove_stale(folder, written)
    atomic_write_json(folder / DONE_FILE, {
        "plddts": {p.name: _json_number(p.ranking_confidence) for p in predictions},
        "order": [p.name for p in ranked],
    })
    return [p.name for p in ranked]


def remove_stale(folder: Path, written: set[str]) -> None:
    """Delete per-prediction files an earlier prediction left (a model or rank not made now),
    so no downstream tool mistakes them for this prediction's, and the temporary files of a
    killed writer (a `result_*.pkl` can be hundreds of MB)."""
    for path in folder.iterdir():
        if path.name not in written and is_prediction_file(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    remove_abandoned_parts(folder)


def merge_timings(path: Path, fold_timings: dict[str, Any], *,
                  drop: tuple[str, ...] = ()) -> None:
    """One `timings.json` per target, as AlphaFold writes: the search stage's entries (per
    tool, when features were made in this folder) are kept and the GPU stage's (or the
    relaxation's) added; the `drop` keys go (a prediction's own replaces a copy's)."""
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            existing = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            existing = {}
    kept = {k: v for k, v in existing.items() if k not in drop}
    atomic_write_json(path, {**kept, **fold_timings})
