"""Compile ahead: background threads compile a `fold` call's shapes while earlier ones run.

Checks that the shapes compiled ahead are exactly the processed features' shapes, that each
key compiles once however many threads ask, that results do not change, that the next
shape's compile starts before the first unit is done, and that a background compile error is
its unit's alone. The real model in its tiny config, random weights, float32, on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import pickle  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parafold.featureset import write_feature_set  # noqa: E402
from parafold.fold.settings import ModelSettings  # noqa: E402

MODEL = "model_3_ptm"
LENGTHS = {"a20": 20, "b34": 34}  # length buckets 32 and 38: two shapes (38 has more work)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from parafold.fold.params import write_random_params
    from parafold.fold.synthetic import make_features, random_sequence

    root = tmp_path_factory.mktemp("ahead")
    # one persistent cache for the module: later workers trace and lower but skip XLA
    # compile_cost_s=0: both shapes compile (no merging), so there is something to compile ahead
    settings = ModelSettings(config_size="tiny", models=(3,), num_recycle=1, float32=True,
                             save_raw=True, compile_cost_s=0.0, compile_cache_dir=root / "jax-cache")
    write_random_params(root / "weights", settings, seed=0)
    rng = np.random.default_rng(3)
    raws, sets = {}, []
    for i, (name, length) in enumerate(LENGTHS.items()):
        raws[name] = make_features(random_sequence(length, rng), 10, seed=i, description=name)
        sets.append(write_feature_set(root / "features" / name, name=name, target_id=name,
                                      features=raws[name]))
    return root, settings, raws, sets


def _raw_result(folder, model=MODEL):
    with open(folder / f"result_{model}.pkl", "rb") as handle:
        return pickle.load(handle)


def _compile_threads():
    return [t for t in threading.enumerate() if t.name.startswith("compile-ahead")]


def test_input_shapes_match_processed_features(env):
    """Shapes and dtypes compiled ahead are those of real processed features: lone, batched
    (after stacking and `device_put`) and with templates."""
    import jax

    from parafold.fold.batching import batched_key, stack_members
    from parafold.fold.buckets import shape_key
    from parafold.fold.processing import process_features
    from parafold.fold.runner import forward_transform, input_shapes
    from parafold.fold.synthetic import make_features

    _, settings, raws, _ = env
    cases = [(MODEL, raws["b34"], 0), (MODEL, raws["a20"], 0), ("model_1_ptm", None, 2)]
    for model, raw, templates in cases:
        if raw is None:
            raw = make_features("MKTAYIAKQRQISFVKSHFSRQ", 7, seed=9, num_templates=templates)
        length = int(raw["seq_length"][0])
        key = shape_key(length, int(raw["msa"].shape[0]), model, settings)
        cfg = forward_transform(model, settings, low_memory=False, key=key)[1]
        feats = process_features(raw, cfg, key, seed=1)
        expected = {k: (v.shape[1:], v.dtype) for k, v in feats.items()}
        got = {k: (tuple(v.shape), v.dtype) for k, v in input_shapes(model, settings, key).items()}
        assert got == expected
        big = batched_key(key, 2)
        stacked = jax.device_put(stack_members([feats], big))[0]
        expected = {k: (tuple(v.shape), v.dtype) for k, v in stacked.items()}
        got = {k: (tuple(v.shape), v.dtype) for k, v in input_shapes(model, settings, big).items()}
        assert got == expected


def test_concurrent_requests_compile_once(env):
    """Two threads ask for one key at once: one build, both get it, and it runs real inputs."""
    import jax

    from parafold.fold.buckets import shape_key
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features
    from parafold.fold.runner import ModelRunner, input_shapes

    root, settings, raws, _ = env
    runner = ModelRunner(settings)
    params = jax.device_put(load_params(root / "weights", MODEL, settings))
    key = shape_key(20, 10, MODEL, settings)
    shapes = input_shapes(MODEL, settings, key)
    real_make = runner._make
    calls = []

    def slow_make(*args):
        calls.append(threading.current_thread().name)
        time.sleep(0.3)  # the second request arrives while the first builds
        return real_make(*args)

    runner._make = slow_make
    got = [None, None]

    def ask(i):
        got[i] = runner.executable(MODEL, key, params, shapes, ahead=i == 1)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got[0] is got[1] is not None
    assert runner.stats.compiles == 1 and runner.compiled_keys == [key]
    assert len(runner.stats.compile_spans) == 1
    feats = process_features(raws["a20"], runner.config(MODEL, key), key, seed=0)
    result, _ = runner.fetch(runner.launch(MODEL, key, params, feats, seed=0))
    assert result["plddt"].shape == (key.length,) and runner.stats.compiles == 1


def test_compile_ahead_matches_and_overlaps(env, tmp_path):
    """compile_ahead=1 gives the results of compile_ahead=0, compiles each key once, and
    starts the second shape's compile before the first unit's outputs are in."""
    from parafold.fold.worker import FoldWorker

    root, settings, _, sets = env
    results = {}
    for ahead in (0, 1):
        with FoldWorker(root / "weights", replace(settings, compile_ahead=ahead)) as worker:
            fetched: list[float] = []
            real_fetch = worker.runner.fetch

            def fetch(launched, *more, real_fetch=real_fetch, fetched=fetched):
                out = real_fetch(launched, *more)
                fetched.append(time.perf_counter())
                return out

            worker.runner.fetch = fetch
            outcomes = worker.fold(sets, tmp_path / f"out{ahead}")
            assert not _compile_threads()
            stats = worker.stats
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        results[ahead] = {fs.name: _raw_result(tmp_path / f"out{ahead}" / fs.name)
                          for fs in sets}
        keys = worker.runner.compiled_keys
        assert [k.length for k in keys] == [32, 38]
        assert stats["compiles"] == 2
        assert sorted(worker.runner.stats.compile_keys) == sorted(k.describe() for k in keys)
        assert stats["compiled_ahead"] == (2 if ahead else 0)
        assert len(stats["compile_spans"]) == 2
        spans = {name: (start, end) for name, start, end in worker.runner.stats.compile_spans}
        _, second = sorted(spans.values())  # the shape with more work compiles first
        if not ahead:  # the loop compiles the second shape once the first unit is fetched
            assert second[0] > fetched[0], (spans, fetched)
        else:
            assert second[0] < fetched[0], (spans, fetched)
            # each unit is charged its shape's compile, as when the loop compiled
            for o in outcomes:
                assert o.timings[f"compile_{MODEL}"] > 0
    for name in LENGTHS:
        a, b = results[0][name], results[1][name]
        pos_a = a["structure_module"]["final_atom_positions"]
        pos_b = b["structure_module"]["final_atom_positions"]
        assert pos_a.shape == pos_b.shape == (LENGTHS[name], 37, 3)
        assert np.abs(pos_a - pos_b).max() <= 1e-4
        assert np.abs(a["plddt"] - b["plddt"]).max() <= 1e-4


def _failing_make(worker, length, error):
    """`runner._make` that raises `error` for the shape of `length` in compile-ahead threads."""
    real_make = worker.runner._make
    calls: list[tuple[int, str]] = []

    def make(key, *args):
        where = threading.current_thread().name
        calls.append((key.length, where))
        if key.length == length and where.startswith("compile-ahead"):
            raise error
        return real_make(key, *args)

    worker.runner._make = make
    return calls


def test_background_compile_error_fails_only_its_unit(env, tmp_path):
    from parafold.fold.worker import FoldWorker

    root, settings, _, sets = env
    with FoldWorker(root / "weights", replace(settings, compile_ahead=1)) as worker:
        calls = _failing_make(worker, 38, RuntimeError("INVALID_ARGUMENT: no kernel for you"))
        outcomes = worker.fold(sets, tmp_path / "out")
        assert not _compile_threads()
        by_name = {o.name: o for o in outcomes}
        assert by_name["a20"].ok, by_name["a20"].error
        failed = by_name["b34"]
        assert not failed.ok
        assert "compile failed" in failed.error and "no kernel for you" in failed.error
        assert "L=38" in failed.error
        # the error came from the background compile, which the loop did not repeat
        assert [c for c in calls if c[0] == 38] == [(38, "compile-ahead_0")]
        assert [k.length for k in worker.runner.compiled_keys] == [32]
        # the worker lives on: the failed target folds on the next call
        del worker.runner._make
        again = worker.fold(sets, tmp_path / "out")
        assert [o.skipped for o in again] == [True, False] and again[1].ok, again[1].error


def test_background_out_of_memory_compiles_again_in_the_loop(env, tmp_path):
    """Out of memory while compiling ahead may be the running units' fault: the loop compiles
    that shape again itself, and the targets succeed."""
    from parafold.errors import GpuOutOfMemoryError
    from parafold.fold.worker import FoldWorker

    root, settings, _, sets = env
    with FoldWorker(root / "weights", replace(settings, compile_ahead=1)) as worker:
        calls = _failing_make(worker, 38, GpuOutOfMemoryError("out of memory compiling L=38"))
        outcomes = worker.fold(sets, tmp_path / "out")
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        assert [c for c in calls if c[0] == 38] == [(38, "compile-ahead_0"), (38, "MainThread")]
        assert worker.stats["compiles"] == 2 and worker.stats["compiled_ahead"] == 1


def test_the_shape_with_the_most_device_work_goes_first(env):
    """Its run covers the next shapes' compiles: five targets of a short shape go before one
    of a longer shape, one of each the other way round."""
    from parafold.featureset import FeatureSet
    from parafold.fold.worker import FoldWorker

    root, settings, _, _ = env

    def sets(counts: dict[int, int]) -> list[FeatureSet]:
        return [FeatureSet(name=f"s{length}_{i}", target_id="t", sequence="A" * length,
                           path=root / "none", msa_depth=10, num_templates=0)
                for length, n in counts.items() for i in range(n)]

    with FoldWorker(root / "weights", settings) as worker:
        first = worker.group(sets({20: 5, 34: 1}))[0][0]
        assert worker.shape_key(first).length == 32
        first = worker.group(sets({20: 1, 34: 1}))[0][0]
        assert worker.shape_key(first).length == 38


def test_features_are_submitted_ahead_until_every_helper_has_work(env, tmp_path):
    """Units of one member (deep MSAs take seconds each to process): before the first launch,
    the loop has given the feature helpers every unit's work (2 jobs per helper wanted), not
    just the fixed look-ahead of 2 units, which would leave most helpers idle."""
    import concurrent.futures as cf

    from parafold.fold.hostwork import HostPools
    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    root, settings, _, _ = env
    rng = np.random.default_rng(11)
    sets = [write_feature_set(tmp_path / "features" / f"s{i}", name=f"s{i}", target_id=f"s{i}",
                              features=make_features(random_sequence(20, rng), 10, seed=i))
            for i in range(6)]
    events: list[str] = []

    class RecordingPool(cf.Executor):  # runs each job at once, noting when it came
        def submit(self, fn, /, *args, **kwargs):
            events.append("submit")
            future: cf.Future = cf.Future()
            future.set_result(fn(*args, **kwargs))
            return future

    with FoldWorker(root / "weights", replace(settings, compile_ahead=0, save_raw=False)) as worker:
        worker.pools = HostPools(feature_workers=4, write_workers=0)
        worker.pools._features = RecordingPool()
        launch_unit = worker._launch_unit

        def launch(*args):
            events.append("launch")
            return launch_unit(*args)

        worker._launch_unit = launch
        outcomes = worker.fold(sets, tmp_path / "out")
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert events.count("launch") == 6  # one member per unit on the CPU
    assert events[:events.index("launch")] == ["submit"] * 6, events
