"""Amber relaxation of predicted structures, from the files a prediction left (AlphaFold's
`--models_to_relax`).

Relaxation is CPU work (OpenMM, seconds to minutes a structure) that never needs the GPU, so it
runs from files: after the writer of a target in `predict`/`run` (`--models-to-relax`), or as
its own stage (`parafold relax OUT`) on CPU nodes after the GPU nodes are done, the ParaFold
split. It reads `ranking_debug.json` for the order and `unrelaxed_<model>.pdb` (pLDDT in the
B-factors), and writes what `run_alphafold.py` writes: `relaxed_<model>.pdb`, `ranked_<i>.pdb`
and `.cif` from the relaxed structure for each relaxed model, `relax_metrics.json` (remaining
violations; here also energies, RMSD and attempts) and `relax_<model>` seconds in
`timings.json`. Every file is written atomically, and a model counts as relaxed only once its
entry is in `relax_metrics.json`, written last: a killed relaxation is redone, a finished one
never. AlphaFold's own relaxation code does the work (`alphafold.relax`), with its settings.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parafold.errors import PipelineError
from parafold.store import atomic_write_json, atomic_write_text

__all__ = ["RELAX_CHOICES", "RelaxError", "RelaxOutcome", "RelaxResult", "models_to_relax",
           "relax_pending", "relax_target", "find_predicted", "relax_folders",
           "read_relax_metrics", "RELAX_METRICS_FILE"]

log = logging.getLogger(__name__)

RELAX_CHOICES = ("none", "best", "all")
_PREDICTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # model_1_ptm, ..._pred_0
RELAX_METRICS_FILE = "relax_metrics.json"

# run_alphafold.py's settings
_MAX_ITERATIONS = 0  # L-BFGS until converged
_TOLERANCE = 2.39  # kcal/mol
_STIFFNESS = 10.0  # kcal/mol A^2, heavy-atom restraints
_MAX_OUTER_ITERATIONS = 3


class RelaxError(PipelineError):
    """A target's relaxation failed; its unrelaxed outputs stand and a rerun tries again."""


@dataclass(frozen=True, slots=True)
class RelaxOutcome:
    """What relaxing one target folder did: models relaxed now, models relaxed before."""

    name: str
    relaxed: tuple[str, ...]
    already: tuple[str, ...]
    seconds: float


def models_to_relax(order: Sequence[str], which: str) -> list[str]:
    """The predictions to relax, from the ranked order: the best one, all, or none."""
    if which not in RELAX_CHOICES:
        raise ValueError(f"models to relax {which!r}: expected one of {RELAX_CHOICES}")
    if which == "none" or not order:
        return []
    return [order[0]] if which == "best" else list(order)


def _order(folder: Path) -> list[str]:
    from parafold.fold.outputs import DONE_FILE

    path = folder / DONE_FILE
    if not path.is_file():
        raise RelaxError(f"{folder.name}: not predicted yet (no {DONE_FILE})")
    try:
        order = json.loads(path.read_text(encoding="utf-8"))["order"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RelaxError(f"{path}: unreadable ranking: {exc}") from exc
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise RelaxError(f"{path}: unreadable ranking: 'order' is not a list of names")
    bad = [n for n in order if not _PREDICTION_NAME.fullmatch(n)]
    if bad:  # names become file names: never a path
        raise RelaxError(f"{path}: unexpected prediction name {bad[0]!r}")
    return order


def read_relax_metrics(folder: Path) -> dict[str, Any]:
    """The folder's relaxation marker, {model: metrics}: the models relaxed (none without)."""
    path = Path(folder) / RELAX_METRICS_FILE
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or torn by hand: relax again
    return loaded if isinstance(loaded, dict) else {}


def _is_relaxed(folder: Path, model: str, metrics: dict[str, Any]) -> bool:
    return model in metrics and (folder / f"relaxed_{model}.pdb").is_file()


def relax_pending(folder: Path, which: str) -> bool:
    """Whether a predicted target folder still lacks a relaxation `which` asks for."""
    if which == "none":
        return False
    folder = Path(folder)
    try:
        order = _order(folder)
    except RelaxError:
        return False  # not predicted: nothing to relax yet
    metrics = read_relax_metrics(folder)
    return any(not _is_relaxed(folder, m, metrics) for m in models_to_relax(order, which))


def _relaxer() -> Any:
    from alphafold.relax import relax

    return relax.AmberRelaxation(max_iterations=_MAX_ITERATIONS, tolerance=_TOLERANCE,
                                 stiffness=_STIFFNESS, exclude_residues=[],
                                 max_outer_iterations=_MAX_OUTER_ITERATIONS, use_gpu=False)


def relax_target(folder: Path, which: str) -> RelaxOutcome:
    """Relax the predictions `which` names ("best" or "all") in one target folder, skipping
    those relaxed before, and rewrite their ranked files.

    Raises:
        RelaxError: the folder is not predicted, a file is missing or unreadable, or OpenMM
            failed; it names the target and the model.
    """
    from parafold.fold.outputs import merge_timings

    folder = Path(folder)
    started = time.perf_counter()
    order = _order(folder)
    metrics = read_relax_metrics(folder)
    wanted = models_to_relax(order, which)
    already = tuple(m for m in wanted if _is_relaxed(folder, m, metrics))
    todo = [m for m in wanted if m not in already]
    for model in todo:
        metrics.pop(model, None)  # an entry whose relaxed file is gone
    seconds: dict[str, float] = {}
    try:
        for model in todo:
            seconds[model], metrics[model] = _relax_model(folder, model)
    finally:  # what was relaxed before a failure is kept, not redone
        if seconds:
            _write_ranked(folder, order, set(already) | set(seconds))
            merge_timings(folder / "timings.json",
                          {f"relax_{m}": round(s, 3) for m, s in seconds.items()})
            atomic_write_json(folder / RELAX_METRICS_FILE, metrics)  # last: the relaxed marker
    return RelaxOutcome(name=folder.name, relaxed=tuple(todo), already=already,
                        seconds=time.perf_counter() - started)


def _relax_model(folder: Path, model: str) -> tuple[float, dict[str, Any]]:
    """Relax one prediction into `relaxed_<model>.pdb`; its seconds and metrics entry."""
    from alphafold.common import protein

    source = folder / f"unrelaxed_{model}.pdb"
    try:
        unrelaxed = protein.from_pdb_string(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RelaxError(f"{folder.name}: cannot read {source.name}: {exc}") from exc
    with_atoms = int(unrelaxed.atom_mask.any(axis=1).sum())
    if with_atoms < 2:  # AlphaFold's relaxer fails on it with a message that says nothing
        raise RelaxError(f"{folder.name}: {model} cannot be relaxed: {with_atoms} of its "
                         "residues have atoms (X, U, B, Z and O have none); its unrelaxed "
                         "structure stands")
    started = time.perf_counter()
    try:
        relaxed_pdb, debug, violations = _relaxer().process(prot=unrelaxed)
    except Exception as exc:  # OpenMM and pdbfixer raise many kinds; the target's alone
        raise RelaxError(f"{folder.name}: relaxing {model} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - started
    try:
        relaxed_pdb = _renumbered(relaxed_pdb, unrelaxed.residue_index.tolist())
    except ValueError as exc:
        raise RelaxError(f"{folder.name}: relaxed {model} does not match its prediction: "
                         f"{exc}") from exc
    atomic_write_text(folder / f"relaxed_{model}.pdb", relaxed_pdb)
    log.info("%s: relaxed %s in %.1f s (%d violations left)", folder.name, model, seconds,
             int(sum(violations)))
    return seconds, {
        "remaining_violations": [float(v) for v in violations],
        "remaining_violations_count": float(sum(violations)),
        "initial_energy": float(debug["initial_energy"]),
        "final_energy": float(debug["final_energy"]),
        "rmsd": round(float(debug["rmsd"]), 4),
        "attempts": int(debug["attempts"]),
    }


def _renumbered(pdb: str, numbers: Sequence[int]) -> str:
    """A relaxed PDB with its residues numbered as the prediction's (`numbers`, in order).

    OpenMM numbers the residues it writes 1..n, but a residue without atoms (an X, U, B, Z or
    O of the input: UNK) is in no PDB, so every residue after one was shifted (AlphaFold's
    relaxed files have the same flaw).

    Raises:
        ValueError: the PDB has another number of residues than `numbers`.
    """
    new: dict[tuple[str, str], int] = {}
    lines = pdb.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.startswith(("ATOM  ", "HETATM", "TER   ")) or len(line) < 27:
            continue
        ident = (line[21], line[22:27])  # chain, number and insertion code
        if ident not in new:
            if len(new) == len(numbers):
                raise ValueError(f"more than its {len(numbers)} residues")
            new[ident] = numbers[len(new)]
        lines[i] = f"{line[:22]}{new[ident]:>4} {line[27:]}"
    if len(new) != len(numbers):
        raise ValueError(f"{len(new)} residues, not {len(numbers)}")
    return "".join(lines)


def _with_trailing_unknowns(prot: Any, length: int) -> Any:
    """`prot` with the atom-less residues after its last one that the prediction had (its
    per-residue pLDDT says how many): no PDB holds them, the prediction's mmCIF does."""
    import numpy as np
    from alphafold.common import protein
    from alphafold.common import residue_constants as rc

    last = int(prot.residue_index.max())
    if length <= last:
        return prot
    extra = length - last
    atoms = prot.atom_positions.shape[1:]
    return protein.Protein(
        atom_positions=np.concatenate([prot.atom_positions, np.zeros((extra, *atoms))]),
        atom_mask=np.concatenate([prot.atom_mask, np.zeros((extra, atoms[0]))]),
        aatype=np.concatenate([prot.aatype, np.full(extra, rc.restype_num)]),
        residue_index=np.concatenate([prot.residue_index, np.arange(last + 1, length + 1)]),
        chain_index=np.concatenate([prot.chain_index, np.full(extra, prot.chain_index[-1])]),
        b_factors=np.concatenate([prot.b_factors, np.zeros((extra, atoms[0]))]))


def _predicted_length(folder: Path, model: str) -> int:
    """Residues of a prediction, atom-less ones included (its scores file); 0 if unknown."""
    try:
        plddt = json.loads((folder / f"scores_{model}.json").read_text(encoding="utf-8"))
        return len(plddt["plddt"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _write_ranked(folder: Path, order: Sequence[str], relaxed: set[str]) -> None:
    """`ranked_<i>.pdb/.cif` from the relaxed structure for every relaxed model (hydrogens
    in the PDB, as AlphaFold writes it; the mmCIF has the heavy atoms)."""
    from alphafold.common import protein

    from parafold.fold import mmcif as fast_mmcif

    for index, model in enumerate(order):
        if model not in relaxed:
            continue
        pdb = (folder / f"relaxed_{model}.pdb").read_text(encoding="utf-8")
        atomic_write_text(folder / f"ranked_{index}.pdb", pdb)
        prot = _with_trailing_unknowns(protein.from_pdb_string(pdb),
                                       _predicted_length(folder, model))
        cif = fast_mmcif.to_mmcif(prot, file_id=folder.name, model_type="Monomer")
        atomic_write_text(folder / f"ranked_{index}.cif", cif)



@dataclass(frozen=True, slots=True)
class RelaxResult:
    """One folder of a `relax_folders` call: its outcome, or the error that stopped it."""

    folder: Path
    outcome: RelaxOutcome | None
    error: str | None


def find_predicted(roots: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Predicted target folders in `roots` (each a target folder or a folder of them), and
    the target folders there not predicted yet (a failed target, or a run still going)."""
    from parafold.fold.outputs import DONE_FILE

    predicted: list[Path] = []
    unpredicted: list[Path] = []
    for root in roots:
        root = Path(root)
        candidates = [root] if (root / DONE_FILE).is_file() else sorted(
            p for p in (root.iterdir() if root.is_dir() else []) if p.is_dir())
        for folder in candidates:
            if (folder / DONE_FILE).is_file():
                predicted.append(folder)
            elif (folder / "features.json").is_file() or (folder / "features.pkl").is_file():
                unpredicted.append(folder)
    return list(dict.fromkeys(predicted)), unpredicted


def relax_folders(folders: Sequence[Path], which: str, *, processes: int,
                  on_result: Any = None) -> list[RelaxResult]:
    """Relax many target folders in `processes` spawned single-threaded helpers (in this
    process if 1); one folder's failure is its own. `on_result` is called as each ends."""
    import concurrent.futures as cf
    import multiprocessing

    from parafold.lifecycle import helper_process_init

    results: list[RelaxResult] = []

    def record(folder: Path, outcome: RelaxOutcome | None, error: str | None) -> None:
        result = RelaxResult(Path(folder), outcome, error)
        results.append(result)
        if on_result is not None:
            on_result(result)

    if processes <= 1:
        for folder in folders:
            try:
                record(folder, relax_target(folder, which), None)
            except RelaxError as exc:
                record(folder, None, str(exc))
        return results
    pool = cf.ProcessPoolExecutor(max_workers=processes,
                                  mp_context=multiprocessing.get_context("spawn"),
                                  initializer=helper_process_init)
    try:
        futures = {pool.submit(relax_target, folder, which): folder for folder in folders}
        for future in cf.as_completed(futures):
            folder = futures[future]
            try:
                record(folder, future.result(), None)
            except RelaxError as exc:
                record(folder, None, str(exc))
            except cf.process.BrokenProcessPool as exc:  # a helper killed (out of memory)
                record(folder, None, f"{folder.name}: relaxation process died: {exc}")
    except BaseException:  # Ctrl-C: do not wait minutes for the relaxations under way
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
