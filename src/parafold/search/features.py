"""The AlphaFold monomer feature dict, built only from the files in `msas/` (OpenFold's split).

It reuses AlphaFold's own parsers, template featurizer and feature makers, in the order of
`alphafold.data.pipeline.DataPipeline.process`, so the result equals what DataPipeline builds
from the same searches.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from alphafold.data import parsers, pipeline, templates

from parafold.errors import FeatureError, ToolNotFoundError
from parafold.search.databases import DatabaseSet
from parafold.search.msa_search import MSA_FILES
from parafold.search.settings import SearchSettings

__all__ = ["build_features", "make_template_featurizer"]

logger = logging.getLogger(__name__)


def make_template_featurizer(databases: DatabaseSet,
                             settings: SearchSettings) -> templates.HhsearchHitFeaturizer:
    """AlphaFold's hhsearch-hit featurizer on the local mmCIF folder (kalign realigns hits)."""
    kalign = shutil.which(settings.kalign_binary)
    if kalign is None:
        raise ToolNotFoundError(f"{settings.kalign_binary}: not found on PATH")
    obsolete = databases.obsolete_pdbs
    return templates.HhsearchHitFeaturizer(
        mmcif_dir=str(databases.mmcif_dir), max_template_date=settings.max_template_date,
        max_hits=settings.max_template_hits, kalign_binary_path=kalign,
        release_dates_path=None, obsolete_pdbs_path=str(obsolete) if obsolete else None)


def _read(msa_dir: Path, key: str) -> str:
    path = msa_dir / MSA_FILES[key]
    try:
        return path.read_text()
    except OSError as exc:
        raise FeatureError(f"{path}: cannot read search output: {exc.strerror}") from exc


def build_features(sequence: str, description: str, msa_dir: Path, *,
                   databases: DatabaseSet, settings: SearchSettings) -> dict[str, np.ndarray]:
    """Feature dict of one protein from its `msas/` files.

    Raises:
        FeatureError: a search output is missing or cannot be parsed.
        ToolNotFoundError: kalign is missing.
    """
    try:
        uniref90 = parsers.parse_stockholm(_read(msa_dir, "uniref90"))
        mgnify = parsers.parse_stockholm(_read(msa_dir, "mgnify"))
        if settings.use_small_bfd:
            bfd = parsers.parse_stockholm(_read(msa_dir, "small_bfd"))
        else:
            bfd = parsers.parse_a3m(_read(msa_dir, "bfd"))
        hits = parsers.parse_hhr(_read(msa_dir, "pdb70"))
    except (ValueError, IndexError) as exc:
        raise FeatureError(f"{msa_dir}: malformed search output: {exc}") from exc
    for name, msa in (("uniref90", uniref90), ("mgnify", mgnify), ("bfd", bfd)):
        if len(msa) == 0:
            raise FeatureError(f"{msa_dir}: the {name} MSA is empty (not even the query)")
    result = make_template_featurizer(databases, settings).get_templates(
        query_sequence=sequence, hits=hits)
    for warning in result.warnings:
        logger.debug("template warning: %s", warning)
    features: dict[str, Any] = {
        **pipeline.make_sequence_features(sequence=sequence, description=description,
                                          num_res=len(sequence)),
        **pipeline.make_msa_features((uniref90, bfd, mgnify)),
        **result.features,
    }
    return features
