"""GPU-stage pieces that need no compile: buckets, settings, params files, pickles, OOM."""

from __future__ import annotations

import functools
import os
from dataclasses import replace

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parafold.errors import InputError, ParamsError  # noqa: E402
from parafold.featureset import read_feature_set, write_feature_set  # noqa: E402
from parafold.fold import buckets  # noqa: E402
from parafold.fold.settings import ModelSettings, parse_model_numbers  # noqa: E402


def test_length_buckets_bound_waste_and_count():
    s = ModelSettings()
    for length in range(s.min_length_bucket, 1500):
        bucket = buckets.length_bucket(length, s)
        assert bucket >= length
        assert buckets.padding_waste(length, bucket) <= s.max_length_waste + 1e-9
    shapes = {buckets.length_bucket(n, s) for n in range(50, 301)}
    assert len(shapes) <= 14


def test_groups_join_a_bigger_shape_when_its_extra_work_costs_less_than_a_compile():
    from collections import Counter

    s = ModelSettings()
    key = functools.partial(buckets.shape_key, model_name="model_1_ptm", settings=s)
    shallow, deep = key(120, 100), key(120, 400)
    far = key(200, 100)
    assert shallow.clusters < deep.clusters and shallow.length == deep.length

    def run_s(k: buckets.ShapeKey) -> float:  # seconds per target: grows with L^2 and depth
        return 0.1 * (k.length / 100) ** 2 * (1 + k.clusters / 128 + k.extra / 1024)

    step = run_s(deep) - run_s(shallow)  # ~0.43 s a target
    merge = functools.partial(buckets.merge_groups, compile_s=27.0, run_s=run_s)
    counts = Counter({shallow: 3, deep: 5, far: 2})
    assert merge(counts) == {shallow: deep, deep: deep, far: far}
    # a group whose extra work outweighs a compile keeps its own, cheaper shape; 0 turns it off
    big = int(27.0 / step) + 1
    assert merge(Counter({shallow: big, deep: 5}))[shallow] == shallow
    assert merge(Counter({shallow: big - 1, deep: 5}))[shallow] == deep
    assert buckets.merge_groups(counts, compile_s=0.0, run_s=run_s)[shallow] == shallow
    # a group that grew by a merge moves on, and only into a shape at least as deep in both
    # MSA parts: every target ends in the one deepest shape
    deepest = replace(deep, extra=deep.extra * 4)
    assert set(merge(Counter({shallow: 2, deep: 2, deepest: 1})).values()) == {deepest}
    # ... but only while the grown group still pays for the step (its own targets and those
    # that joined it): `alone` targets would move on by themselves, not with `joined` more
    onward = run_s(deepest) - run_s(deep)
    alone, joined = int(27.0 / onward) - 1, int(27.0 / step) - 1
    assert (alone + joined) * onward > 27.0
    assert merge(Counter({deep: alone, deepest: 1}))[deep] == deepest
    grown = merge(Counter({shallow: joined, deep: alone, deepest: 1}))
    assert grown[shallow] == deep and grown[deep] == deep
    crossed = replace(shallow, extra=deep.extra * 4)  # more extra rows, fewer clusters
    wider = Counter({deep: 1, crossed: 1})  # neither holds the other: both stay
    assert merge(wider) == {deep: deep, crossed: crossed}
    # longer buckets: only while the group's shortest target stays within the padding bound
    longer = replace(deep, length=136)
    pair = Counter({deep: 4, longer: 9})
    assert merge(pair, shortest={deep: 105}, max_waste=0.3)[deep] == longer
    assert merge(pair, shortest={deep: 90}, max_waste=0.3)[deep] == deep
    assert merge(pair, shortest={deep: 105})[deep] == deep  # bound 0
    # the bound holds for every target that moves along a chain (the 90 stops at 120)
    chain = Counter({key(100, 400): 2, deep: 2, longer: 1})
    short = {key(100, 400): 90, deep: 118}
    dest = merge(chain, shortest=short, max_waste=0.3)
    assert dest[key(100, 400)] == deep and dest[deep] == deep
    assert buckets.padding_waste(90, deep.length) <= 0.3 < buckets.padding_waste(90, 136)
    # of several shapes that hold a group, the one with the least extra work (here the longer
    # one: a few more residues cost less than four times the MSA clusters)
    wide = replace(shallow, length=136)
    assert run_s(wide) - run_s(shallow) < step
    both = Counter({shallow: 1, deep: 1, wide: 1})
    assert merge(both, shortest={shallow: 118}, max_waste=0.3)[shallow] == wide
    # shapes run by an earlier call count too, and a compiled shape never moves
    assert merge(Counter({shallow: 1}), available=[deep]) == {shallow: deep}
    assert merge(Counter({shallow: 1, deep: 1}), available=[shallow]) == {
        shallow: shallow, deep: deep}


def test_depth_buckets_follow_alphafold_split():
    s = ModelSettings()
    shallow = buckets.shape_key(100, 40, "model_3_ptm", s)
    deep = buckets.shape_key(100, 3000, "model_3_ptm", s)
    capped = buckets.shape_key(100, 3000, "model_5_ptm", s)
    assert (shallow.clusters, shallow.extra) == (128, 80)
    assert (deep.clusters, deep.extra) == (512, 5120)
    assert capped.extra == 1024  # model_5 takes at most 1,024 extra rows
    assert buckets.shape_key(100, 40, "model_1_ptm", s).templates == 4
    unbucketed = ModelSettings(msa_depth_buckets=False)
    assert buckets.shape_key(100, 40, "model_3_ptm", unbucketed).extra == 5120
    # models of one family share keys, the two families never do
    assert shallow == buckets.shape_key(100, 40, "model_4_ptm", s)
    assert shallow != buckets.shape_key(100, 40, "model_2_ptm", s)


@pytest.mark.parametrize("config_size", ["full", "tiny"])
def test_targets_without_templates_share_one_shape_across_all_five_models(config_size):
    """ColabFold's trick for template-free runs, kept exact: models 1-2 drop the template
    stack (same result, `test_fold_model`), and every model buckets on one ladder, so a
    shallow MSA needs one compile for five models (it needed four: two families, two
    extra-MSA caps), and two with templates."""
    s = ModelSettings(config_size=config_size)
    names = [f"model_{n}_ptm" for n in range(1, 6)]
    for rows in (5, 40, 200, 600):
        free = {buckets.shape_key(100, rows, name, s, templates=False) for name in names}
        assert len(free) == 1 and free.pop().family == "no_templates", rows
        found = {name: buckets.shape_key(100, rows, name, s) for name in names}
        assert len(set(found.values())) == 2, rows
        assert found["model_1_ptm"] == found["model_2_ptm"] != found["model_3_ptm"]
        assert found["model_3_ptm"] == buckets.shape_key(100, rows, "model_1_ptm", s,
                                                         templates=False)
    # without buckets, as AlphaFold pads: model 1's 508 rows go in model 3's 512
    flat = ModelSettings(config_size=config_size, msa_depth_buckets=False)
    assert (buckets.shape_key(100, 40, "model_1_ptm", flat, templates=False)
            == buckets.shape_key(100, 40, "model_3_ptm", flat))
    if config_size == "full":  # a deep MSA: models 2 and 5 take 1,024 extra rows, not 5,120
        deep = {name: buckets.shape_key(100, 3000, name, s, templates=False) for name in names}
        assert deep["model_2_ptm"] == deep["model_5_ptm"] != deep["model_1_ptm"]
        assert deep["model_2_ptm"].extra == 1024 and deep["model_1_ptm"].extra == 5120


def test_targets_without_templates_join_a_template_shape_that_runs_anyway():
    """With template models only (here model 1), a group without templates runs in the
    template shape of its size (templates masked, as AlphaFold runs it) when that shape runs
    anyway and its extra work costs less than a compile; a group with templates never runs
    in a no-template shape."""
    s = ModelSettings(models=(1,))
    model = s.model_names[0]
    found = buckets.shape_key(100, 40, model, s)
    free = buckets.shape_key(100, 40, model, s, templates=False)
    alt = buckets.alternative_key(100, 40, model, s, templates=False)
    assert alt == found and free.family == "no_templates"
    assert buckets.alternative_key(100, 40, model, s, templates=True) is None
    assert buckets.alternative_key(100, 40, "model_3_ptm", s, templates=False) is None

    def run_s(k: buckets.ShapeKey) -> float:
        return 0.1 * (k.length / 100) ** 2 * (1 + (k.clusters + k.templates) / 128)

    merge = functools.partial(buckets.merge_targets, compile_s=27.0, run_s=run_s)
    dest = merge([found, free, free], [100, 100, 99], alternatives=[None, alt, alt])
    assert dest == {found: found, free: found}
    assert merge([found, free], [100, 100])[free] == free  # no alternative: stays
    assert merge([found, free], [100, 100], alternatives=[None, alt],
                 compile_s=0.0)[free] == free
    # a group of targets with templates never moves into a no-template shape
    deeper_free = buckets.shape_key(100, 400, model, s, templates=False)
    assert merge([found, deeper_free], [100, 100], alternatives=[None, None])[found] == found
    # a key's alternative holds all of its targets: 31 and 32 rows share no-template rung 32,
    # but 32 rows need template rung 127, so that group cannot join the 31-row template shape
    low = buckets.shape_key(100, 31, model, s)
    shallow_free = buckets.shape_key(100, 31, model, s, templates=False)
    assert shallow_free == buckets.shape_key(100, 32, model, s, templates=False)
    alts = [buckets.alternative_key(100, rows, model, s, templates=False) for rows in (31, 32)]
    assert [(a.clusters, low.clusters) for a in alts] == [(31, 31), (127, 31)]
    both = merge([low, shallow_free, shallow_free], [100] * 3, alternatives=[None, *alts[::-1]])
    assert both[shallow_free] == shallow_free
    one = merge([low, shallow_free], [100, 100], alternatives=[None, alts[0]])
    assert one[shallow_free] == low


def test_a_worker_runs_a_target_without_templates_in_its_groups_template_shape(tmp_path):
    """Model 1 only, one target with templates and one without, of one size: one group, one
    template shape (nothing more to compile); alone, the one without runs without them."""
    from parafold.featureset import FeatureSet
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(config_size="tiny", models=(1,), compile_cache_dir=None)

    def target(name: str, templates: int) -> FeatureSet:
        return FeatureSet(name=name, target_id=name, sequence="A" * 40, path=tmp_path / name,
                          msa_depth=10, num_templates=templates)

    found, free = target("found", 4), target("free", 0)
    with FoldWorker(tmp_path / "weights", settings) as worker:
        worker.group([found, free])  # (a group a target: batches of one on the CPU)
        assert worker.shape_key(free) == worker.shape_key(found)
        assert worker.shape_key(free).family == "templates"
        worker.group([free])
        assert worker.shape_key(free).family == "no_templates"


def test_a_merged_target_keeps_its_templates_when_the_first_model_takes_none(tmp_path):
    """--models 3,1: model 3's shapes hold targets with and without templates; a target with
    templates merged into a deeper shape of its length still runs model 1 with them."""
    from parafold.featureset import FeatureSet
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(config_size="tiny", models=(3, 1), compile_cache_dir=None)

    def target(name: str, rows: int, templates: int) -> FeatureSet:
        return FeatureSet(name=name, target_id=name, sequence="A" * 40, path=tmp_path / name,
                          msa_depth=rows, num_templates=templates)

    shallow = target("shallow", 2, 4)
    deep = [target(f"deep{i}", 30, 4 * (i % 2)) for i in range(3)]
    with FoldWorker(tmp_path / "weights", settings) as worker:
        worker.group([shallow, *deep])
        merged = worker.shape_key(shallow)
        assert merged == worker.shape_key(deep[0]) and merged.family == "no_templates"
        model_1 = worker.shape_key(shallow, "model_1_ptm")
        assert model_1.family == "templates" and model_1.templates > 0
        assert model_1.clusters >= worker.shape_key(deep[1], "model_1_ptm").clusters
        assert worker.shape_key(deep[0], "model_1_ptm").family == "no_templates"


def test_the_compilation_cache_folder_is_held_to_its_bound_least_recently_used_first(tmp_path):
    """JAX's entries and serialized executables, by last use (access or modification time):
    over the bound, the oldest go until 80% of it is left; other files stay; a fold worker
    prunes its folder when it starts."""
    from parafold.fold.cache_budget import prune_compile_cache
    from parafold.fold.runner import ModelRunner

    folder = tmp_path / "jax"
    (folder / "executables").mkdir(parents=True)
    names = ["jit_step-a-cache", "executables/b.bin", "jit_step-c-cache", "executables/d.bin",
             "jit_step-e-cache"]  # least recently used first
    for age, name in enumerate(reversed(names)):
        path = folder / name
        path.write_bytes(b"x" * 1000)
        os.utime(path, (2e9 - age * 3600, 1e9))  # used an hour apart, written long ago
    (folder / ".lockfile").write_bytes(b"y" * 5000)  # not an entry: never counted or removed
    killed = folder / "executables" / ".f.bin.0123.part"  # a killed worker's half-written file
    killed.write_bytes(b"z" * 9000)
    os.utime(killed, (2e9, 1e9))
    live = folder / "executables" / ".g.bin.4567.part"  # one being written now
    live.write_bytes(b"z" * 10)
    assert prune_compile_cache(folder, 5000) == 0
    assert not killed.exists() and live.exists()
    live.unlink()
    assert prune_compile_cache(folder, None) == 0
    assert prune_compile_cache(folder, 4000) == 2000  # 5000 > 4000: down to 3200
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        ".lockfile", "d.bin", "jit_step-c-cache", "jit_step-e-cache"]
    settings = ModelSettings(config_size="tiny", models=(3,), compile_cache_dir=folder,
                             compile_cache_max_bytes=2500)
    ModelRunner(settings)
    assert sorted(p.name for p in folder.rglob("*-cache")) == ["jit_step-e-cache"]
    assert (folder / ".lockfile").is_file()
    with pytest.raises(InputError, match="bound"):
        ModelSettings(compile_cache_max_bytes=0)


def test_a_compilation_cache_folder_that_cannot_be_made_is_skipped_with_a_warning(tmp_path,
                                                                                 caplog):
    """A read-only home on compute nodes, another user's folder: the worker compiles without
    the persistent cache instead of failing."""
    import jax

    from parafold.fold.runner import enable_persistent_cache

    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache's parent folder should be")
    before = jax.config.jax_compilation_cache_dir
    enable_persistent_cache(blocker / ".cache" / "jax", 10**9)
    assert jax.config.jax_compilation_cache_dir == before
    assert "cannot be used" in caplog.text and "compiling without it" in caplog.text


def test_settings_validation():
    assert ModelSettings(models=(1, 3)).model_names == ("model_1_ptm", "model_3_ptm")
    assert ModelSettings(model_preset="monomer", models=(2,)).model_names == ("model_2",)
    assert parse_model_numbers("1,2,3") == (1, 2, 3)
    for bad in ("0", "1,1", "x", "6"):
        with pytest.raises(InputError):
            parse_model_numbers(bad)
    with pytest.raises(InputError):
        ModelSettings(config_size="huge")
    with pytest.raises(InputError):
        ModelSettings(model_preset="multimer")
    for tolerance in (-0.5, float("nan"), float("inf")):  # NaN turned early stopping off
        with pytest.raises(InputError, match="tolerance"):
            ModelSettings(recycle_early_stop_tolerance=tolerance)


def test_params_errors_name_the_file(tmp_path):
    from parafold.fold.params import load_params, params_path, write_random_params

    tiny = ModelSettings(config_size="tiny", models=(3,), compile_cache_dir=None)
    with pytest.raises(ParamsError, match="params_model_3_ptm.npz: missing"):
        load_params(tmp_path, "model_3_ptm", tiny)
    path = params_path(tmp_path, "model_3_ptm")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip")
    with pytest.raises(ParamsError, match="params_model_3_ptm.npz: malformed"):
        load_params(tmp_path, "model_3_ptm", tiny)

    write_random_params(tmp_path, tiny, seed=1)
    params = load_params(tmp_path, "model_3_ptm", tiny)
    # every tensor drawn: nothing constant, nothing all-zero
    for scope, leaves in params.items():
        for name, value in leaves.items():
            assert np.std(value) > 1e-4, f"{scope}//{name} is constant"
    # the release layout: triangle multiplications split into left/right projections
    with np.load(path) as data:
        assert any("left_projection" in key for key in data.files)
    full = ModelSettings(config_size="full", models=(3,), compile_cache_dir=None)
    with pytest.raises(ParamsError, match=r"params_model_3_ptm.npz: does not fit.*shape.*"
                                          r"need --config tiny"):
        load_params(tmp_path, "model_3_ptm", full)
    # a triangle multiplication's half missing: named, not a KeyError from the fuse step
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    half = next(k for k in arrays if "left_gate" in k and k.endswith("//weights"))
    del arrays[half]
    np.savez(path, **arrays)
    with pytest.raises(ParamsError, match=r"params_model_3_ptm.npz: does not fit"):
        load_params(tmp_path, "model_3_ptm", tiny)
    with pytest.raises(ParamsError, match="seed"):
        write_random_params(tmp_path / "other", tiny, seed=-1)


def test_pickles_need_trust(tmp_path):
    from parafold.fold.synthetic import make_features

    feats = make_features("ACDEFGHIKLMNPQRSTVWY", 5)
    write_feature_set(tmp_path / "a", name="a", target_id="a", features=feats, write_pickle=True)
    (tmp_path / "a" / "features.json").unlink()
    (tmp_path / "a" / "features.npz").unlink()
    with pytest.raises(InputError, match="--trust-pickles"):
        read_feature_set(tmp_path / "a")
    fs = read_feature_set(tmp_path / "a", trust_pickles=True)
    assert fs.from_pickle and fs.length == 20
    # trusted but cut short, or not a feature dict: that folder's error, named
    pickled = (tmp_path / "a" / "features.pkl").read_bytes()
    (tmp_path / "a" / "features.pkl").write_bytes(pickled[: len(pickled) // 2])
    with pytest.raises(InputError, match="features.pkl: unreadable pickle"):
        read_feature_set(tmp_path / "a", trust_pickles=True)
    (tmp_path / "a" / "features.pkl").write_bytes(__import__("pickle").dumps([1, 2]))
    with pytest.raises(InputError, match="holds a list"):
        read_feature_set(tmp_path / "a", trust_pickles=True)


def test_a_missing_params_file_says_the_usual_mix_up(tmp_path):
    """--params-dir given params/ itself, or params of the other preset: the error says so."""
    from parafold.fold.params import check_params_files, load_params, params_path

    tiny = ModelSettings(config_size="tiny", models=(3,), compile_cache_dir=None)
    path = params_path(tmp_path, "model_3_ptm")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK")
    with pytest.raises(ParamsError, match=r"in .*params itself: give --params-dir the folder "
                                          r"that holds params/"):
        load_params(tmp_path / "params", "model_3_ptm", tiny)
    with pytest.raises(ParamsError, match=r"params_model_3_ptm.npz is there: --model-preset "
                                          r"monomer_ptm uses it"):
        check_params_files(tmp_path, ["model_3"])
    path.rename(path.with_name("params_model_3.npz"))
    with pytest.raises(ParamsError, match=r"params_model_3.npz is there: --model-preset monomer "):
        check_params_files(tmp_path, ["model_3_ptm"])
    with pytest.raises(ParamsError, match=r"params_model_4_ptm.npz: missing \(expected"):
        load_params(tmp_path, "model_4_ptm", tiny)


def test_written_pickle_loads_under_numpy_one(tmp_path):
    """AlphaFold 2.3 runs on numpy 1.21-1.24, which cannot load numpy 2's own pickles (they
    name `numpy._core`): ours name only globals numpy 1 has, and load back equal, writeable."""
    import io
    import pickle

    from parafold.fold.synthetic import make_features

    feats = make_features("ACDEFGHIKLMNPQRSTVWY", 5, num_templates=2)
    feats["a_scalar"] = np.float32(1.5)
    feats["a_0d_array"] = np.array(7, np.int32)
    feats["empty_objects"] = np.empty((0, 4), object)
    write_feature_set(tmp_path / "a", name="a", target_id="a", features=feats,
                      write_pickle=True)
    data = (tmp_path / "a" / "features.pkl").read_bytes()
    names: set[str] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            names.add(f"{module}.{name}")
            return super().find_class(module, name)

    loaded = Recording(io.BytesIO(data)).load()
    assert names <= {"numpy.ndarray", "numpy.array", "numpy.empty", "builtins.bytearray"}, names
    assert sorted(loaded) == sorted(feats)
    for name, value in feats.items():
        got = loaded[name]
        assert got.dtype == np.asarray(value).dtype and got.flags.writeable, name
        assert got.shape == np.shape(value), name
        if got.dtype.hasobject:
            assert got.tolist() == value.tolist(), name
        else:
            np.testing.assert_array_equal(got, value, err_msg=name)


def test_features_alphafold_cannot_take_fail_their_target():
    """A foreign feature dict whose shapes AlphaFold's input pipeline asserts on (here
    num_alignments a scalar, not one per residue): a FeatureError, its target's own, not an
    AssertionError that ended the whole process."""
    from parafold.errors import FeatureError
    from parafold.fold.buckets import shape_key
    from parafold.fold.processing import process_features
    from parafold.fold.runner import forward_transform
    from parafold.fold.synthetic import make_features

    settings = ModelSettings(config_size="tiny", models=(3,), compile_cache_dir=None)
    raw = make_features("ACDEFGHIKLMNPQRSTVWY", 5)
    raw["num_alignments"] = np.array(5, np.int32)
    key = shape_key(20, 5, "model_3_ptm", settings, templates=False)
    _, cfg = forward_transform("model_3_ptm", settings, low_memory=False, key=key)
    with pytest.raises(FeatureError, match="input pipeline"):
        process_features(raw, cfg, key, seed=0)


def test_oom_recognised_only_from_xla_words():
    from parafold.fold.runner import is_out_of_memory

    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert not is_out_of_memory(RuntimeError("INVALID_ARGUMENT: shapes differ"))


def test_device_errors_name_the_shape_only_for_out_of_memory():
    from parafold.errors import GpuOutOfMemoryError
    from parafold.fold.buckets import ShapeKey
    from parafold.fold.runner import _oom_as_error

    key = ShapeKey("no_templates", 64, 32, 64, 0)
    with pytest.raises(GpuOutOfMemoryError, match="out of memory compiling .*64"), \
            _oom_as_error(key, "compiling"):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    with pytest.raises(RuntimeError, match="shapes differ"), _oom_as_error(key, "predicting"):
        raise RuntimeError("INVALID_ARGUMENT: shapes differ")


def test_low_memory_retry_failure_stays_with_its_target(tmp_path):
    """A non-OOM error in the low-memory retry fails that target, not the whole `fold` call."""
    from collections import Counter
    from dataclasses import replace
    from types import SimpleNamespace

    from parafold.errors import GpuOutOfMemoryError
    from parafold.featureset import FeatureSet
    from parafold.fold.buckets import ShapeKey
    from parafold.fold.worker import FoldWorker, _Pass, _Run, _TargetState, _Unit

    def launch(*_args):
        raise RuntimeError("low-memory config failed to compile")

    worker = FoldWorker.__new__(FoldWorker)  # no runner, params or pools: a fake runner below
    worker.runner = SimpleNamespace(low_memory_key=lambda k: replace(k, low_memory=True),
                                    stats=SimpleNamespace(compile_s=0.0), launch=launch)
    worker._params = {"model_1": {}}
    worker._loop_s = Counter()
    fs = FeatureSet(name="t", target_id="t", sequence="A" * 20, path=tmp_path / "t",
                    msa_depth=4, num_templates=0)
    key = ShapeKey("no_templates", 32, 4, 1, 0)
    unit = _Unit(key, _Run("model_1", "model_1", 0), (fs,))
    ctx = _Pass(tmp_path, {"t": _TargetState(fs, 1)}, {})
    worker._out_of_memory(unit, key, [fs], [{}], GpuOutOfMemoryError("oom"), ctx)
    outcome = ctx.outcomes["t"]
    assert not outcome.ok and "failed to compile" in (outcome.error or "")


def test_host_pool_replaces_a_killed_helper():
    """A helper killed mid-job (each time it runs: the OOM killer on a huge target) fails that
    job only: the jobs queued behind it, which its death broke too, run in fresh helpers, as
    do later jobs."""
    from concurrent.futures.process import BrokenProcessPool

    from parafold.fold.hostwork import HostPools

    pools = HostPools(feature_workers=1, write_workers=0)
    try:
        before = [pools.features().submit(abs, -i) for i in range(2)]
        killer = pools.features().submit(os._exit, 1)
        behind = [pools.features().submit(abs, -i) for i in range(4)]
        with pytest.raises(BrokenProcessPool):
            killer.result(timeout=120)
        assert [f.result(timeout=120) for f in before + behind] == [0, 1, 0, 1, 2, 3]
        assert pools.features().submit(os.getpid).result(timeout=120) > 0
    finally:
        pools.close()


def _prediction(model: str, plddt: float, n: int = 6):
    from parafold.fold.outputs import Prediction

    rng = np.random.default_rng(0)
    mask = np.zeros((n, 37), np.float32)
    mask[:, :3] = 1.0  # N, CA, C
    result = {"plddt": np.full(n, plddt), "ptm": np.float32(0.5),
              "predicted_aligned_error": np.ones((n, n)),
              "max_predicted_aligned_error": np.float32(31.75),
              "structure_module": {"final_atom_positions": rng.normal(size=(n, 37, 3)) * 5,
                                   "final_atom_mask": mask}}
    return Prediction(name=model, model_name=model, seed=0, result=result,
                      aatype=np.zeros(n, np.int32), residue_index=np.arange(n), timings={})


def test_repredicting_with_fewer_models_removes_stale_files(tmp_path, monkeypatch):
    import parafold.fold.outputs as outputs

    folder = tmp_path / "t"
    three = [_prediction(f"model_{i}_ptm", 50.0 + i) for i in (1, 2, 3)]
    outputs.write_target_outputs(folder, "t", three, {"predict": 1.0}, save_raw=True)
    assert (folder / "ranked_2.cif").is_file() and (folder / "result_model_1_ptm.pkl").is_file()
    (folder / "features.json").write_text("{}")  # other files in the folder are not ours
    (folder / "msas").mkdir()
    # predicted again (other settings): a write that stops on the way (a full disk, a kill)
    # leaves no done marker naming the old models, whose files it has removed
    real_copy = outputs.atomic_write_text

    def full_disk(path, text):
        if path.name == "ranked_0.cif":
            raise OSError(28, "No space left on device")
        real_copy(path, text)

    monkeypatch.setattr(outputs, "atomic_write_text", full_disk)
    with pytest.raises(OSError):
        outputs.write_target_outputs(folder, "t", [_prediction("model_2_ptm", 60.0)],
                                     {"predict": 1.0}, save_raw=False)
    assert not outputs.is_complete(folder)
    monkeypatch.setattr(outputs, "atomic_write_text", real_copy)

    seen: list[str] = []
    real_write_json = outputs.atomic_write_json

    def write_json(path, obj):
        if path.name == outputs.DONE_FILE:  # the stale files are gone before the done marker
            seen.extend(sorted(p.name for p in folder.iterdir()))
        real_write_json(path, obj)

    monkeypatch.setattr(outputs, "atomic_write_json", write_json)
    outputs.write_target_outputs(folder, "t", [_prediction("model_2_ptm", 60.0)],
                                 {"predict": 1.0}, save_raw=False)
    expected = ["features.json", "msas", "pae_model_2_ptm.json", "ranked_0.cif", "ranked_0.pdb",
                "scores_model_2_ptm.json", "timings.json", "unrelaxed_model_2_ptm.pdb"]
    assert seen == expected
    assert sorted(p.name for p in folder.iterdir()) == sorted([*expected, outputs.DONE_FILE])


def test_a_folder_missing_a_ranked_file_is_not_complete(tmp_path):
    """A scratch purge or a clean-up that took some of a target's files: its done marker
    alone no longer makes it done, so a rerun predicts it again."""
    import shutil

    from parafold.fold.outputs import DONE_FILE, is_complete, write_target_outputs

    preds = [_prediction("model_1_ptm", 50.0), _prediction("model_2_ptm", 60.0)]
    write_target_outputs(tmp_path / "t", "t", preds, {}, save_raw=False, fingerprint="f")
    assert is_complete(tmp_path / "t") and is_complete(tmp_path / "t", "f")
    for name in ("ranked_1.cif", "ranked_0.pdb", "unrelaxed_model_1_ptm.pdb",
                 "scores_model_2_ptm.json"):
        shutil.copytree(tmp_path / "t", tmp_path / name)
        (tmp_path / name / name).unlink()
        assert not is_complete(tmp_path / name), name
    (tmp_path / "t" / "pae_model_1_ptm.json").unlink()  # not what "done" rests on
    assert is_complete(tmp_path / "t")
    (tmp_path / "t" / DONE_FILE).write_text("not json")
    assert not is_complete(tmp_path / "t")
    assert not is_complete(tmp_path / "missing")


def test_a_model_whose_confidence_is_not_a_number_ranks_last(tmp_path):
    """A numerical blow-up in one model: ranked_0 is still the best finite one, and
    ranking_debug.json stays JSON (null, not NaN)."""
    import json

    from parafold.fold.outputs import write_target_outputs

    preds = [_prediction("model_1_ptm", 50.0), _prediction("model_2_ptm", float("nan")),
             _prediction("model_3_ptm", 80.0), _prediction("model_4_ptm", 60.0)]
    order = write_target_outputs(tmp_path / "t", "t", preds, {}, save_raw=False)
    assert order == ["model_3_ptm", "model_4_ptm", "model_1_ptm", "model_2_ptm"]
    ranking = json.loads((tmp_path / "t" / "ranking_debug.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in ranking_debug.json"))
    assert ranking["order"] == order and ranking["plddts"]["model_2_ptm"] is None


def test_scores_and_pae_files_stay_json_where_a_value_is_not_a_number(tmp_path):
    """A NaN in one residue's pLDDT, one PAE cell, pTM and max PAE: `scores_*.json` and
    `pae_*.json` write null there (jq and browsers refuse NaN), the other values as numbers."""
    import json

    from parafold.fold.outputs import write_target_outputs

    pred = _prediction("model_1_ptm", 70.0)
    pred.result["plddt"][2] = np.nan
    pred.result["predicted_aligned_error"][1, 4] = np.inf
    pred.result["ptm"] = np.float32(np.nan)
    pred.result["max_predicted_aligned_error"] = np.float32(np.nan)
    write_target_outputs(tmp_path / "t", "t", [pred], {}, save_raw=False)

    def strict(name):
        return json.loads((tmp_path / "t" / name).read_text(),
                          parse_constant=lambda c: pytest.fail(f"{c} in {name}"))

    scores = strict("scores_model_1_ptm.json")
    assert scores["plddt"] == [70.0, 70.0, None, 70.0, 70.0, 70.0]
    assert scores["mean_plddt"] is None and scores["ptm"] is None and scores["max_pae"] is None
    pae = strict("pae_model_1_ptm.json")[0]
    assert pae["predicted_aligned_error"][1][4] is None
    assert pae["predicted_aligned_error"][1][3] == 1.0
    assert pae["max_predicted_aligned_error"] is None


def test_shape_costs_price_every_family_model_seed_and_iteration():
    from parafold.fold.costs import shape_costs
    from parafold.fold.workmodel import shape_flops

    one = ModelSettings(models=(1,), num_recycle=3)
    key = buckets.shape_key(100, 200, "model_1_ptm", one)
    gpu = shape_costs(one, "gpu")
    assert gpu.run_s(key) == pytest.approx(shape_flops(key, "full") * 4 / gpu.flops_per_s)
    assert gpu.run_s(replace(key, batch=8)) == gpu.run_s(key)  # per target
    assert gpu.run_s(replace(key, length=key.length + 16)) > gpu.run_s(key)
    every = shape_costs(ModelSettings(num_seeds=2), "gpu")  # 5 models, 2 seeds
    assert every.compile_s == gpu.compile_s  # an executable's
    assert every.run_s(key) == pytest.approx(10 * gpu.run_s(key))
    # a group's compiles: an executable for each distinct key of the five models (one for a
    # shallow MSA without templates; models 2 and 5 take fewer extra rows from a deep one)
    assert gpu.executables(key) == 1
    for rows, templates, executables in ((200, True, 2), (200, False, 1), (3000, True, 4),
                                         (3000, False, 2)):
        first = buckets.shape_key(100, rows, "model_1_ptm", every.settings, templates=templates)
        assert every.executables(first) == executables, (rows, templates)
        assert every.group_compile_s(first) == pytest.approx(executables * gpu.compile_s)
    assert shape_costs(replace(one, compile_cost_s=3.0), "gpu").compile_s == 3.0
    odd = replace(key, templates=2)  # shapes the work model was not fitted for: no guess
    deeper = replace(odd, clusters=odd.clusters * 4)
    assert gpu.run_s(odd) == float("inf") and buckets.holds(deeper, odd)
    assert buckets.merge_groups({odd: 1, deeper: 1}, compile_s=1e9, run_s=gpu.run_s) == {
        odd: odd, deeper: deeper}
    cpu = shape_costs(one, "cpu")
    assert cpu.run_s(key) > 100 * gpu.run_s(key)  # a CPU predicts far slower than a GPU
    # what that means on a GPU: a group of tens of targets moves one length rung up to save a
    # compile, a proteome-sized group keeps its own shape
    up = replace(key, length=buckets.length_bucket(key.length + 1, one))
    for targets, moves in ((50, True), (5000, False)):
        dest = buckets.merge_groups({key: targets, up: 50}, compile_s=gpu.compile_s,
                                    run_s=gpu.run_s, shortest={key: key.length},
                                    max_waste=one.merge_max_waste)
        assert (dest[key] == up) is moves


def test_features_are_submitted_far_enough_ahead_to_keep_every_helper_busy():
    from parafold.fold.worker import submit_horizon

    # inline processing (no helpers): the next two units, as before
    assert submit_horizon(0, 0, [32] * 10, 0, helpers=0) == 3
    assert submit_horizon(5, 3, [32] * 10, 0, helpers=0) == 8
    # big units already give 12 helpers their 2 jobs each
    assert submit_horizon(0, 0, [32] * 10, 0, helpers=12) == 3
    # units of 4 deep-MSA targets: past the lookahead until 24 jobs wait
    assert submit_horizon(0, 0, [4] * 10, 0, helpers=12) == 6
    # jobs already waiting count; never past the end, never back
    assert submit_horizon(2, 6, [4] * 10, waiting=16, helpers=12) == 8
    assert submit_horizon(8, 10, [4] * 10, waiting=8, helpers=12) == 10


def test_a_gpu_gets_all_cores_but_three_for_feature_helpers():
    from parafold.fold.hostwork import MAX_FEATURE_HELPERS, auto_workers, feature_helpers

    assert feature_helpers(16) == 13 and feature_helpers(4) == 1 and feature_helpers(1) == 1
    assert feature_helpers(128) == MAX_FEATURE_HELPERS
    assert feature_helpers(112 // 8) == 11  # a DGX H100's share per GPU
    assert auto_workers(None, "cpu", gpu_default=13) == 0  # inline on the CPU
    assert auto_workers(3, "gpu", gpu_default=13) == 3


def test_stacked_batch_inputs_are_contiguous_per_iteration():
    """Each iteration's batched array is dense (device_put sends it without a copy) and holds
    the members' arrays of that iteration, then the first member again in dummy slots."""
    from parafold.fold.batching import stack_members

    rng = np.random.default_rng(0)
    members = [{"aatype": rng.integers(0, 20, (3, 8)), "msa_feat": rng.random((3, 4, 8, 5))}
               for _ in range(2)]
    key = buckets.ShapeKey(family="no-templates", length=8, clusters=4, extra=1,
                           templates=0, batch=4)
    stacked = stack_members(members, key)
    assert len(stacked) == 3
    for r, inputs in enumerate(stacked):
        for name, value in inputs.items():
            assert value.flags.c_contiguous, (r, name)
            assert value.shape == (4,) + members[0][name].shape[1:]
            for slot, member in enumerate(members + members[:1] * 2):
                np.testing.assert_array_equal(value[slot], member[name][r])


def test_busy_meter_counts_time_before_a_stop_only():
    """A run stopped at a time limit is measured over the wall time up to the stop; launches
    in flight then still finish, and only their part before the stop is busy time (the
    fraction reached 1.4 counting all of it)."""
    import time

    from parafold.fold.hostwork import BusyMeter

    meter = BusyMeter()
    now = time.perf_counter()
    meter.watch(now - 6.0, np.zeros(1))  # ready about now: busy from now - 6
    meter.watch(now - 8.0, np.zeros(1))  # queued behind it: counts from its ready time
    total = meter.busy_s()
    assert 6.0 <= total < 6.5
    assert meter.busy_s(until=now - 2.0) == pytest.approx(4.0, abs=1e-6)
    assert meter.busy_s(until=now - 10.0) == 0.0


def test_fused_kernels_on_for_a_gpu_off_for_the_cpu_and_forced_by_the_flag(monkeypatch, caplog):
    """Auto: the kernels' own dispatch on a GPU, off on the CPU; --fused-kernels and
    --no-fused-kernels force either (forced on a CPU, with a warning)."""
    import logging

    import colabfold_kernels.device as kernels
    import jax

    from parafold.fold.config import resolve_pallas

    picked = {"use_pallas": True, "kernel": "sm90"}
    monkeypatch.setattr(kernels, "dispatch", lambda mode: dict(picked))
    for backend, flag, expected in (("gpu", None, picked), ("cpu", None, {"use_pallas": False}),
                                    ("gpu", False, {"use_pallas": False}),
                                    ("cpu", True, picked)):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        with caplog.at_level(logging.WARNING, logger="parafold.fold.config"):
            caplog.clear()
            assert resolve_pallas(ModelSettings(use_pallas=flag)) == expected, (backend, flag)
        assert ("forced" in caplog.text) == (backend == "cpu" and flag is True)


def test_the_persistent_compile_cache_is_on_by_default_in_the_users_cache(tmp_path,
                                                                         monkeypatch):
    from parafold import cli

    seen = []
    monkeypatch.setattr(cli, "_run_and_report", lambda settings: seen.append(settings) or 0)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "in.fasta").write_text(">a\nMKVLAAGIVGLLLA\n")
    from typer.testing import CliRunner

    args = ["run", str(tmp_path / "in.fasta"), "-o", str(tmp_path / "o"), "--params-dir",
            str(tmp_path / "p")]
    assert CliRunner().invoke(cli.app, args).exit_code == 0
    assert CliRunner().invoke(cli.app, [*args, "--no-compile-cache"]).exit_code == 0
    assert [s.model.compile_cache_dir for s in seen] == [tmp_path / "xdg" / "parafold" / "jax",
                                                          None]


def test_writing_a_targets_files_removes_what_a_killed_writer_left(tmp_path):
    import time

    from parafold.fold.outputs import write_target_outputs

    folder = tmp_path / "t"
    folder.mkdir()
    dead = folder / ".result_model_1_ptm.pkl.a1b2c3.part"
    dead.write_bytes(b"x" * 100)
    old = time.time() - 2 * 3600
    os.utime(dead, (old, old))
    write_target_outputs(folder, "t", [_prediction("model_1_ptm", 50.0)], {}, save_raw=False)
    assert not dead.exists()
