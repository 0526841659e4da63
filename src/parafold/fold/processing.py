"""Raw AlphaFold features -> the model's padded input arrays, and model outputs -> unpadded.

AlphaFold's own input pipeline does the padding: its `make_fixed_size` step pads every residue
axis to `crop_size`, the MSA to `max_msa_clusters`, the extra MSA to `max_extra_msa` and the
templates to `max_templates`, with zero masks. We set those sizes to the target's bucket
instead of the target's own sizes, so a padded target sees exactly the random draws (MSA
sampling, masking) the unpadded one would. A model samples at most its own MSA sizes; where the
bucket is bigger (one shared with a model that samples more) the rest is padded here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from parafold.errors import FeatureError
from parafold.fold.buckets import ShapeKey

if TYPE_CHECKING:
    import ml_collections

__all__ = ["process_features", "unpad_result", "PER_RESIDUE", "PER_PAIR"]

# Output arrays whose leading axis (PER_RESIDUE) or two leading axes (PER_PAIR) are residues.
PER_RESIDUE = ("plddt", "structure_module", "experimentally_resolved", "predicted_lddt")
PER_PAIR = ("distogram", "predicted_aligned_error", "aligned_confidence_probs")
_NOT_PER_RESIDUE = ("bin_edges", "breaks")


def process_features(raw: dict[str, Any], cfg: ml_collections.ConfigDict, key: ShapeKey,
                     seed: int) -> dict[str, np.ndarray]:
    """AlphaFold's feature processing, padded to `key`; arrays carry a leading iteration axis.

    Raises:
        FeatureError: the dict lacks features the model needs or is longer than the bucket.
    """
    import copy

    from alphafold.model.tf import input_pipeline, proteins_dataset
    from alphafold.model.tf import np_backend as tf

    example = dict(raw)
    try:
        length = int(np.asarray(example["seq_length"]).ravel()[0])
    except (KeyError, IndexError) as exc:
        raise FeatureError("feature dict has no seq_length") from exc
    if length > key.length:
        raise FeatureError(f"target of {length} residues does not fit bucket {key.length}")
    if "deletion_matrix_int" in example:
        example["deletion_matrix"] = example.pop("deletion_matrix_int").astype(np.float32)
    data_cfg = copy.deepcopy(cfg.data)
    names = list(data_cfg.common.unsupervised_features)
    if data_cfg.common.use_templates:
        names += list(data_cfg.common.template_features)
    missing = [n for n in names if n not in example and n != "deletion_matrix_int"]
    if missing:
        raise FeatureError(f"feature dict lacks {missing}")
    with data_cfg.unlocked():
        data_cfg.eval.crop_size = key.length
    graph = tf.Graph()
    try:  # AlphaFold's pipeline asserts its shapes: a foreign dict that does not fit fails
        # its own target, not the process (an AssertionError escaped as far as an abort)
        with graph.as_default():
            tf.compat.v1.set_random_seed(seed)
            tensors = proteins_dataset.np_to_tensor_dict(np_example=example, features=names)
            batch = input_pipeline.process_tensors_from_config(tensors, data_cfg)
        graph.finalize()
        with tf.Session(graph=graph) as session:
            processed = session.run(batch)
    except (AssertionError, ValueError, TypeError) as exc:
        raise FeatureError(f"features do not fit AlphaFold's input pipeline: {exc}") from exc
    arrays = {k: np.asarray(v) for k, v in processed.items() if np.asarray(v).dtype != object}
    return _pad_msa_axes(arrays, data_cfg.eval.feat, key)


def _pad_msa_axes(arrays: dict[str, np.ndarray], schema: Any, key: ShapeKey
                  ) -> dict[str, np.ndarray]:
    """Zero-pad MSA axes the pipeline left shorter than the key: a model that samples fewer
    rows than its bucket holds (model 1 takes 508 cluster rows, in a bucket of 512 it shares
    with model 3). Zeros are what AlphaFold's own padding writes, masks included."""
    from alphafold.model.tf import shape_placeholders as sp

    sizes = {sp.NUM_MSA_SEQ: key.clusters, sp.NUM_EXTRA_SEQ: key.extra}
    for name, value in arrays.items():
        axes = list(schema[name]) if name in schema else []
        if len(axes) + 1 != value.ndim:  # the leading axis is the recycling iteration
            continue
        widths = [(0, 0)] + [(0, max(0, sizes.get(axis, 0) - size))
                             for axis, size in zip(axes, value.shape[1:], strict=True)]
        if any(after for _, after in widths):
            arrays[name] = np.pad(value, widths)
    return arrays


def _cut(value: Any, length: int, pair: bool) -> np.ndarray:
    value = np.asarray(value)
    if pair and value.ndim >= 2:
        return value[:length, :length]
    if value.ndim >= 1:
        return value[:length]
    return value


def unpad_result(result: dict[str, Any], length: int) -> dict[str, Any]:
    """Cut every residue axis of a model result back to the target's `length`.

    Heads (`distogram`, `structure_module`, ...) are dicts cut by their parent's kind;
    bin edges are not per residue. No padded residue reaches a file.
    """
    out: dict[str, Any] = {}
    for name, value in result.items():
        if isinstance(value, dict):
            out[name] = {sub: np.asarray(v) if sub in _NOT_PER_RESIDUE
                         else _cut(v, length, name in PER_PAIR) for sub, v in value.items()}
        elif name in PER_PAIR or name in PER_RESIDUE:
            out[name] = _cut(value, length, name in PER_PAIR)
        else:
            out[name] = np.asarray(value)
    return out
