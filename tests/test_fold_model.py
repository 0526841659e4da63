"""The real model in its tiny config with random weights, float32, on the CPU.

Checks padding equivalence, one compile per (family, shape), the persistent cache across
processes, and AlphaFold-compatible outputs with exactly the target's residues.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parafold.featureset import write_feature_set  # noqa: E402
from parafold.fold.settings import ModelSettings  # noqa: E402

LENGTHS = {"p20": 20, "p26": 26, "p31": 31, "p34": 34}  # buckets 32, 32, 32, 38


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from parafold.fold.params import write_random_params
    from parafold.fold.synthetic import make_features, random_sequence

    root = tmp_path_factory.mktemp("fold")
    # compile_cost_s=0: every shape compiles on its own (these tests count compiles per shape)
    # model 1 (templates) and model 3 (none): targets without templates share their shapes
    settings = ModelSettings(config_size="tiny", models=(1, 3), num_recycle=1, float32=True,
                             compile_cost_s=0.0,
                             compile_cache_dir=tmp_path_factory.getbasetemp() / "jax-cache")
    write_random_params(root / "weights", settings, seed=0)
    rng = np.random.default_rng(7)
    sets = []
    for i, (name, length) in enumerate(LENGTHS.items()):
        feats = make_features(random_sequence(length, rng), 10, seed=i, description=name)
        sets.append(write_feature_set(root / "features" / name, name=name, target_id=name,
                                      features=feats))
    return root, settings, sets


@pytest.fixture(scope="module")
def fold_run(env):
    from parafold.fold.worker import FoldWorker

    root, settings, sets = env
    worker = FoldWorker(root / "weights", settings)
    outcomes = worker.fold(sets, root / "out")
    return worker, outcomes


def test_padded_equals_unpadded(env):
    """Length 30 -> 32 and extra MSA 8 -> 16 rows: same coordinates and pLDDT."""
    import jax

    from parafold.fold.buckets import ShapeKey, shape_key
    from parafold.fold.params import load_params
    from parafold.fold.processing import process_features, unpad_result
    from parafold.fold.runner import ModelRunner
    from parafold.fold.synthetic import make_features, random_sequence

    root, settings, _ = env
    raw = make_features(random_sequence(30, np.random.default_rng(3)), 40, seed=3)
    runner = ModelRunner(settings)
    params = jax.device_put(load_params(root / "weights", "model_3_ptm", settings))
    padded = shape_key(30, 40, "model_3_ptm", settings)
    exact = ShapeKey(family=padded.family, length=30, clusters=32, extra=8, templates=0)
    assert (padded.length, padded.clusters, padded.extra) == (32, 32, 16)
    results = {}
    for key in (padded, exact):
        feats = process_features(raw, runner.config("model_3_ptm", key), key, seed=5)
        result, _ = runner.fetch(runner.launch("model_3_ptm", key, params, feats, seed=5))
        results[key] = unpad_result(result, 30)
    _assert_same_prediction(results[padded], results[exact], 30)


def _assert_same_prediction(a: dict, b: dict, length: int) -> None:
    """Coordinates within 0.01 A, pLDDT within 0.01, pTM within 1e-3, and not degenerate."""
    pos_a = a["structure_module"]["final_atom_positions"]
    pos_b = b["structure_module"]["final_atom_positions"]
    mask = b["structure_module"]["final_atom_mask"] > 0
    assert pos_a.shape == pos_b.shape == (length, 37, 3)
    assert np.abs(pos_a - pos_b)[mask].max() <= 0.01
    assert np.abs(a["plddt"] - b["plddt"]).max() <= 0.01
    assert abs(float(a["ptm"]) - float(b["ptm"])) <= 1e-3
    # random weights are not degenerate: pLDDT varies, atoms spread out
    assert a["plddt"].std() > 0.05 and not np.allclose(a["plddt"], 50.0)
    assert pos_a[:, 1].std(axis=0).min() > 1.0


def test_a_template_model_runs_a_target_without_templates_as_with_masked_templates(env):
    """Model 1 on a target without templates: in the no-template shape it shares with model 3
    (template stack off, 28 sampled cluster rows padded to 32) the same coordinates, pLDDT
    and pTM as in its template shape with 4 masked templates, AlphaFold's own way."""
    import jax

    from parafold.fold.buckets import shape_key
    from parafold.fold.params import load_params, without_template_stack
    from parafold.fold.processing import process_features, unpad_result
    from parafold.fold.runner import ModelRunner
    from parafold.fold.synthetic import make_features, random_sequence

    root, settings, _ = env
    raw = make_features(random_sequence(30, np.random.default_rng(4)), 40, seed=4)
    runner = ModelRunner(settings)
    params = jax.device_put(load_params(root / "weights", "model_1_ptm", settings))
    shared = shape_key(30, 40, "model_1_ptm", settings, templates=False)
    masked = shape_key(30, 40, "model_1_ptm", settings, templates=True)
    assert shared == shape_key(30, 40, "model_3_ptm", settings, templates=False)
    assert (shared.family, shared.clusters, shared.templates) == ("no_templates", 32, 0)
    assert (masked.family, masked.clusters, masked.templates) == ("templates", 28, 4)
    results = {}
    for key, weights in ((shared, without_template_stack(params)), (masked, params)):
        feats = process_features(raw, runner.config("model_1_ptm", key), key, seed=5)
        assert feats["msa_mask"].shape[1] == key.clusters
        assert feats["msa_mask"][0, 28:].sum() == 0  # model 1 samples 28 rows in either
        result, _ = runner.fetch(runner.launch("model_1_ptm", key, weights, feats, seed=5))
        results[key] = unpad_result(result, 30)
    _assert_same_prediction(results[shared], results[masked], 30)


def test_model_1_alone_runs_targets_with_and_without_templates_in_one_shape(env):
    """Model 1 only, one target with templates and one without, of one size: both run in the
    template shape (the one without masked, as AlphaFold runs it): one compile, not two."""
    from dataclasses import replace

    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    root, settings, _ = env
    rng = np.random.default_rng(21)
    sets = [write_feature_set(root / "mixed" / name, name=name, target_id=name,
                              features=make_features(random_sequence(30, rng), 40, seed=i,
                                                     num_templates=templates))
            for i, (name, templates) in enumerate((("found", 2), ("free", 0)))]
    worker = FoldWorker(root / "weights", replace(settings, models=(1,), compile_cost_s=None))
    outcomes = worker.fold(sets, root / "mixed-out")
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert [(k.family, k.templates) for k in worker.runner.compiled_keys] == [("templates", 4)]
    assert outcomes[0].bucket == outcomes[1].bucket


def test_compiles_once_per_family_and_shape(env, fold_run):
    worker, outcomes = fold_run
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    # 4 proteins without templates x models 1 and 3, two length buckets -> exactly two
    # executables: model 1 runs them without its template stack, in model 3's shapes
    keys = worker.runner.compiled_keys
    assert [(k.family, k.length) for k in keys] == [("no_templates", 32), ("no_templates", 38)]
    assert worker.stats["compiles"] == 2
    assert worker.stats["predictions"] == 8
    # the persistent cache keeps the model's executables, not the feature pipeline's small
    # jits (about three a target, one per raw shape)
    stored = [p.name for p in env[1].compile_cache_dir.glob("*-cache")]
    assert sum(name.startswith("jit_step") for name in stored) >= 2
    assert sum(not name.startswith("jit_step") for name in stored) <= 2, stored


def test_outputs_are_alphafold_compatible(env, fold_run):
    from Bio.PDB import MMCIFParser, PDBParser

    root, settings, sets = env
    _, outcomes = fold_run
    paes: dict[str, list[np.ndarray]] = {}
    for fs, outcome in zip(sets, outcomes, strict=True):
        folder = root / "out" / fs.name
        ranking = json.loads((folder / "ranking_debug.json").read_text())
        assert sorted(ranking["order"]) == sorted(settings.model_names)
        assert list(outcome.ranked_model_names) == ranking["order"]
        for i in range(len(settings.model_names)):
            structure = PDBParser(QUIET=True).get_structure(fs.name, folder / f"ranked_{i}.pdb")
            residues = list(structure.get_residues())
            assert len(residues) == fs.length
            from Bio.PDB.Polypeptide import index_to_one, three_to_index

            seq = "".join(index_to_one(three_to_index(r.get_resname())) for r in residues)
            assert seq == fs.sequence
            bfac = [a.get_bfactor() for a in structure.get_atoms()]
            assert min(bfac) > 0 and max(bfac) < 100
            cif = MMCIFParser(QUIET=True).get_structure(fs.name, folder / f"ranked_{i}.cif")
            assert len(list(cif.get_residues())) == fs.length
        for model in settings.model_names:
            scores = json.loads((folder / f"scores_{model}.json").read_text())
            assert len(scores["plddt"]) == fs.length and 0 <= scores["ptm"] <= 1
            pae = json.loads((folder / f"pae_{model}.json").read_text())
            matrix = np.asarray(pae[0]["predicted_aligned_error"])
            assert matrix.shape == (fs.length, fs.length)
            assert pae[0]["max_predicted_aligned_error"] > 0
            # not degenerate: random weights once saturated the PAE head (one value for all)
            assert matrix.std() > 0.5 and matrix.max() - matrix.min() > 3, (fs.name, model)
            paes.setdefault(model, []).append(matrix)
            assert (folder / f"unrelaxed_{model}.pdb").is_file()
        timings = json.loads((folder / "timings.json").read_text())
        assert {f"predict_{m}" for m in settings.model_names} <= set(timings)
    for model, matrices in paes.items():  # and it depends on the input
        short = min(m.shape[0] for m in matrices)
        assert np.abs(matrices[0][:short, :short] - matrices[1][:short, :short]).max() > 3, model
    # a second run skips finished targets
    worker, _ = fold_run
    again = worker.fold(sets, root / "out")
    assert all(o.skipped for o in again)


def test_second_process_compiles_nothing(env, fold_run):
    root, settings, sets = env
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from parafold.featureset import read_feature_set
        from parafold.fold.settings import ModelSettings
        from parafold.fold.worker import FoldWorker
        s = ModelSettings(config_size="tiny", models=(1, 3), num_recycle=1, float32=True,
                          compile_cache_dir=Path({str(settings.compile_cache_dir)!r}),
                          executable_cache=False)  # level 1 alone: JAX's persistent cache
        w = FoldWorker(Path({str(root / "weights")!r}), s)
        fs = read_feature_set(Path({str(sets[0].path)!r}))
        out = w.fold([fs], Path({str(root / "out2")!r}))
        print("STATS" + json.dumps(dict(w.stats, ok=out[0].ok)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("STATS"))
    stats = json.loads(line[5:])
    assert stats["ok"] and stats["compiles"] == 1
    assert stats["persistent_hits"] == 1 and stats["xla_compiles"] == 0


def test_small_groups_run_in_a_bigger_shape_with_the_same_result(env):
    """Three targets in three shapes (a shallow MSA and a deep one at length bucket 32, a deep
    one at 38) run in one: the deepest, longest (one compile, not three), and each target's
    structure and pLDDT are the ones it gets in its own shape."""
    from dataclasses import replace

    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    root, settings, _ = env
    rng = np.random.default_rng(11)
    specs = (("shallow", 26, 10), ("deep", 30, 60), ("long", 34, 60))
    sets = [write_feature_set(root / "merge" / name, name=name, target_id=name,
                              features=make_features(random_sequence(length, rng), depth,
                                                     seed=i, description=name))
            for i, (name, length, depth) in enumerate(specs)]
    runs = {}
    for merge in (1000.0, 0.0):  # seconds a compile is worth: far above 3 tiny predictions
        worker = FoldWorker(root / "weights", replace(settings, compile_cost_s=merge,
                                                      merge_max_waste=0.35))
        outcomes = worker.fold(sets, root / f"merge-out-{merge}")
        assert all(o.ok for o in outcomes), [o.error for o in outcomes]
        runs[merge] = worker, outcomes
    merged, alone = runs[1000.0], runs[0.0]
    assert [(k.length, k.extra) for k in alone[0].runner.compiled_keys] == [
        (32, 1), (32, 64), (38, 64)]
    assert [(k.length, k.extra) for k in merged[0].runner.compiled_keys] == [(38, 64)]
    assert len({o.bucket for o in merged[1]}) == 1 and merged[1][2].bucket == alone[1][2].bucket
    # a later call (as `run` makes one per group) reuses the shape compiled before
    later = merged[0].fold(sets[:1], root / "merge-out-later")
    assert later[0].ok and later[0].bucket == merged[1][2].bucket
    assert merged[0].stats["compiles"] == 1
    for (name, length, _), model in [(spec, m) for spec in specs[:2]
                                     for m in settings.model_names]:
        coords, plddt = {}, {}
        for merge in (1000.0, 0.0):
            folder = root / f"merge-out-{merge}" / name
            atoms = [line for line in (folder / f"unrelaxed_{model}.pdb").read_text().splitlines()
                     if line.startswith("ATOM")]
            coords[merge] = np.array([[float(line[c:c + 8]) for c in (30, 38, 46)]
                                      for line in atoms])
            plddt[merge] = np.array(json.loads((folder / f"scores_{model}.json").read_text())
                                    ["plddt"])
        assert coords[1000.0].shape == coords[0.0].shape and len(coords[0]) > length * 4
        assert np.abs(coords[1000.0] - coords[0.0]).max() <= 0.01, (name, model)
        assert np.abs(plddt[1000.0] - plddt[0.0]).max() <= 0.01, (name, model)


def test_out_of_memory_on_one_protein_retries_with_less_memory(tmp_path, monkeypatch):
    """Batch-1 out of memory: the protein is retried once in the low-memory config (it then
    succeeds); one that runs out of memory in both fails, its error naming its length and
    bucket, and the other targets go on. XLA's out-of-memory is raised at launch."""
    from parafold.errors import GpuOutOfMemoryError
    from parafold.fold.params import write_random_params
    from parafold.fold.runner import ModelRunner
    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    settings = ModelSettings(config_size="tiny", models=(3,), num_recycle=0, float32=True,
                             compile_cost_s=0.0, compile_ahead=0, compile_cache_dir=None)
    write_random_params(tmp_path / "w", settings)
    rng = np.random.default_rng(1)
    sets = [write_feature_set(tmp_path / "f" / name, name=name, target_id=name,
                              features=make_features(random_sequence(length, rng), 6, seed=i))
            for i, (name, length) in enumerate((("once", 20), ("always", 22), ("fine", 24)))]
    real_launch, seen = ModelRunner.launch, []

    def launch(self, model_name, key, params, feats, seed):
        length = int(feats["seq_length"][0])
        seen.append((length, key.low_memory))
        if length == 22 or (length == 20 and not key.low_memory):
            raise GpuOutOfMemoryError(f"out of memory predicting {key.describe()}")
        return real_launch(self, model_name, key, params, feats, seed)

    monkeypatch.setattr(ModelRunner, "launch", launch)
    with FoldWorker(tmp_path / "w", settings) as worker:
        outcomes = {o.name: o for o in worker.fold(sets, tmp_path / "out")}
        compiled = worker.runner.compiled_keys
    assert outcomes["once"].ok and "low-memory" in outcomes["once"].bucket
    assert outcomes["fine"].ok and (tmp_path / "out" / "fine" / "ranked_0.pdb").is_file()
    failed = outcomes["always"]
    assert not failed.ok and "22 residues" in failed.error and "L=32" in failed.error
    assert seen.count((22, False)) == seen.count((22, True)) == 1  # retried once, no more
    assert (20, True) in seen and any(k.low_memory for k in compiled)
