"""Synthetic AlphaFold monomer feature dicts, for tests, the demo and benchmarks.

The dicts have exactly the keys and dtypes `alphafold.data.pipeline.DataPipeline.process`
returns: sequence and MSA features from AlphaFold's own builders, plus templates (none, or
random-walk backbones). The MSA is the query with random substitutions and gaps, so it is
neither empty nor trivially constant.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_sequence", "make_features"]

_AA = "ACDEFGHIKLMNPQRSTVWY"


def random_sequence(length: int, rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(_AA), size=length))


def _empty_templates(length: int) -> dict[str, np.ndarray]:
    return {
        "template_aatype": np.zeros((0, length, 22), np.float32),
        "template_all_atom_masks": np.zeros((0, length, 37), np.float32),
        "template_all_atom_positions": np.zeros((0, length, 37, 3), np.float32),
        "template_domain_names": np.zeros((0,), object),
        "template_sequence": np.zeros((0,), object),
        "template_sum_probs": np.zeros((0, 1), np.float32),
    }


def _random_templates(sequence: str, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from alphafold.common import residue_constants as rc

    length = len(sequence)
    aatype = rc.sequence_to_onehot(sequence, rc.HHBLITS_AA_TO_ID, map_unknown_to_x=True)
    steps = rng.normal(size=(count, length, 3))
    steps *= 3.8 / np.linalg.norm(steps, axis=-1, keepdims=True)
    ca = np.cumsum(steps, axis=1)
    positions = np.zeros((count, length, 37, 3), np.float32)
    masks = np.zeros((count, length, 37), np.float32)
    for atom, offset in (("N", (-1.2, 0.6, 0.0)), ("CA", (0.0, 0.0, 0.0)), ("C", (1.3, 0.5, 0.0)),
                         ("CB", (-0.5, -1.4, 0.3))):
        positions[:, :, rc.atom_order[atom]] = ca + np.asarray(offset)
        masks[:, :, rc.atom_order[atom]] = 1.0
    return {
        "template_aatype": np.repeat(aatype[None], count, 0).astype(np.float32),
        "template_all_atom_masks": masks,
        "template_all_atom_positions": positions,
        "template_domain_names": np.array([f"t{i}_A".encode() for i in range(count)], object),
        "template_sequence": np.array([sequence.encode()] * count, object),
        "template_sum_probs": rng.uniform(10, 100, size=(count, 1)).astype(np.float32),
    }


def make_features(sequence: str, msa_depth: int, *, seed: int = 0, num_templates: int = 0,
                  description: str = "query", identity: float = 0.5) -> dict[str, np.ndarray]:
    """A raw monomer feature dict: `msa_depth` rows (the query first), optional templates."""
    from alphafold.data import parsers, pipeline

    rng = np.random.default_rng(seed)
    length = len(sequence)
    rows = [sequence]
    deletions = [[0] * length]
    query = np.array(list(sequence))
    while len(rows) < msa_depth:
        row = query.copy()
        change = rng.random(length) > identity
        row[change] = rng.choice(list(_AA + "-"), size=int(change.sum()))
        text = "".join(row)
        if text in rows:
            continue
        rows.append(text)
        deletions.append([int(d) for d in rng.poisson(0.05, size=length)])
    msa = parsers.Msa(sequences=rows, deletion_matrix=deletions,
                      descriptions=[f"s{i}" for i in range(len(rows))])
    feats: dict[str, np.ndarray] = {}
    feats.update(pipeline.make_sequence_features(sequence, description, length))
    feats.update(pipeline.make_msa_features([msa]))
    feats.update(_random_templates(sequence, num_templates, rng) if num_templates
                 else _empty_templates(length))
    return feats
