"""A finished run's OUT folder made up on the spot, for report tests and the scale benchmark.

It writes the real file formats of the search and GPU stages (feature set, ranked PDBs with
pLDDT in the B-factor, `ranking_debug.json`, `scores_<model>.json`, AlphaFold DB style
`pae_<model>.json`, `timings.json`) and fills the real ledger through its API, so the report
is tested against what a run leaves, without running one. Structures are ideal helices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parafold.store import atomic_write_json, atomic_write_text

__all__ = ["SyntheticRun", "make_synthetic_run"]

log = logging.getLogger(__name__)

_AA = "ACDEFGHIKLMNPQRSTVWY"


@dataclass(frozen=True, slots=True)
class SyntheticRun:
    out: Path
    done: tuple[str, ...]
    failed: tuple[str, ...]
    no_pae: tuple[str, ...]


def _helix(length: int) -> np.ndarray:
    """Backbone (N, CA, C, O) of a bundle of ideal alpha helices, atom37 order, (L, 37, 3).

    Helices of 20 residues run back and forth 10 Å apart: compact like a real domain, so the
    3D view fills its canvas.
    """
    pos = np.zeros((length, 37, 3))
    i = np.arange(length)
    segment, k = i // 20, i % 20
    along = np.where(segment % 2 == 0, k, 19 - k) * 1.5
    # (radius Å, phase offset deg, rise offset Å) per backbone atom around the helix axis.
    for atom, (radius, phase, rise) in {0: (1.55, -28.0, -0.6), 1: (2.3, 0.0, 0.0),
                                        2: (1.65, 28.0, 0.6), 4: (2.1, 45.0, 1.4)}.items():
        angle = np.deg2rad(i * 100.0 + phase)
        sign = np.where(segment % 2 == 0, 1.0, -1.0)
        pos[:, atom] = np.stack([along + sign * rise, segment * 10.0 + radius * np.cos(angle),
                                 radius * np.sin(angle)], axis=1)
    return pos


def _pdb(sequence: str, plddt: np.ndarray) -> str:
    from alphafold.common import protein, residue_constants

    length = len(sequence)
    mask = np.zeros((length, 37))
    mask[:, [0, 1, 2, 4]] = 1.0
    prot = protein.Protein(
        atom_positions=_helix(length), atom_mask=mask,
        aatype=np.array([residue_constants.restype_order[a] for a in sequence]),
        residue_index=np.arange(1, length + 1), chain_index=np.zeros(length, dtype=int),
        b_factors=np.repeat(plddt[:, None], 37, axis=1))
    return protein.to_pdb(prot)


def _msa(rng: np.random.Generator, sequence: str, depth: int) -> np.ndarray:
    """A query plus homologs of falling identity, some covering only part of the query."""
    from alphafold.common import residue_constants

    ids = np.array([residue_constants.HHBLITS_AA_TO_ID[a] for a in sequence])
    length = ids.size
    msa = np.tile(ids, (depth, 1))
    for row in range(1, depth):
        mutate = rng.random(length) < rng.uniform(0.1, 0.8)
        msa[row, mutate] = rng.integers(0, 20, mutate.sum())
        start, stop = sorted(rng.integers(0, length + 1, 2))
        msa[row, :start] = 21
        msa[row, stop:] = 21
    return msa.astype(np.int32)


def _write_target(folder: Path, rng: np.random.Generator, sequence: str, depth: int,
                  models: list[str], with_pae: bool, timings: dict[str, float]) -> None:
    from parafold.featureset import write_feature_set

    length = len(sequence)
    msa = _msa(rng, sequence, depth)
    aatype = np.eye(21, dtype=np.int32)[[_AA.index(a) for a in sequence]]
    features = {"aatype": aatype, "msa": msa, "deletion_matrix_int": np.zeros_like(msa),
                "num_alignments": np.full(length, depth, np.int32),
                "sequence": np.array([sequence.encode()], dtype=object),
                "seq_length": np.full(length, length, np.int32),
                "residue_index": np.arange(length, dtype=np.int32),
                "domain_name": np.array([folder.name.encode()], dtype=object)}
    write_feature_set(folder, name=folder.name, target_id=folder.name, features=features)
    means: dict[str, float] = {}
    for k, model in enumerate(models):
        plddt = np.clip(60 + 35 * np.sin(np.linspace(0, 3, length) + k) +
                        rng.normal(0, 4, length), 5, 99)
        means[model] = float(plddt.mean())
        pae = np.abs(np.subtract.outer(np.arange(length), np.arange(length))) * 0.3 + 1.0
        atomic_write_text(folder / f"unrelaxed_{model}.pdb", _pdb(sequence, plddt))
        scores = {"plddt": plddt.round(2).tolist(), "ptm": round(0.4 + 0.1 * k, 3),
                  "max_pae": float(pae.max())}
        atomic_write_json(folder / f"scores_{model}.json", scores)
        if with_pae:
            atomic_write_json(folder / f"pae_{model}.json", [{
                "predicted_aligned_error": pae.round(2).tolist(),
                "max_predicted_aligned_error": float(pae.max())}])
    order = sorted(models, key=lambda m: -means[m])
    for rank, model in enumerate(order):
        text = (folder / f"unrelaxed_{model}.pdb").read_text()
        atomic_write_text(folder / f"ranked_{rank}.pdb", text)
    atomic_write_json(folder / "ranking_debug.json", {"plddts": means, "order": order})
    atomic_write_json(folder / "timings.json", timings)


def make_synthetic_run(out: Path | str, n_targets: int = 4, *, n_models: int = 2,
                       n_failed: int = 1, n_search_workers: int = 2, full_files: int | None = None,
                       seed: int = 0) -> SyntheticRun:
    """Write a run of `n_targets` into `out`: ledger rows and events for all of them, and
    target folders for the first `full_files` (default all). The last `n_failed` fail in the
    search; target 1 (when there are two or more) has no PAE files (a model without pTM head).
    """
    from parafold.inputs import Target
    from parafold.ledger import Ledger

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    full = n_targets if full_files is None else full_files
    models = [f"model_{i}_ptm" for i in range(1, n_models + 1)]
    targets = [Target(id=f"T{i:05d}", name=f"T{i:05d}",
                      sequence="".join(rng.choice(list(_AA), int(rng.integers(30, 120)))))
               for i in range(n_targets)]
    failed = {t.name for t in targets[n_targets - n_failed:]} if n_failed else set()
    no_pae = {targets[1].name} if n_targets > 1 else set()
    cpu_free = [0.0] * n_search_workers
    gpu_free = 0.0
    with Ledger(out) as ledger:
        run_id = ledger.begin_run({"synthetic": True})
        ledger.register(targets)
        for i, t in enumerate(targets):
            w = int(np.argmin(cpu_free))
            start, end = cpu_free[w], cpu_free[w] + 2.0 + t.length / 20
            cpu_free[w] = end
            ledger.start_search(t.name)
            ledger.add_event(run_id=run_id, worker=f"cpu-{w}", kind="search", target=t.name,
                             start=1e9 + start, end=1e9 + end, ok=t.name not in failed)
            if t.name in failed:
                ledger.fail(t.name, "search", f"jackhmmer exited with code 1: {t.name}: "
                            "sequence database is corrupt")
                continue
            # The fold worker's keys; the first target paid for the run's one compile.
            timings = {**{f"compile_{m}": 12.5 if i == 0 and k == 0 else 0.0
                          for k, m in enumerate(models)},
                       **{f"predict_{m}": 0.1 + t.length / 1000 for m in models}}
            if i < full:
                _write_target(out / t.name, rng, t.sequence, int(rng.integers(5, 60)), models,
                              t.name not in no_pae, timings)
            ledger.features_ready(t.name, {"wall_s": end - start, "worker": f"cpu-{w}"})
            ledger.start_predict([t.name])
            start = max(gpu_free, end)
            gpu_free = start + 0.2 + t.length / 400
            ledger.add_event(run_id=run_id, worker="gpu-0", kind="predict", target=t.name,
                             start=1e9 + start, end=1e9 + gpu_free, ok=True)
            ledger.done(t.name, timings)
        ledger.end_run(run_id, 0)
    log.info("synthetic run of %d targets in %s", n_targets, out)
    return SyntheticRun(out=out, done=tuple(t.name for t in targets if t.name not in failed),
                        failed=tuple(sorted(failed)), no_pae=tuple(sorted(no_pae)))
