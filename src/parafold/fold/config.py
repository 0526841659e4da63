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

__all__ = ["Family", "DepthCaps", "family_of", "model_number", "depth_caps", "model_config",
           "TINY_OVERRIDES", "resolve_pallas"]

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


def family_of(model_name: str) -> Family:
    """Models 1-2 embed templates, 3-5 do not: two architectures, two compiled-function sets."""
    return TEMPLATES if model_number(model_name) in (1, 2) else NO_TEMPLATES


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
    """MSA sizes of the unbucketed config: where AlphaFold pads every target to."""
    cfg = _base_config(model_name, config_size)
    uses_templates = bool(cfg.data.common.use_templates)
    templates = int(cfg.data.eval.max_templates) if uses_templates else 0
    clusters = int(cfg.data.eval.max_msa_clusters)
    if cfg.data.common.reduce_msa_clusters_by_max_templates:
        clusters -= templates
    return DepthCaps(clusters=clusters, extra=int(cfg.data.common.max_extra_msa),
                     templates=templates)


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

    `clusters` counts the MSA cluster rows the model sees (template rows not included).
    """
    import copy

    cfg = copy.deepcopy(_base_config(model_name, settings.config_size))
    with cfg.unlocked():
        if cfg.data.common.reduce_msa_clusters_by_max_templates:
            cfg.data.eval.max_msa_clusters = clusters + templates
        else:
            cfg.data.eval.max_msa_clusters = clusters
        cfg.data.common.max_extra_msa = extra
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
