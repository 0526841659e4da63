"""Serialized executables: a second process loads them without tracing and predicts the same;
a damaged or foreign file falls back to compiling; another config or environment never hits.

The real model in its tiny config with random weights, float32, on the CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parafold.fold.settings import ModelSettings  # noqa: E402

MODEL = "model_3_ptm"

# One lone shape (L=32) and one batched shape (2 members): both through the cache.
_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from parafold.fold.batching import batched_key, stack_members
    from parafold.fold.buckets import shape_key
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features
    from parafold.fold.runner import ModelRunner
    from parafold.fold.settings import ModelSettings
    from parafold.fold.synthetic import make_features, random_sequence
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    s = ModelSettings(config_size="tiny", models=(3,), num_recycle=1, float32=True,
                      executable_cache=True,
                      force_batch=True, max_batch=2, compile_cache_dir=root / "cache")
    runner = ModelRunner(s)
    params = jax.device_put(load_params(root / "weights", "model_3_ptm", s))
    rng = np.random.default_rng(5)
    raws = [make_features(random_sequence(n, rng), 9, seed=n) for n in (20, 27)]
    key = shape_key(27, 9, "model_3_ptm", s)
    feats = [process_features(r, runner.config("model_3_ptm", key), key, seed=i)
             for i, r in enumerate(raws)]
    lone, _ = runner.fetch(runner.launch("model_3_ptm", key, params, feats[0], 3))
    big = batched_key(key, 2)
    pair, _ = runner.fetch_batch(runner.launch_batch("model_3_ptm", big, params,
                                                     stack_members(feats, big), [3, 4]))
    arrays = {}
    for name, r in (("lone", lone), ("m0", pair[0]), ("m1", pair[1])):
        arrays[name + "_pos"] = r["structure_module"]["final_atom_positions"]
        arrays[name + "_plddt"] = r["plddt"]
        arrays[name + "_pae"] = r["predicted_aligned_error"]
    np.savez(out, **arrays)
    print("STATS" + json.dumps(runner.stats.as_dict()))
""")


_LONG_AGO = 1_000_000_000  # 2001


def _run(root: Path, out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(root), str(out)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STATS"))
    with np.load(out) as data:
        return json.loads(line[5:]), dict(data)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A first process that compiles both shapes and stores them, then a second one."""
    from parafold.fold.params import write_random_params

    root = tmp_path_factory.mktemp("exec")
    settings = ModelSettings(config_size="tiny", models=(3,), num_recycle=1, float32=True,
                             executable_cache=True, compile_cost_s=0.0,
                             compile_cache_dir=root / "cache")
    write_random_params(root / "weights", settings, seed=0)
    first = _run(root, root / "first.npz")
    files = sorted((root / "cache" / "executables").glob("*.bin"))
    for path in files:  # long unused: a load must mark them used (`fold.cache_budget`)
        os.utime(path, (_LONG_AGO, _LONG_AGO))
    second = _run(root, root / "second.npz")
    return root, settings, first, second, files


def test_second_process_loads_without_tracing(warm):
    _, _, (stats1, out1), (stats2, out2), files = warm
    assert stats1["executable_hits"] == 0 and stats1["traced"] == 2
    assert len(files) == 2  # lone and batched
    assert all(path.stat().st_mtime > _LONG_AGO + 1e8 for path in files)  # loads touch them
    assert stats2["compiles"] == 2 and stats2["executable_hits"] == 2
    assert stats2["traced"] == 0 and stats2["persistent_hits"] == 0
    assert stats2["predictions"] == 3 and stats2["batched_members"] == 2
    assert set(out1) == set(out2)
    for name in out1:
        assert out1[name].dtype == np.float32
        assert np.abs(out1[name] - out2[name]).max() <= 1e-6, name
    # the batch's members differ from each other: the outputs are not trivially equal
    assert not np.allclose(out1["m0_plddt"], out1["m1_plddt"])


def _lone_runner_predicts(root: Path, settings: ModelSettings):
    import jax

    from parafold.fold.buckets import shape_key
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features
    from parafold.fold.runner import ModelRunner
    from parafold.fold.synthetic import make_features, random_sequence

    runner = ModelRunner(settings)
    params = jax.device_put(load_params(root / "weights", MODEL, settings))
    key = shape_key(27, 9, MODEL, settings)
    raw = make_features(random_sequence(20, np.random.default_rng(5)), 9, seed=20)
    feats = process_features(raw, runner.config(MODEL, key), key, seed=0)
    result, _ = runner.fetch(runner.launch(MODEL, key, params, feats, 3))
    return runner, result


def test_damaged_file_falls_back_and_is_removed(warm):
    root, settings, (_, out1), _, files = warm
    # the lone executable is the smaller file (the batched one carries a member axis)
    lone = min(files, key=lambda p: p.stat().st_size)
    intact = lone.read_bytes()
    lone.write_bytes(intact[: len(intact) // 2])
    runner, result = _lone_runner_predicts(root, settings)
    assert runner.stats.executable_hits == 0 and runner.stats.traced == 1
    np.testing.assert_allclose(result["plddt"], out1["lone_plddt"], atol=1e-6)
    # removed, not re-stored: a persistent-cache hit re-serializes broken on XLA:CPU
    assert runner.stats.persistent_hits == 1 and not lone.exists()
    lone.write_bytes(intact)  # restore for the tests after this one


def test_a_file_this_process_cannot_load_stays_for_the_others(warm, monkeypatch):
    """An intact executable that fails to load here (out of host memory, a device busy with
    another job) is this process's trouble: it compiles, and the shared file stays."""
    import jax.experimental.serialize_executable as serialize

    root, settings, (_, out1), _, files = warm
    lone = min(files, key=lambda p: p.stat().st_size)

    def refuse(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory loading the executable")

    monkeypatch.setattr(serialize, "deserialize_and_load", refuse)
    runner, result = _lone_runner_predicts(root, settings)
    assert runner.stats.executable_hits == 0 and runner.stats.traced == 1
    np.testing.assert_allclose(result["plddt"], out1["lone_plddt"], atol=1e-6)
    assert lone.exists()


def test_other_config_does_not_hit(warm):
    root, settings, *_ = warm
    runner, result = _lone_runner_predicts(root, replace(settings, float32=False))
    assert runner.stats.executable_hits == 0 and runner.stats.traced == 1
    assert np.isfinite(result["plddt"]).all()


def test_key_covers_config_and_environment(tmp_path):
    import jax

    from parafold.fold.buckets import shape_key
    from parafold.fold.exec_cache import ExecutableCache
    from parafold.fold.runner import forward_transform

    settings = ModelSettings(config_size="tiny", models=(3,), float32=True, compile_cache_dir=None)
    key = shape_key(27, 9, MODEL, settings)
    abstract = (jax.ShapeDtypeStruct((4, 8), np.float32), {"aatype": np.zeros(32, np.int32)})

    def fingerprint(s: ModelSettings, *, low_memory: bool = False,
                    pallas: dict | None = None) -> str:
        return forward_transform(MODEL, s, low_memory=low_memory, key=key,
                                 pallas=pallas)[1].model.to_json()

    cache = ExecutableCache(tmp_path)
    base = cache.key(key, fingerprint(settings), abstract)
    assert base == cache.key(key, fingerprint(settings), abstract)
    other_inputs = (abstract[0], {"aatype": np.zeros(33, np.int32)})
    variants = {
        cache.key(key, fingerprint(replace(settings, float32=False)), abstract),
        cache.key(key, fingerprint(settings, low_memory=True), abstract),  # subbatch
        cache.key(key, fingerprint(settings, pallas={"use_pallas": True}), abstract),
        cache.key(replace(key, batch=2), fingerprint(settings), abstract),
        cache.key(key, fingerprint(settings), other_inputs),
    }
    assert len(variants) == 5 and base not in variants
    assert cache._env is not None
    cache._env = {**cache._env, "jaxlib": "0.0.0"}
    assert cache.key(key, fingerprint(settings), abstract) != base
    cache._env = {**cache._env, "device_kind": "another"}
    assert cache.key(key, fingerprint(settings), abstract) != base
    # every library an executable depends on, traced or called by name, is in the key
    from importlib import metadata

    from parafold.fold import exec_cache

    real_version = metadata.version
    for upgraded in ("dm-haiku", "colabfold-cuda-kernels", "colabfold-legacy-kernels",
                     "alphafold-colabfold", "colabfold-kernels"):
        def version(name: str, upgraded: str = upgraded) -> str:
            return "999.0" if name == upgraded else real_version(name)

        metadata.version = version
        try:
            env = exec_cache.environment()
        finally:
            metadata.version = real_version
        assert "999.0" in env.values(), upgraded


_CALLED: list[str] = []


def _payload_ran() -> None:
    _CALLED.append("ran")


class _Evil:
    def __reduce__(self):
        return (_payload_ran, ())


def test_foreign_pickle_is_refused_before_jax_loads_it(tmp_path):
    """A file with a valid header whose payload names a non-JAX callable: refused, not run."""
    import hashlib

    import jax

    from parafold.fold import exec_cache
    from parafold.fold.exec_cache import ExecutableCache, encode_tree

    cache = ExecutableCache(tmp_path)
    payload = pickle.dumps(_Evil())
    tree = jax.tree_util.tree_structure(({"a": 1}, {}))
    header = {"key": "k", "describe": "", "out_tree": encode_tree(tree),
              "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    cache.path("k").write_bytes(exec_cache._MAGIC + json.dumps(header).encode() + b"\n"
                                + payload)
    assert cache.load("k", tree) is None
    assert _CALLED == []
    # garbage, an empty file and a missing one: None as well
    cache.path("g").write_bytes(b"\x00garbage")
    cache.path("e").write_bytes(b"")
    assert cache.load("g", tree) is None and cache.load("e", tree) is None
    assert cache.load("missing", tree) is None
