"""Batched forward passes: same results as one protein at a time, per-member early stop,
one compile per batched shape, and a batch-size model that is monotone and capped.

The real model in its tiny config, random weights, float32, on the CPU with batching forced.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parafold.featureset import write_feature_set  # noqa: E402
from parafold.fold.buckets import ShapeKey  # noqa: E402
from parafold.fold.settings import ModelSettings  # noqa: E402

MODEL = "model_3_ptm"
# One length bucket (32) and one MSA-depth bucket (32 clusters, 1 extra row), different
# lengths and depths: the batch of 4 holds 3 real members and one dummy slot.
MEMBERS = {"b21": (21, 9), "b27": (27, 17), "b31": (31, 30)}
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from parafold.fold.params import write_random_params
    from parafold.fold.synthetic import make_features, random_sequence

    root = tmp_path_factory.mktemp("batch")
    settings = ModelSettings(config_size="tiny", models=(3,), num_recycle=1, float32=True,
                             force_batch=True, max_batch=4, compile_cost_s=0.0,
                             compile_cache_dir=tmp_path_factory.getbasetemp() / "jax-cache-b")
    write_random_params(root / "weights", settings, seed=0)
    rng = np.random.default_rng(11)
    raws, sets = {}, []
    for i, (name, (length, depth)) in enumerate(MEMBERS.items()):
        raws[name] = make_features(random_sequence(length, rng), depth, seed=20 + i,
                                   description=name)
        sets.append(write_feature_set(root / "features" / name, name=name, target_id=name,
                                      features=raws[name]))
    return root, settings, raws, sets


def _run_both(root, settings, raws):
    """Each member alone (batch 1) and all together (batch 4); unpadded results."""
    import jax

    from parafold.fold.batching import batched_key, stack_members
    from parafold.fold.buckets import shape_key
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features, unpad_result
    from parafold.fold.runner import ModelRunner

    runner = ModelRunner(settings)
    params = jax.device_put(load_params(root / "weights", MODEL, settings))
    keys = {shape_key(MEMBERS[n][0], MEMBERS[n][1], MODEL, settings) for n in raws}
    assert len(keys) == 1, keys
    key = keys.pop()
    assert (key.length, key.clusters, key.extra) == (32, 32, 1)
    cfg = runner.config(MODEL, key)
    feats = [process_features(raws[n], cfg, key, seed=s) for n, s in zip(raws, SEEDS, strict=True)]
    single = []
    for f, s in zip(feats, SEEDS, strict=True):
        result, _ = runner.fetch(runner.launch(MODEL, key, params, f, s))
        single.append(result)
    big = batched_key(key, 4)
    batched, _ = runner.fetch_batch(runner.launch_batch(MODEL, big, params,
                                                        stack_members(feats, big), SEEDS))
    lengths = [MEMBERS[n][0] for n in raws]
    return (runner, big, [unpad_result(r, n) for r, n in zip(single, lengths, strict=True)],
            [unpad_result(r, n) for r, n in zip(batched, lengths, strict=True)])


def _assert_same(a, b):
    pos_a = a["structure_module"]["final_atom_positions"]
    pos_b = b["structure_module"]["final_atom_positions"]
    mask = b["structure_module"]["final_atom_mask"] > 0
    assert pos_a.shape == pos_b.shape
    assert np.abs(pos_a - pos_b)[mask].max() <= 0.01
    assert np.abs(a["plddt"] - b["plddt"]).max() <= 0.01
    assert abs(float(a["ptm"]) - float(b["ptm"])) <= 1e-3
    assert int(a["num_recycles"]) == int(b["num_recycles"])


def test_batched_equals_single_and_compiles_once(env):
    root, settings, raws, _ = env
    runner, big, single, batched = _run_both(root, settings, raws)
    assert len(batched) == 3
    for a, b in zip(single, batched, strict=True):
        _assert_same(a, b)
    # members differ from each other (a batch that mixed them up would fail above)
    assert not np.allclose(single[0]["plddt"][:21], single[1]["plddt"][:21])
    # one executable for the batched shape, one for the lone shape; a second batch reuses it
    assert runner.compiled_keys.count(big) == 1
    before = runner.stats.compiles
    import jax

    from parafold.fold.batching import stack_members
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features

    params = jax.device_put(load_params(root / "weights", MODEL, settings))
    feats = process_features(raws["b21"], runner.config(MODEL, big), big, seed=1)
    runner.fetch_batch(runner.launch_batch(MODEL, big, params, stack_members([feats], big), [1]))
    assert runner.stats.compiles == before
    assert runner.stats.padded_slots == 1 + 3


def test_member_stopping_early_is_frozen(env):
    """A tolerance between the members' first `tol`s: some stop after one recycle, the rest go
    on; each ends exactly as it does alone (same iterations, same structure)."""
    root, settings, raws, _ = env
    probe = replace(settings, num_recycle=2)
    tols = _first_tols(root, probe, raws)
    lo, hi = min(tols), max(tols)
    assert hi > lo
    tolerant = replace(probe, recycle_early_stop_tolerance=float((lo + hi) / 2))
    _, _, single, batched = _run_both(root, tolerant, raws)
    ran = [int(b["num_recycles"]) for b in batched]
    assert min(ran) == 1 and max(ran) == 2, ran
    for a, b in zip(single, batched, strict=True):
        _assert_same(a, b)


def _first_tols(root, settings, raws):
    """`tol` after the second iteration for each member alone (its first two iterations)."""
    import jax

    from parafold.fold.buckets import shape_key
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features
    from parafold.fold.runner import ModelRunner

    runner = ModelRunner(settings)
    params = jax.device_put(load_params(root / "weights", MODEL, settings))
    key = shape_key(31, 30, MODEL, settings)
    tols = []
    for name, seed in zip(raws, SEEDS, strict=True):
        f = process_features(raws[name], runner.config(MODEL, key), key, seed=seed)
        two = {k: v[:2] for k, v in f.items()}
        result, _ = runner.fetch(runner.launch(MODEL, key, params, two, seed))
        tols.append(float(result["tol"]))
    return tols


def test_worker_batches_with_helper_processes(env, tmp_path):
    """FoldWorker end to end: one group of 3 in one pass of 4, features and files in helper
    processes, AlphaFold outputs for each target, a busy fraction measured."""
    from parafold.fold.worker import FoldWorker

    root, settings, _, sets = env
    s = replace(settings, host_workers=1, write_workers=1)
    with FoldWorker(root / "weights", s) as worker:
        assert [len(g) for g in worker.group(sets)] == [3]
        outcomes = worker.fold(sets, tmp_path / "out")
        stats = worker.stats
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert stats["compiles"] == 1 and stats["launches"] == 1
    assert stats["batched_members"] == 3 and stats["padded_slots"] == 1
    assert 0 < stats["busy_fraction"] <= 1
    for fs, o in zip(sets, outcomes, strict=True):
        assert "batch=4" in o.bucket
        assert (tmp_path / "out" / fs.name / "ranked_0.cif").is_file()
        assert o.timings[f"predict_{MODEL}"] > 0


def test_only_written_outputs_leave_the_device(env, tmp_path, monkeypatch):
    """Without --save-raw only the entries the files need are copied to the host (the
    distogram and PAE probabilities are most of a result's bytes); with it, everything, and
    `result_*.pkl` holds them."""
    import pickle

    import jax

    from parafold.fold.worker import _WRITTEN, FoldWorker

    root, settings, _, sets = env
    real_get, fetched = jax.device_get, []

    def device_get(x):
        if isinstance(x, dict) and "plddt" in x:
            fetched.append(set(x))
        return real_get(x)

    monkeypatch.setattr(jax, "device_get", device_get)
    for save_raw in (False, True):
        fetched.clear()
        out = tmp_path / f"raw{save_raw}"
        with FoldWorker(root / "weights", replace(settings, save_raw=save_raw)) as worker:
            outcomes = worker.fold(sets, out)
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        assert fetched
        if save_raw:
            assert all("distogram" in keys for keys in fetched), fetched
            with open(out / sets[0].name / f"result_{MODEL}.pkl", "rb") as handle:
                assert "distogram" in pickle.load(handle)
        else:
            assert all(keys <= set(_WRITTEN) for keys in fetched), fetched
            assert (out / sets[0].name / "ranked_0.cif").is_file()
            assert (out / sets[0].name / f"pae_{MODEL}.json").is_file()


def test_out_of_memory_sending_a_batchs_inputs_halves_the_batch(env, tmp_path, monkeypatch):
    """XLA's out-of-memory while the stacked inputs go to the device is the shape's, as at
    launch: the batch is halved and every member predicted, none failed."""
    import jax

    from parafold.fold.worker import FoldWorker

    root, settings, _, sets = env
    real_put, raised = jax.device_put, []

    def device_put(x, *args, **kwargs):
        if isinstance(x, list) and not raised:  # a batch's per-iteration inputs
            raised.append(True)
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                               "3221225472 bytes.")
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", device_put)
    with FoldWorker(root / "weights", settings) as worker:
        outcomes = worker.fold(sets, tmp_path / "out")
    assert raised and all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert all("batch=4" not in o.bucket for o in outcomes)


def test_batch_size_model_monotone_and_capped():
    from parafold.fold.batching import batch_size, member_bytes, next_pow2

    s = ModelSettings(max_batch=16)
    free = 80 * 2**30
    sizes = []
    for length in range(32, 1200, 8):
        key = ShapeKey("no_templates", length, 512, 5120, 0)
        sizes.append(batch_size(key, s, platform="gpu", free_bytes=free))
        assert member_bytes(key) < member_bytes(replace(key, length=length + 8))
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)), sizes
    assert max(sizes) == 16 and min(sizes) >= 1 and sizes[-1] < 16
    small = ShapeKey("no_templates", 64, 128, 80, 0)
    assert batch_size(small, ModelSettings(max_batch=3), platform="gpu", free_bytes=free) == 3
    # more memory never gives fewer members; the CPU gets one unless forced
    assert (batch_size(small, s, platform="gpu", free_bytes=2**30)
            <= batch_size(small, s, platform="gpu", free_bytes=free))
    assert batch_size(small, s, platform="cpu", free_bytes=free) == 1
    assert batch_size(small, replace(s, force_batch=True), platform="cpu", free_bytes=free) > 1
    assert [next_pow2(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_matmul_flops_count_scan_bodies_times_length():
    """XLA's cost analysis counts a scan body once; ours counts it `length` times."""
    import jax
    import jax.numpy as jnp

    from parafold.fold.flops import matmul_flops

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

    jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 8)), jnp.ones((8, 8)))
    assert matmul_flops(jaxpr.jaxpr) == 5 * 2 * 4 * 8 * 8


@pytest.mark.parametrize(("model", "templates"), [("model_1_ptm", True), ("model_3_ptm", False)])
def test_vmap_keeps_every_fused_kernel_batched(monkeypatch, model, templates):
    """With the fused kernels an sm_90 GPU (H100, H200) selects, the batched iteration runs each
    kernel once over all members (the member axis in its grid), not once per member: JAX's
    Pallas batching falls back to a loop over members for some kernels (batched scalar-prefetch
    or grid-bound operands), which would leave a batch no faster than its members one by one.
    Traced, not run: Triton kernels need a GPU."""
    import collections

    import colabfold_kernels.device
    import jax
    from jax.extend import core as jcore

    from parafold.fold.batching import batched_key
    from parafold.fold.buckets import shape_key
    from parafold.fold.runner import (
        ModelRunner,
        _batched_step_fn,
        _step_fn,
        forward_transform,
        input_shapes,
    )

    monkeypatch.setattr(colabfold_kernels.device, "compute_capability", lambda: 90)
    settings = ModelSettings(models=(int(model.split("_")[1]),), compile_cache_dir=None)
    key = shape_key(64, 100, model, settings, templates=templates)
    pallas = {"use_pallas": True, "kernel_backend": "pallas", "compute_capability": 90}
    transform, _ = forward_transform(model, settings, low_memory=False, key=key, pallas=pallas)

    def kernels(closed: Any) -> collections.Counter:
        found: collections.Counter = collections.Counter()

        def walk(jaxpr: Any) -> None:
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "pallas_call":
                    found[(eqn.params["name"], eqn.outvars[0].aval.shape[0])] += 1
                for value in eqn.params.values():
                    for sub in value if isinstance(value, (list, tuple)) else [value]:
                        inner = getattr(sub, "jaxpr", sub)
                        if isinstance(inner, jcore.Jaxpr):
                            walk(inner)

        walk(closed.jaxpr)
        return found

    def trace(step: Any, batch: int) -> collections.Counter:
        k = batched_key(key, batch)
        prev = {n: jax.ShapeDtypeStruct(v.shape, v.dtype)
                for n, v in ModelRunner._prev(key.length, batch).items()}
        rng = jax.ShapeDtypeStruct((batch, 2) if batch > 1 else (2,), np.uint32)
        return kernels(jax.make_jaxpr(step)(params, rng, input_shapes(model, settings, k), prev))

    single_inputs = input_shapes(model, settings, key)
    single_prev = {n: jax.ShapeDtypeStruct(v.shape, v.dtype)
                   for n, v in ModelRunner._prev(key.length).items()}
    params = jax.eval_shape(lambda r, b, p: transform.init(r, {**b, "prev": p}),
                            jax.random.PRNGKey(0), single_inputs, single_prev)
    single = trace(_step_fn(transform), 1)
    batched = trace(_batched_step_fn(transform), 6)
    assert sum(single.values()) >= 20, single  # the fused path was taken
    names: collections.Counter = collections.Counter()
    for (name, lead), count in batched.items():
        assert lead == 6, f"{name}: runs per member ({count} call(s) of leading size {lead})"
        names[name] += count
    assert names == collections.Counter(n for (n, _), c in single.items() for _ in range(c))


def test_the_next_unit_is_launched_before_the_last_ones_outputs_are_fetched(env, tmp_path):
    """The device never waits for the host between units: unit N+1 is dispatched while unit
    N runs, before the loop waits for N's outputs (one protein a unit here, no batching)."""
    from parafold.fold.worker import FoldWorker

    root, settings, _, sets = env
    events: list[str] = []
    with FoldWorker(root / "weights", replace(settings, force_batch=False)) as worker:
        real_launch, real_fetch = worker.runner.launch, worker.runner.fetch

        def launch(model_name, key, params, feats, seed):
            events.append(f"launch {int(feats['seq_length'][0])}")
            return real_launch(model_name, key, params, feats, seed)

        def fetch(launched, *more):
            events.append("fetch")
            return real_fetch(launched, *more)

        worker.runner.launch, worker.runner.fetch = launch, fetch
        outcomes = worker.fold(sets, tmp_path / "out")
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert [e.split()[0] for e in events] == ["launch", "launch", "fetch", "launch", "fetch",
                                              "fetch"], events
