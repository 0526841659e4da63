"""Useful matmul FLOPs of one recycling iteration, counted from the traced program.

XLA's `cost_analysis()` is no use for AlphaFold: it counts the body of a `scan` once, so 48
Evoformer blocks count as one (checked: the figure does not change with the block count), and
fused kernels are custom calls it cannot see into. We count `dot_general` FLOPs (2*M*N*K) in
the jaxpr instead, multiplying scan bodies by their length, with fused kernels off (they do the
same math). Matmuls are what the GPU's bf16 matrix peak measures, so the ratio is meaningful.

These traces are the ground truth of `parafold.fold.workmodel`, whose polynomial in length
and MSA depths gives the same count without tracing (the benchmarks and the merge planner use
it; `benchmarks/fit_work_model.py` refits it from here).
"""

from __future__ import annotations

import math
from typing import Any

from parafold.fold.buckets import ShapeKey
from parafold.fold.settings import ModelSettings

__all__ = ["matmul_flops", "iteration_flops", "measure_bf16_peak"]


def _subjaxprs(value: Any) -> list[Any]:
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _subjaxprs(v)]
    return []


def matmul_flops(jaxpr: Any) -> float:
    """2*M*N*K over every dot_general; scans times their length, conds their dearest branch."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(int(lhs[d]) for d in contract)
            total += 2.0 * math.prod(int(d) for d in eqn.outvars[0].aval.shape) * k
            continue
        subs = [matmul_flops(j) for v in eqn.params.values() for j in _subjaxprs(v)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
        else:
            total += sum(subs) * (int(eqn.params["length"]) if name == "scan" else 1)
    return total


def iteration_flops(model_name: str, settings: ModelSettings, key: ShapeKey) -> float:
    """Matmul FLOPs of one iteration for one protein of exactly `key.length` residues."""
    import jax

    from parafold.fold.processing import process_features
    from parafold.fold.runner import ModelRunner, _step_fn, forward_transform
    from parafold.fold.synthetic import make_features

    transform, cfg = forward_transform(model_name, settings, low_memory=False, key=key,
                                       pallas={"use_pallas": False})
    raw = make_features("A" * key.length, 4, num_templates=1 if key.templates else 0)
    batch = {k: v[0] for k, v in process_features(raw, cfg, key, seed=0).items()}
    prev = ModelRunner._prev(key.length)
    params = jax.eval_shape(transform.init, jax.random.PRNGKey(0), {**batch, "prev": prev})
    jaxpr = jax.make_jaxpr(_step_fn(transform))(params, jax.random.PRNGKey(0), batch, prev)
    return matmul_flops(jaxpr.jaxpr)


def measure_bf16_peak(n: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matmul FLOP/s of the default device (a large square jnp.dot)."""
    import time

    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)
                  .astype(jnp.bfloat16))
    dot(a, b).block_until_ready()
    started = time.perf_counter()
    out = a
    for _ in range(repeats):
        out = dot(out, b)
    out.block_until_ready()
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - started)
