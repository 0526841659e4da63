"""End to end through the command line: `params random --preset tiny`, then `predict`."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from parafold.cli import app  # noqa: E402
from parafold.featureset import write_feature_set  # noqa: E402


def test_params_random_then_predict(tmp_path, tmp_path_factory):
    from parafold.fold.synthetic import make_features

    runner = CliRunner()
    res = runner.invoke(app, ["params", "random", str(tmp_path / "w"), "--preset", "tiny",
                              "--models", "3"])
    assert res.exit_code == 0, res.output
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    write_feature_set(tmp_path / "feats" / "t1", name="t1", target_id="t1",
                      features=make_features(seq, 12))
    cache = tmp_path_factory.getbasetemp() / "jax-cache"
    args = ["predict", str(tmp_path / "feats"), "-o", str(tmp_path / "out"), "--params-dir",
            str(tmp_path / "w"), "--models", "3", "--num-recycle", "1", "--float32",
            "--compile-cache", str(cache), "--save-raw"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "model config: tiny (recorded with the params" in res.output  # never unseen
    out = tmp_path / "out" / "t1"
    for name in ("ranked_0.pdb", "ranked_0.cif", "unrelaxed_model_3_ptm.pdb",
                 "ranking_debug.json", "timings.json", "scores_model_3_ptm.json",
                 "pae_model_3_ptm.json", "result_model_3_ptm.pkl"):
        assert (out / name).is_file(), name
    # the params folder records the tiny config: asking for full is refused, not guessed
    res = runner.invoke(app, args[:-1] + ["--config", "full"])
    assert res.exit_code == 2 and "tiny" in res.output


def test_predict_dry_run_sizes_the_gpu_stage_and_writes_nothing(tmp_path):
    """Targets done, copied and left, the shapes and executables the rest needs (one for all
    five models: no templates, shallow MSAs, merged into one shape) and modelled GPU time;
    missing params are named; OUT is left as it was."""
    import numpy as np

    from parafold.fold.synthetic import make_features, random_sequence

    rng = np.random.default_rng(5)
    same = make_features(random_sequence(60, rng), 30, seed=1)
    specs = (("a", same, "k1"), ("a_copy", same, "k1"),
             ("b", make_features(random_sequence(90, rng), 100, seed=2), "k2"),
             ("done", make_features(random_sequence(70, rng), 20, seed=3), "k3"))
    for name, features, key in specs:
        write_feature_set(tmp_path / "feats" / name, name=name, target_id=name,
                          features=features, key=key)
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    (out / "done" / "ranking_debug.json").write_text("{}")
    before = sorted(out.rglob("*"))
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "feats"), "-o", str(out),
                                   "--params-dir", str(tmp_path / "w"), "--models", "1,2,3,4,5",
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert ("4 targets: 1 done, 1 to copy from an identical target, 0 from an earlier "
            "prediction (--cache-dir), 2 to predict") in res.output
    assert "shapes after merging: 1; executables to compile for all models: 1" in res.output
    assert "modelled on one GPU" in res.output and "proteins/hour" in res.output
    assert "params_model_1_ptm.npz: missing" in res.output
    assert sorted(out.rglob("*")) == before
    # b predicted before in another OUT sharing the cache folder: a copy, not a prediction
    from parafold.featureset import read_feature_set
    from parafold.fold.reuse import PredictionIndex
    from parafold.fold.settings import ModelSettings

    elsewhere = tmp_path / "other_out" / "b"
    elsewhere.mkdir(parents=True)
    (elsewhere / "ranking_debug.json").write_text("{}")
    PredictionIndex.for_settings(tmp_path / "cache", ModelSettings(), tmp_path / "w").record(
        read_feature_set(tmp_path / "feats" / "b"), elsewhere)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "feats"), "-o", str(out),
                                   "--params-dir", str(tmp_path / "w"), "--models", "1,2,3,4,5",
                                   "--cache-dir", str(tmp_path / "cache"), "--dry-run"])
    assert ("4 targets: 1 done, 1 to copy from an identical target, 1 from an earlier "
            "prediction (--cache-dir), 1 to predict") in res.output, res.output
    with_templates = tmp_path / "feats" / "c"
    write_feature_set(with_templates, name="c", target_id="c", key="k4",
                      features=make_features(random_sequence(60, rng), 30, num_templates=2))
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "feats"), "-o", str(out),
                                   "--params-dir", str(tmp_path / "w"), "--models", "1,2,3,4,5",
                                   "--dry-run", "--gpus", "none"])
    assert "executables to compile for all models: 3" in res.output, res.output
    assert "modelled on the CPU" in res.output


def test_predict_refuses_untrusted_pickles(tmp_path, tiny_params, caplog):
    """A features.pkl from elsewhere runs code when loaded: without --trust-pickles it is not
    loaded at all (its code never runs), and the error says how to allow it. With valid
    params, so nothing else stops predict first."""
    import os
    import pickle

    marker = tmp_path / "pickle-code-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tmp_path / "feats" / "t1").mkdir(parents=True)
    (tmp_path / "feats" / "t1" / "features.pkl").write_bytes(pickle.dumps(Payload()))
    args = ["predict", str(tmp_path / "feats"), "-o", str(tmp_path / "o"), "--params-dir",
            str(tiny_params), "--models", "1", "--gpus", "none", "--no-compile-cache"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "pass --trust-pickles" in res.output + caplog.text and not marker.exists()
    res = CliRunner().invoke(app, [*args, "--trust-pickles"])  # the test can see a load
    assert marker.exists() and res.exit_code != 0
    assert not (tmp_path / "o" / "t1" / "ranked_0.pdb").exists()


def test_run_with_a_malformed_params_record_is_a_usage_error(tmp_path):
    """`run` reports a bad params folder as an error (exit 2), not a traceback (exit 1)."""
    (tmp_path / "in.fasta").write_text(">a\nMKVLAAGIVGLLLA\n")
    (tmp_path / "p" / "params").mkdir(parents=True)
    (tmp_path / "p" / "params" / "parafold_params.json").write_text("{not json")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "in.fasta"), "-o", str(tmp_path / "o"),
                                   "--params-dir", str(tmp_path / "p")])
    assert res.exit_code == 2, res.output
    assert "malformed" in res.output


def test_predict_with_no_feature_sets_says_what_it_looked_for(tmp_path):
    """An empty features folder is exit 2 with a message naming it and the files expected."""
    (tmp_path / "feats" / "empty").mkdir(parents=True)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "feats"), "-o", str(tmp_path / "o"),
                                   "--params-dir", str(tmp_path / "w")])
    assert res.exit_code == 2
    assert str(tmp_path / "feats") in res.output
    assert "features.json + features.npz" in res.output and "--trust-pickles" in res.output
    # a path that does not exist is named too (an input error, not a traceback)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "nowhere"), "-o",
                                   str(tmp_path / "o"), "--params-dir", str(tmp_path / "w")])
    assert res.exit_code == 2 and "nowhere: no such folder" in res.output, res.output


def test_predict_gives_same_named_folders_of_two_roots_their_own_output(tmp_path, monkeypatch):
    """rootA/prot1 and rootB/prot1 must not both be written to OUT/prot1 (the fold worker is
    a stub: this checks what `predict` hands it, not a prediction)."""
    from types import SimpleNamespace

    import parafold.fold.worker as worker
    from parafold.fold.synthetic import make_features

    handed: list[tuple[str, str]] = []

    class StubWorker:
        stats: dict[str, object] = {"compiles": 0}

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def load_params(self):
            pass

        def fold(self, sets, out):
            handed.extend((fs.name, fs.path.parent.name) for fs in sets)
            return [SimpleNamespace(name=fs.name, length=fs.length, ok=True, skipped=False,
                                    error=None, copied_from=None) for fs in sets]

    monkeypatch.setattr(worker, "FoldWorker", StubWorker)
    for root, seq in (("rootA", "MKTAYIAKQR"), ("rootB", "MKTAYIAKQRQISF")):
        write_feature_set(tmp_path / root / "prot1", name="prot1", target_id="prot1",
                          features=make_features(seq, 4))
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "rootA"), str(tmp_path / "rootB"),
                                   "-o", str(tmp_path / "out"), "--params-dir", str(tmp_path),
                                   "--config", "tiny", "--no-compile-cache"])
    assert res.exit_code == 0, res.output
    assert handed == [("prot1", "rootA"), ("prot1_2", "rootB")]


def test_run_takes_the_gpu_stage_options_predict_takes(tmp_path, monkeypatch):
    """`run` builds the same model settings from the same options as `predict`: a cluster run
    can point the compilation cache at a shared folder, tune merging, stop recycling early."""
    from parafold import cli

    seen = []
    monkeypatch.setattr(cli, "_run_and_report", lambda settings: seen.append(settings) or 0)
    (tmp_path / "in.fasta").write_text(">a\nMKVLAAGIVGLLLA\n")
    args = ["run", str(tmp_path / "in.fasta"), "-o", str(tmp_path / "o"), "--params-dir",
            str(tmp_path / "p"), "--models", "1,3", "--compile-cache", str(tmp_path / "jax"),
            "--compile-cost", "0", "--merge-max-waste", "0.2", "--no-msa-depth-buckets",
            "--recycle-early-stop-tolerance", "0.5", "--random-seed", "7", "--save-raw",
            "--compile-ahead", "0", "--no-fused-kernels", "--compile-cache-max-gb", "2.5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    model = seen[0].model
    assert model.models == (1, 3) and model.compile_cache_dir == tmp_path / "jax"
    assert (model.compile_cost_s, model.merge_max_waste) == (0.0, 0.2)
    assert not model.msa_depth_buckets and model.recycle_early_stop_tolerance == 0.5
    assert (model.random_seed, model.save_raw, model.compile_ahead) == (7, True, 0)
    assert model.use_pallas is False and model.compile_cache_max_bytes == 2_500_000_000
    res = CliRunner().invoke(app, [*args[:6], "--no-compile-cache", "--compile-cost", "-1"])
    assert res.exit_code == 2 and "--compile-cost must be >= 0" in res.output
    res = CliRunner().invoke(app, [*args[:6], "--no-compile-cache"])
    assert res.exit_code == 0 and seen[-1].model.compile_cache_dir is None
    assert seen[-1].model.compile_cache_max_bytes == 20_000_000_000  # the default bound
    res = CliRunner().invoke(app, [*args[:6], "--compile-cache-max-gb", "0"])
    assert res.exit_code == 0 and seen[-1].model.compile_cache_max_bytes is None
    res = CliRunner().invoke(app, [*args[:6], "--compile-cache-max-gb", "-1"])
    assert res.exit_code == 2 and "--compile-cache-max-gb must be >= 0" in res.output


@pytest.mark.parametrize("gpus", ["none", "0,1"])
def test_ctrl_c_during_a_compile_ends_predict_at_once(tmp_path, gpus):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while a shape compiles in
    a background thread: predict exits 130 at once instead of waiting for the compile (14 s
    here before, ~30 s on a GPU), in one process and with a fold process per device."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.fold.synthetic import make_features

    write_random_params(tmp_path / "w", ModelSettings(config_size="tiny", models=(1,)))
    write_feature_set(tmp_path / "feats" / "t1", name="t1", target_id="t1",
                      features=make_features("MKTAYIAKQRQISFVKSHFSRQ" * 3, 12))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a full-length compile
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("parafold")), "predict", str(tmp_path / "feats"),
         "-o", str(tmp_path / "out"), "--params-dir", str(tmp_path / "w"), "--models", "1",
         "--num-recycle", "1", "--compile-cache", str(tmp_path / "jax"), "--gpus", gpus],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**env, "JAX_PLATFORMS": "cpu"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if "shapes ahead" in line:  # the compile thread has started
            break
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    signalled = time.monotonic()
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, rest
    assert time.monotonic() - signalled < 5, rest
    assert "interrupted; rerun the same command to resume" in rest
    assert not (tmp_path / "out" / "t1" / "ranked_0.pdb").exists()
