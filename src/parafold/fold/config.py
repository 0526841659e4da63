"""AlphaFold model configs with parafold's overrides: size, numerics, kernels and MSA buckets.

The `full` config is AlphaFold's own (`alphafold.model.config.model_config`), touched only where
a setting asks for it. `tiny` keeps every channel width of the real architecture but few blocks
and small MSAs, so CPU tests run in seconds; it is used only when asked for by name.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parafold.fold.settings import ModelSettings

if TYPE_CHECKING:
    import ml_collections

__all__ = ["Family", "DepthCaps", "family_of", "model_number", "uses_templates", "depth_caps",
           "ladder_caps", "model_config", "TINY_OVERRIDES", "resolve_pallas"]

log = logging.getLogger(__name__)

TEMPLATES = "templates"
NO_TEMPLATES = "no_templates"
Family = str

# Few blocks, small MSAs: the real layer shapes, a fraction of the depth.
TINY_OVERRIDES: dict[str, Any] = {
    "model.embeddings_and_evoformer.evoformer_num_block": 2,
    "model.embeddings_and_evoformer.extra_msa_stack_num_block": 1,
    "model.embeddings_and_evoformer.template.template_pair_stack.num_block": 1,
    "model.heads.structure_module.num_layer": 2,
    "data.eval.max_msa_clusters": 32,
    "data.eval.max_templates": 4,
    "model.embeddings_and_evoformer.template.max_templates": 4,
}
_TINY_MAX_EXTRA = 64


@dataclass(frozen=True, slots=True)
class DepthCaps:
    """The most MSA cluster rows, extra rows and templates a model takes (its config's sizes)."""

    clusters: int
    extra: int
    templates: int


def model_number(model_name: str) -> int:
    return int(model_name.split("_")[1])


def uses_templates(model_name: str) -> bool:
    """Models 1-2 were trained with templates, 3-5 without."""
    return model_number(model_name) in (1, 2)


def family_of(model_name: str, *, templates: bool = True) -> Family:
    """The architecture a model runs a target with: models 1-2 embed templates, 3-5 do not.

    A target without templates (`templates` false) runs models 1-2 without the template
    stack too: with no template, AlphaFold zeroes the stack's output and masks its MSA rows,
    so the result is the same, and all five models share one compiled function, as ColabFold
    does for template-free runs.
    """
    return TEMPLATES if templates and uses_templates(model_name) else NO_TEMPLATES


@functools.lru_cache(maxsize=64)
def _base_config(model_name: str, config_size: str) -> ml_collections.ConfigDict:
    from alphafold.model import config as af_config

    cfg = af_config.model_config(model_name)
    if config_size == "tiny":
        cfg.update_from_flattened_dict(TINY_OVERRIDES)
        cfg.data.common.max_extra_msa = _TINY_MAX_EXTRA
    return cfg


@functools.lru_cache(maxsize=64)
def depth_caps(model_name: str, config_size: str) -> DepthCaps:
    """MSA sizes of the unbucketed config: where AlphaFold pads every target to, and the most
    rows a model samples (models 1-2 take 4 cluster rows fewer, with templates or without)."""
    cfg = _base_config(model_name, config_size)
    uses_templates = bool(cfg.data.common.use_templates)
    templates = int(cfg.data.eval.max_templates) if uses_templates else 0
    clusters = int(cfg.data.eval.max_msa_clusters)
    if cfg.data.common.reduce_msa_clusters_by_max_templates:
        clusters -= templates
    return DepthCaps(clusters=clusters, extra=int(cfg.data.common.max_extra_msa),
                     templates=templates)


@functools.lru_cache(maxsize=8)
def ladder_caps(family: Family, config_size: str) -> DepthCaps:
    """The tops of a family's MSA-depth ladders: the most cluster rows any model of the family
    samples (512 without templates, as models 3-5; 508 with), the most extra rows any model
    samples (5,120: models 2 and 5 sample 1,024 on the same ladder), its template count.
    Every model of a family buckets on the same rungs, so they share shapes."""
    names = [f"model_{n}" for n in range(1, 6)]
    extra = max(depth_caps(name, config_size).extra for name in names)
    if family == TEMPLATES:
        caps = [depth_caps(name, config_size) for name in names if uses_templates(name)]
        return DepthCaps(clusters=max(c.clusters for c in caps), extra=extra,
                         templates=max(c.templates for c in caps))
    clusters = max(int(_base_config(name, config_size).data.eval.max_msa_clusters)
                   for name in names)  # before models 1-2 give 4 rows to templates
    return DepthCaps(clusters=clusters, extra=extra, templates=0)


def resolve_pallas(settings: ModelSettings) -> dict[str, Any]:
    """global_config entries for fused kernels: the setting, or auto (on for a GPU that has them)."""
    import jax

    on_gpu = jax.default_backend() == "gpu"
    use = settings.use_pallas if settings.use_pallas is not None else on_gpu
    if not use:
        return {"use_pallas": False}
    if not on_gpu:
        log.warning("fused kernels forced on a %s backend; they may fail to lower",
                    jax.default_backend())
    from colabfold_kernels.device import dispatch

    return dict(dispatch("auto"))


def model_config(model_name: str, settings: ModelSettings, *, clusters: int, extra: int,
                 templates: int, pallas: dict[str, Any], low_memory: bool = False
                 ) -> ml_collections.ConfigDict:
    """The config for one model at one bucket (cluster rows, extra rows, templates).

    `clusters` and `extra` are the bucket's rows (template rows not included); the data part
    samples at most the model's own caps (`depth_caps`) and `processing.process_features`
    pads the rest. `templates` 0 turns a template model's template stack off (`family_of`).
    """
    import copy

    own = depth_caps(model_name, settings.config_size)
    cfg = copy.deepcopy(_base_config(model_name, settings.config_size))
    with cfg.unlocked():
        if cfg.data.common.use_templates and templates == 0:
            cfg.data.common.use_templates = False
            cfg.data.eval.max_templates = 0
            cfg.model.embeddings_and_evoformer.template.enabled = False
            cfg.model.embeddings_and_evoformer.template.embed_torsion_angles = False
        sampled = min(clusters, own.clusters)
        if cfg.data.common.reduce_msa_clusters_by_max_templates:
            cfg.data.eval.max_msa_clusters = sampled + templates
        else:
            cfg.data.eval.max_msa_clusters = sampled
        cfg.data.common.max_extra_msa = min(extra, own.extra)
        if cfg.data.common.use_templates:
            cfg.data.eval.max_templates = templates
            cfg.model.embeddings_and_evoformer.template.max_templates = templates
        cfg.data.common.num_recycle = settings.num_recycle
        cfg.model.num_recycle = settings.num_recycle
        cfg.model.recycle_early_stop_tolerance = settings.recycle_early_stop_tolerance
        cfg.data.eval.num_ensemble = 1
        gc = cfg.model.global_config
        gc.zero_init = False
        gc.eval_dropout = False
        if settings.float32:
            gc.bfloat16 = False
            gc.bfloat16_output = False
        gc.update(pallas)
        # Inputs are padded to a length bucket: let the fused attention skip the padding.
        gc.length_buckets = bool(pallas.get("use_pallas"))
        if low_memory:
            gc.subbatch_size = 1
            cfg.model.embeddings_and_evoformer.template.subbatch_size = 16
        cfg.model.calc_extended_ptm = False
        cfg.model.use_probs_extended = False
    return cfg
