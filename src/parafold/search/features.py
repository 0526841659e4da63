"""The AlphaFold monomer feature dict, built only from the files in `msas/` (OpenFold's split).

It reuses AlphaFold's own parsers, template featurizer and feature makers, in the order of
`alphafold.data.pipeline.DataPipeline.process`, so the result equals what DataPipeline builds
from the same searches.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from alphafold.data import parsers, pipeline, templates

from parafold.errors import FeatureError, ToolNotFoundError
from parafold.search.databases import DatabaseSet
from parafold.search.msa_search import MSA_FILES
from parafold.search.settings import SearchSettings

__all__ = ["build_features", "deduplicate_msas", "make_template_featurizer", "msa_feature_dict",
           "mmseqs_features", "single_sequence_features", "empty_template_features"]

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
        hits = parsers.parse_hhr(_read(msa_dir, "pdb70")) if settings.use_templates else None
    except (ValueError, IndexError) as exc:
        raise FeatureError(f"{msa_dir}: malformed search output: {exc}") from exc
    for name, msa in (("uniref90", uniref90), ("mgnify", mgnify), ("bfd", bfd)):
        if len(msa) == 0:
            raise FeatureError(f"{msa_dir}: the {name} MSA is empty (not even the query)")
    template_features = (None if hits is None
                         else _template_features(databases, settings, sequence, hits))
    return msa_feature_dict(sequence, description, (uniref90, bfd, mgnify), template_features)


def _template_features(databases: DatabaseSet, settings: SearchSettings, sequence: str,
                       hits: list[parsers.TemplateHit]) -> dict[str, np.ndarray]:
    """AlphaFold's template features for `hits`. AlphaFold stops at a hit whose mmCIF file it
    cannot read (OSError); that becomes this query's FeatureError, naming the file, so the
    other queries of a batch go on.

    Raises:
        FeatureError: a hit's mmCIF file is missing or unreadable.
        ToolNotFoundError: kalign is missing.
    """
    try:
        result = make_template_featurizer(databases, settings).get_templates(
            query_sequence=sequence, hits=hits)
    except OSError as exc:
        raise FeatureError(f"template hit's mmCIF {exc.filename}: {exc.strerror} (is the "
                           f"pdb_mmcif folder complete?)") from exc
    for warning in result.warnings:
        logger.debug("template warning: %s", warning)
    return dict(result.features)


def empty_template_features() -> dict[str, np.ndarray]:
    """AlphaFold's template features when no hit qualifies (what its featurizer returns)."""
    return {name: np.array([], dtype=dtype) for name, dtype in templates.TEMPLATE_FEATURES.items()}


def msa_feature_dict(sequence: str, description: str, msas: tuple[parsers.Msa, ...],
                     template_features: dict[str, np.ndarray] | None = None
                     ) -> dict[str, np.ndarray]:
    """Sequence, MSA and template features in DataPipeline's order (one path for every mode);
    MSA rows de-duplicated as DeepMind's AlphaFold does (`deduplicate_msas`)."""
    for msa in msas:
        if len(msa) == 0:
            raise FeatureError("an MSA is empty (not even the query)")
    return {
        **pipeline.make_sequence_features(sequence=sequence, description=description,
                                          num_res=len(sequence)),
        **pipeline.make_msa_features(deduplicate_msas(msas)),
        **(template_features if template_features is not None else empty_template_features()),
    }


def deduplicate_msas(msas: tuple[parsers.Msa, ...]) -> tuple[parsers.Msa, ...]:
    """Each aligned sequence once, where it first occurs across `msas` in order, with its own
    deletions and description: DeepMind's `make_msa_features`, whose de-duplication the
    installed fork commented out (the query would count once per MSA, a hit found in two
    databases twice). An MSA left with no row is dropped; the first keeps the query."""
    seen: set[str] = set()
    out = []
    for msa in msas:
        keep = []
        for i, seq in enumerate(msa.sequences):
            if seq not in seen:
                seen.add(seq)
                keep.append(i)
        if keep:
            out.append(parsers.Msa(sequences=[msa.sequences[i] for i in keep],
                                   deletion_matrix=[msa.deletion_matrix[i] for i in keep],
                                   descriptions=[msa.descriptions[i] for i in keep]))
    return tuple(out)


def single_sequence_features(sequence: str, description: str) -> dict[str, np.ndarray]:
    """No search: an MSA of the query alone and no templates."""
    msa = parsers.Msa(sequences=[sequence], deletion_matrix=[[0] * len(sequence)],
                      descriptions=[description])
    return msa_feature_dict(sequence, description, (msa,))


def mmseqs_features(sequence: str, description: str, msa_dir: Path, *,
                    databases: DatabaseSet, settings: SearchSettings) -> dict[str, np.ndarray]:
    """Features from an MMseqs2 search's `msas/`: uniref.a3m (+ env.a3m), pdb_hits.m8.

    Templates are featurized only when pdb_hits.m8 and the mmCIF folder are both there.

    Raises:
        FeatureError: a file is missing or malformed.
        ToolNotFoundError: kalign is missing (needed for templates).
    """
    from parafold.search.mmseqs import MMSEQS_FILES
    from parafold.search.mmseqs_templates import parse_m8_hits

    msas = []
    for key in ("uniref", "env"):
        path = msa_dir / MMSEQS_FILES[key]
        if key == "uniref" or path.is_file():
            try:
                msa = parsers.parse_a3m(path.read_text())
            except OSError as exc:
                raise FeatureError(f"{path}: cannot read search output: {exc.strerror}") from exc
            except (ValueError, IndexError) as exc:
                raise FeatureError(f"{path}: malformed A3M: {exc}") from exc
            if len(msa) == 0:
                raise FeatureError(f"{path}: the MSA is empty (not even the query)")
            msas.append(msa)
    m8 = msa_dir / MMSEQS_FILES["pdb"]
    template_features = None
    if m8.is_file() and databases.path("pdb_mmcif") is not None:
        try:
            hits = parse_m8_hits(m8.read_text(), sequence)
        except OSError as exc:
            raise FeatureError(f"{m8}: cannot read search output: {exc.strerror}") from exc
        except FeatureError as exc:
            raise FeatureError(f"{m8}: {exc}") from exc
        template_features = _template_features(databases, settings, sequence, hits)
    return msa_feature_dict(sequence, description, tuple(msas), template_features)
