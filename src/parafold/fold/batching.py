"""Several proteins of one shape in one forward pass: batch sizes, stacking, freezing.

At 0.06-0.2 s per small protein the GPU is underused by one protein at a time, so proteins of
one `ShapeKey` run as a `jax.vmap` over a leading batch axis (`ShapeKey.batch = B`).

Batch size comes from a memory model, capped twice:

* bytes per member = `ACTIVATION_FACTOR` x (pair rep L^2*128 + MSA rep (clusters+templates)*L*256
  + extra MSA rep extra*L*64 + template pair reps templates*L^2*64) x bytes per value
  + the member's inputs for every iteration and its float32 recycling state and outputs.
  `ACTIVATION_FACTOR` stands for the transient tensors of one Evoformer block (projections,
  gates, float32 layer norms, chunked attention logits); it is an estimate, calibrated by the
  GPU benchmark (it prints the peak bytes per member it measured next to this model's figure).
* the budget is `MEMORY_FRACTION` of the device's free memory (`memory_stats()`, params already
  loaded), or `DEFAULT_DEVICE_BYTES` when the device does not say;
* a work cap of `SATURATING_PAIRS` residue pairs per pass (B * L^2): the measured H200 gains stop
  about there (L=64 x 32, L=256 x 4), and a bigger batch only adds padding slots;
* `ModelSettings.max_batch`, and 1 on the CPU unless `force_batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from parafold.fold.buckets import ShapeKey
from parafold.fold.settings import ModelSettings

__all__ = ["member_bytes", "device_free_bytes", "batch_size", "next_pow2", "stack_members",
           "split_members", "freeze_done", "batched_key", "ACTIVATION_FACTOR", "MEMORY_FRACTION",
           "DEFAULT_DEVICE_BYTES", "SATURATING_PAIRS"]

log = logging.getLogger(__name__)

ACTIVATION_FACTOR = 16
MEMORY_FRACTION = 0.7
DEFAULT_DEVICE_BYTES = 16 * 2**30
SATURATING_PAIRS = 2**18
_MSA_FEAT_CHANNELS = 49
_OUTPUT_PAIR_CHANNELS = 64 * 3  # distogram logits, PAE logits and probabilities


def member_bytes(key: ShapeKey, *, bfloat16: bool = True, iterations: int = 4) -> int:
    """Estimated device bytes one batch member needs at `key` (see the module docstring)."""
    L, value = key.length, 2 if bfloat16 else 4
    rows = key.clusters + key.templates
    activations = (L * L * 128 + rows * L * 256 + key.extra * L * 64
                   + key.templates * L * L * 64) * value
    inputs = iterations * (rows * L * (_MSA_FEAT_CHANNELS + 3) + key.extra * L * 4) * 4
    state = (L * L * (128 + _OUTPUT_PAIR_CHANNELS) + L * (256 + 37 * 3 * 2)) * 4
    return ACTIVATION_FACTOR * activations + inputs + 2 * state


def device_free_bytes(settings: ModelSettings) -> int:
    """Free device memory: the setting, else `memory_stats()`, else `DEFAULT_DEVICE_BYTES`."""
    if settings.device_memory_bytes is not None:
        return settings.device_memory_bytes
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except (RuntimeError, NotImplementedError):  # some backends do not report memory
        stats = {}
    limit = stats.get("bytes_limit")
    if not limit:
        return DEFAULT_DEVICE_BYTES
    return max(0, int(limit) - int(stats.get("bytes_in_use", 0)))


def batch_size(key: ShapeKey, settings: ModelSettings, *, platform: str,
               free_bytes: int | None = None) -> int:
    """Most members of `key` per forward pass (>= 1), from the memory model and the caps."""
    if platform == "cpu" and not settings.force_batch:
        return 1
    free = device_free_bytes(settings) if free_bytes is None else free_bytes
    per_member = member_bytes(key, bfloat16=not settings.float32,
                              iterations=settings.num_iterations)
    by_memory = int(free * MEMORY_FRACTION) // per_member
    by_work = SATURATING_PAIRS // (key.length * key.length)
    return max(1, min(settings.max_batch, by_memory, by_work))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1): few batch shapes for partial groups."""
    return 1 << max(0, n - 1).bit_length()


def stack_members(members: Sequence[dict[str, np.ndarray]], key: ShapeKey
                  ) -> list[dict[str, np.ndarray]]:
    """Per-iteration inputs of shape [B, ...], from members' [iterations, ...] arrays.

    Slots past the real members are copies of the first member (a dummy: it is computed and
    thrown away, so the shape stays `key.batch`). Each iteration's arrays are stacked on
    their own, so they are contiguous: `device_put` sends them without another host copy
    (slices of one [B, iterations, ...] stack would each be copied dense first).
    """
    if not members or len(members) > key.batch:
        raise ValueError(f"{len(members)} members for a batch of {key.batch}")
    slots = list(members) + [members[0]] * (key.batch - len(members))
    iterations = int(members[0]["aatype"].shape[0])
    return [{name: np.stack([m[name][r] for m in slots]) for name in members[0]}
            for r in range(iterations)]


def split_members(result: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Batched host outputs -> one dict per real member (dummy slots dropped)."""
    def take(tree: Any, m: int) -> Any:
        if isinstance(tree, dict):
            return {k: take(v, m) for k, v in tree.items()}
        return np.asarray(tree)[m]

    return [take(result, m) for m in range(count)]


_FREEZE: Any = None


def freeze_done(done: Any, new: Any, old: Any) -> Any:
    """`new` with every member where `done` is set replaced by `old` (a jitted where)."""
    global _FREEZE
    if _FREEZE is None:
        import jax
        import jax.numpy as jnp

        def freeze(done: Any, new: Any, old: Any) -> Any:
            def pick(n: Any, o: Any) -> Any:
                mask = done.reshape(done.shape + (1,) * (n.ndim - 1))
                return jnp.where(mask, o, n)
            return jax.tree_util.tree_map(pick, new, old)

        _FREEZE = jax.jit(freeze)
    return _FREEZE(done, new, old)


def batched_key(key: ShapeKey, batch: int) -> ShapeKey:
    return replace(key, batch=batch)
