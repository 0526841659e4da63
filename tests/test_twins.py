"""Targets with identical features are predicted once (`parafold.fold.twins`).

A copy must be exactly what predicting the twin writes (checked byte for byte against
`write_target_outputs` run for the twin's name on the same predictions), and `predict` must
predict each set of twins once with the real tiny model, copy the rest, resume, and predict a
twin itself when its source fails for a reason of its own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from alphafold.common import protein  # noqa: E402
from alphafold.common import residue_constants as rc  # noqa: E402

from parafold.featureset import FeatureSet, write_feature_set  # noqa: E402
from parafold.fold import mmcif  # noqa: E402
from parafold.fold.outputs import (  # noqa: E402
    DONE_FILE,
    Prediction,
    is_complete,
    is_prediction_file,
    write_target_outputs,
)
from parafold.fold.settings import ModelSettings  # noqa: E402
from parafold.fold.twins import copy_prediction, plan_twins  # noqa: E402
from parafold.ledger import State  # noqa: E402
from parafold.relax import RELAX_METRICS_FILE, relax_pending  # noqa: E402

# Coordinates and pLDDTs whose text is at a rounding edge: the twin's mmCIF is written from
# the ranked PDB (three decimals) and must still equal the one written from the prediction.
EDGE_XYZ = (-0.0, -0.0004, 0.0005, 9.9996, -99.9995, 999.9996)
EDGE_PLDDT = (0.0, 9.999, 99.995, 12.345, 0.005, 100.0)


def _predictions(n: int, seed: int) -> list[Prediction]:
    rng = np.random.default_rng(seed)
    aatype = rng.integers(0, 20, n)
    preds = []
    for i in range(2):
        positions = (rng.normal(size=(n, 37, 3)) * 30).astype(np.float32)
        positions.reshape(-1)[rng.integers(0, n * 37 * 3, 6 * len(EDGE_XYZ))] = np.repeat(
            EDGE_XYZ, 6)
        plddt = rng.uniform(20, 95, n)
        plddt[rng.integers(0, n, len(EDGE_PLDDT))] = EDGE_PLDDT
        result = {"plddt": plddt, "ptm": np.float32(rng.uniform()),
                  "predicted_aligned_error": rng.uniform(0, 30, (n, n)),
                  "max_predicted_aligned_error": np.float32(31.75),
                  "num_recycles": np.int32(3),
                  "structure_module": {"final_atom_positions": positions,
                                       "final_atom_mask": rc.STANDARD_ATOM_MASK[aatype]
                                       .astype(np.float32)}}
        preds.append(Prediction(name=f"model_{i + 1}_ptm", model_name=f"model_{i + 1}_ptm",
                                seed=i, result=result, aatype=aatype,
                                residue_index=np.arange(n), timings={}))
    return preds


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a target folder but the timings (the twin keeps its own)."""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and p.name != "timings.json"}


def _results_rows(out: Path) -> dict[str, dict[str, str]]:
    """OUT/results.tsv as {name: {column: cell}}."""
    lines = (out / "results.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return {r[0]: dict(zip(header, r, strict=True)) for r in (ln.split("\t") for ln in lines[1:])}


def test_a_copy_is_what_predicting_the_twin_writes(tmp_path):
    preds = _predictions(41, seed=5)
    write_target_outputs(tmp_path / "src", "src", preds, {"predict_model_1_ptm": 2.0},
                         save_raw=True)
    write_target_outputs(tmp_path / "expected", "twin", preds, {}, save_raw=True)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "timings.json").write_text(json.dumps({"features": 1.5}))
    (twin / "unrelaxed_model_9_ptm.pdb").write_text("stale\n")  # an earlier prediction's
    (twin / "ranked_4.pdb").write_text("stale\n")
    (twin / "features.json").write_text("{}\n")  # its own files stay

    copied = copy_prediction(tmp_path / "src", twin, "twin")

    expected = _files(tmp_path / "expected")
    got = _files(twin)
    assert got.pop("features.json") == b"{}\n"
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name
        # files of their own: editing one target's file must not change the other's
        assert (twin / name).stat().st_ino != (tmp_path / "src" / name).stat().st_ino, name
    assert b"TWIN" in got["ranked_0.cif"] and b"SRC" not in got["ranked_0.cif"]
    timings = json.loads((twin / "timings.json").read_text())
    assert timings["features"] == 1.5 and "copy_prediction" in timings
    assert timings["copied_from"] == "src"  # a name in the same OUT (results.tsv shows it)
    assert "predict_model_1_ptm" not in timings  # the source's GPU time is not the twin's
    ranking = json.loads((twin / DONE_FILE).read_text())
    assert copied.order == tuple(ranking["order"]) and copied.source == "src"
    best = max(preds, key=lambda p: p.mean_plddt)
    assert copied.mean_plddt == pytest.approx(best.mean_plddt)
    assert copied.ptm == pytest.approx(float(best.result["ptm"]), abs=1e-4)
    # from another OUT, the source is its folder; predicted itself later, it is no copy
    other = tmp_path / "other_out" / "twin"
    other.mkdir(parents=True)
    copy_prediction(tmp_path / "src", other, "twin")
    assert json.loads((other / "timings.json").read_text())["copied_from"] == str(
        (tmp_path / "src").resolve())
    write_target_outputs(twin, "twin", preds, {"predict_model_1_ptm": 2.0}, save_raw=True)
    timings = json.loads((twin / "timings.json").read_text())
    assert "copied_from" not in timings and "copy_prediction" not in timings


@pytest.mark.parametrize("name", ["twin", "data_twin"])
def test_a_copy_keeps_residues_without_atoms(tmp_path, name):
    """X (and U, B, Z, O) residues have no atoms, so no PDB line: the twin's mmCIF still has
    them, leading, inner and trailing, as predicting the twin writes it (also for a name
    whose `_entry.id` needs quotes)."""
    preds = _predictions(16, seed=8)
    for pred in preds:
        pred.aatype[[0, 7, 14, 15]] = rc.restype_num  # UNK
        pred.result["structure_module"]["final_atom_mask"] = rc.STANDARD_ATOM_MASK[
            pred.aatype].astype(np.float32)
    write_target_outputs(tmp_path / "src", "src", preds, {}, save_raw=False)
    write_target_outputs(tmp_path / "expected", name, preds, {}, save_raw=False)
    (tmp_path / name).mkdir()
    copy_prediction(tmp_path / "src", tmp_path / name, name)
    for index in range(len(preds)):
        cif = f"ranked_{index}.cif"
        assert (tmp_path / name / cif).read_text() == (tmp_path / "expected" / cif).read_text()
    assert (tmp_path / name / "ranked_0.cif").read_text().count("UNK") >= 4


def test_a_copy_refuses_a_source_that_changed_or_is_being_relaxed(tmp_path, monkeypatch):
    """Another OUT's folder, found in the index long before its copy runs: predicted again
    (other settings) or relaxed since, mid-relaxation, or changed while copied, it is not
    copied (the twin is predicted itself), and the twin is left without a done marker."""
    import parafold.fold.twins as twins
    from parafold.errors import OutputError
    from parafold.fold.reuse import done_stamp

    src = tmp_path / "src"
    order = write_target_outputs(src, "src", _predictions(12, seed=1), {}, save_raw=False)
    indexed = done_stamp(src)
    (tmp_path / "twin").mkdir()
    copy_prediction(src, tmp_path / "twin", "twin", expect=indexed)  # unchanged: copied
    assert is_complete(tmp_path / "twin")
    (tmp_path / "twin" / DONE_FILE).unlink()  # to be copied again

    write_target_outputs(src, "src", _predictions(12, seed=2), {}, save_raw=False)  # again
    with pytest.raises(OutputError, match="predicted or relaxed again"):
        copy_prediction(src, tmp_path / "twin", "twin", expect=indexed)
    assert not is_complete(tmp_path / "twin")

    indexed = done_stamp(src)
    (src / f"relaxed_{order[0]}.pdb").write_text("ATOM\n")  # a relaxation under way
    with pytest.raises(OutputError, match="relaxation of .* is under way"):
        copy_prediction(src, tmp_path / "twin", "twin")
    (src / RELAX_METRICS_FILE).write_text(json.dumps({order[0]: {"attempts": 1}}))
    with pytest.raises(OutputError, match="predicted or relaxed again"):  # relaxed since
        copy_prediction(src, tmp_path / "twin", "twin", expect=indexed)
    copy_prediction(src, tmp_path / "twin", "twin", expect=done_stamp(src))
    assert (tmp_path / "twin" / f"relaxed_{order[0]}.pdb").is_file()
    (tmp_path / "twin" / DONE_FILE).unlink()

    real_copy = twins.atomic_copy

    def predicted_meanwhile(source, target, **kwargs):
        real_copy(source, target, **kwargs)
        if source.name.startswith("unrelaxed_"):
            write_target_outputs(src, "src", _predictions(12, seed=3), {}, save_raw=False)

    monkeypatch.setattr(twins, "atomic_copy", predicted_meanwhile)
    with pytest.raises(OutputError, match="changed while it was copied"):
        copy_prediction(src, tmp_path / "twin", "twin")
    assert not is_complete(tmp_path / "twin")


def test_a_copy_stopped_on_the_way_leaves_no_done_marker(tmp_path, monkeypatch):
    """A twin predicted before with other settings is copied to: a copy stopped half way (a
    full disk, a kill) must not leave the old done marker beside the new files."""
    import parafold.fold.twins as twins

    write_target_outputs(tmp_path / "src", "src", _predictions(12, seed=1), {}, save_raw=False)
    write_target_outputs(tmp_path / "twin", "twin", _predictions(12, seed=2), {},
                         save_raw=False)
    real_copy = twins.atomic_copy

    def full_disk(src, dst, **kwargs):
        if dst.name.startswith("unrelaxed_"):
            raise OSError(28, "No space left on device")
        real_copy(src, dst, **kwargs)

    monkeypatch.setattr(twins, "atomic_copy", full_disk)
    with pytest.raises(OSError):
        copy_prediction(tmp_path / "src", tmp_path / "twin", "twin")
    assert not is_complete(tmp_path / "twin")


def test_a_copy_carries_the_relaxation(tmp_path):
    """Relaxed files and their marker come along; the twin's relaxed mmCIF names the twin."""
    preds = _predictions(12, seed=6)
    src = tmp_path / "src"
    order = write_target_outputs(src, "src", preds, {}, save_raw=False)
    # What a relaxation of the best model leaves (the relaxed text here is the unrelaxed one
    # with hydrogens added by hand: the copy only moves it, it does not read it as physics).
    pdb = (src / f"unrelaxed_{order[0]}.pdb").read_text()
    first = next(line for line in pdb.splitlines() if line.startswith("ATOM"))
    hydrogen = first[:12] + " H  " + first[16:76] + " H  "
    relaxed = pdb.replace(first, first + "\n" + hydrogen.replace("    1 ", "    2 ", 1), 1)
    (src / f"relaxed_{order[0]}.pdb").write_text(relaxed)
    (src / "ranked_0.pdb").write_text(relaxed)
    (src / "ranked_0.cif").write_text(mmcif.to_mmcif(protein.from_pdb_string(relaxed),
                                                     file_id="src"))
    (src / RELAX_METRICS_FILE).write_text(json.dumps({order[0]: {"attempts": 1}}))
    assert not relax_pending(src, "best")

    copy_prediction(src, tmp_path / "twin", "twin")

    twin = tmp_path / "twin"
    assert not relax_pending(twin, "best")
    assert (twin / f"relaxed_{order[0]}.pdb").read_text() == relaxed
    assert (twin / "ranked_0.pdb").read_text() == relaxed
    assert (twin / "ranked_0.cif").read_text() == mmcif.to_mmcif(
        protein.from_pdb_string(relaxed), file_id="twin")


def test_a_source_without_a_prediction_is_an_error_naming_both(tmp_path):
    from parafold.errors import OutputError

    (tmp_path / "src").mkdir()
    with pytest.raises(OutputError, match=r"twin: cannot copy the prediction of src"):
        copy_prediction(tmp_path / "src", tmp_path / "twin", "twin")
    assert not (tmp_path / "twin" / DONE_FILE).exists()


def _set(name: str, sequence: str, key: str, **kw) -> FeatureSet:
    return FeatureSet(name=name, target_id=name, sequence=sequence, path=Path(name),
                      msa_depth=3, num_templates=0, key=key, **kw)


def test_twins_are_planned_by_key_and_sequence(tmp_path):
    a, a2, a3 = _set("a", "MKV", "k1"), _set("a2", "MKV", "k1"), _set("a3", "MKV", "k1")
    other_db = _set("b", "MKV", "k2")  # the same sequence searched elsewhere: not a twin
    keyless = [_set("p", "MKV", ""), _set("p2", "MKV", "")]  # foreign pickles
    pickled = _set("q", "MKV", "k1", from_pickle=True)
    plan = plan_twins([a, a2, other_db, a3, *keyless, pickled], tmp_path)
    assert [fs.name for fs in plan.fold] == ["a", "b", "p", "p2", "q"]
    assert {s: [t.name for t in ts] for s, ts in plan.twins.items()} == {"a": ["a2", "a3"]}
    # a twin predicted before is the source (nothing to predict), and is never copied to
    (tmp_path / "a3").mkdir()
    (tmp_path / "a3" / DONE_FILE).write_text("{}")
    plan = plan_twins([a, a2, a3], tmp_path)
    assert [fs.name for fs in plan.fold] == ["a3"]
    assert {s: [t.name for t in ts] for s, ts in plan.twins.items()} == {"a3": ["a", "a2"]}


SETTINGS = ModelSettings(config_size="tiny", models=(1,), num_recycle=0, float32=True,
                         compile_ahead=0, compile_cache_dir=None)


@pytest.fixture
def settings(tmp_path_factory) -> ModelSettings:
    """SETTINGS with the session's compile cache (shared with the other CLI tests)."""
    return replace(SETTINGS, compile_cache_dir=tmp_path_factory.getbasetemp() / "jax-cache")


@pytest.fixture
def twin_sets(tmp_path):
    from parafold.fold.synthetic import make_features, random_sequence

    rng = np.random.default_rng(11)
    seq_a, seq_b = random_sequence(24, rng), random_sequence(21, rng)
    feats_a = make_features(seq_a, 9, seed=1)
    root = tmp_path / "features"
    sets = [write_feature_set(root / name, name=name, target_id=name, features=feats, key=key)
            for name, feats, key in (("a", feats_a, "ka"), ("b", make_features(seq_b, 9, seed=2),
                                                             "kb"),
                                     ("a_again", feats_a, "ka"), ("a_third", feats_a, "ka"))]
    return sets


def test_predict_predicts_twins_once_and_copies_the_rest(twin_sets, tiny_params, tmp_path,
                                                        settings):
    from parafold.engine.devices import predict_on

    out = tmp_path / "out"
    result = predict_on((), twin_sets, out, params_dir=tiny_params, settings=settings)
    by_name = {o.name: o for o in result.outcomes}
    assert [o.name for o in result.outcomes] == ["a", "b", "a_again", "a_third"]
    assert all(o.ok for o in result.outcomes), [o.error for o in result.outcomes]
    assert by_name["a_again"].copied_from == "a" and by_name["a_third"].copied_from == "a"
    assert by_name["a"].copied_from is None
    assert result.stats["this process"]["predictions"] == 2  # a and b; not the copies
    for twin in ("a_again", "a_third"):
        got, source = _files(out / twin), _files(out / "a")
        assert sorted(got) == sorted(source)
        for name in source:
            if not name.endswith(".cif"):
                assert got[name] == source[name], name
        assert by_name[twin].mean_plddt == pytest.approx(by_name["a"].mean_plddt, abs=1e-3)

    # resume: nothing left; a copy lost (its done marker deleted) is copied again, not predicted
    (out / "a_third" / DONE_FILE).unlink()
    again = predict_on((), twin_sets, out, params_dir=tiny_params, settings=settings)
    by_name = {o.name: o for o in again.outcomes}
    assert by_name["a"].skipped and by_name["b"].skipped and by_name["a_again"].skipped
    assert by_name["a_third"].ok and by_name["a_third"].copied_from in ("a", "a_again")
    assert again.stats["this process"]["predictions"] == 0


def test_a_twin_whose_source_failed_is_predicted_itself(twin_sets, tiny_params, tmp_path,
                                                        settings):
    """A damaged feature file fails only its own target: the twins do not inherit it."""
    from parafold.engine.devices import predict_on

    (twin_sets[0].path / "features.npz").write_bytes(b"not an npz")
    out = tmp_path / "out"
    result = predict_on((), twin_sets, out, params_dir=tiny_params, settings=settings)
    by_name = {o.name: o for o in result.outcomes}
    assert not by_name["a"].ok and "a" in by_name["a"].error
    assert by_name["a_again"].ok and by_name["a_again"].copied_from is None
    assert by_name["a_third"].ok and by_name["a_third"].copied_from == "a_again"
    assert result.stats["this process (second pass)"]["predictions"] == 1
    assert not (out / "a" / DONE_FILE).exists()


def test_predict_cli_says_which_targets_were_copied(twin_sets, tiny_params, tmp_path):
    from typer.testing import CliRunner

    from parafold.cli import app

    res = CliRunner().invoke(app, [
        "predict", str(twin_sets[0].path.parent), "-o", str(tmp_path / "out"),
        "--params-dir", str(tiny_params), "--models", "1", "--num-recycle", "0",
        "--float32", "--config", "tiny", "--no-compile-cache"])
    assert res.exit_code == 0, res.output
    assert "a_again\t24\tok (same features as a: its prediction copied)" in res.output
    assert "4/4 targets ok" in res.output
    rows = _results_rows(tmp_path / "out")
    assert sorted(rows) == ["a", "a_again", "a_third", "b"]
    assert rows["a_again"]["plddt"] == rows["a"]["plddt"] != ""
    assert rows["a_again"]["ranked_pdb"] == "a_again/ranked_0.pdb"
    assert [rows[n]["copied_from"] for n in ("a", "a_again", "a_third", "b")] == [
        "", "a", "a", ""]


def test_a_rerun_with_other_model_settings_predicts_again(twin_sets, tiny_params, tmp_path,
                                                         settings, caplog):
    """A prediction records what it was made with; `predict` into the same OUT with other
    settings (here more recycles) predicts again instead of taking the old files for done,
    with the same settings nothing; copies record their source's; a folder from an older
    parafold, recording nothing, counts as done."""
    import logging

    from parafold.engine.devices import predict_on
    from parafold.fold.outputs import SETTINGS_KEY

    out = tmp_path / "out"

    def predict(model_settings: ModelSettings) -> int:
        result = predict_on((), twin_sets, out, params_dir=tiny_params,
                            settings=model_settings)
        assert all(o.ok for o in result.outcomes), [o.error for o in result.outcomes]
        return result.stats["this process"]["predictions"]

    def made() -> dict[str, str]:
        return {fs.name: json.loads((out / fs.name / "timings.json").read_text())[SETTINGS_KEY]
                for fs in twin_sets}

    assert predict(settings) == 2
    first = made()
    assert len(set(first.values())) == 1  # the copies say what their source was made with
    assert predict(settings) == 0
    more = replace(settings, num_recycle=1)
    with caplog.at_level(logging.WARNING):
        assert predict(more) == 2
    assert "2 targets were predicted before with other model settings" in caplog.text
    assert set(made().values()) != set(first.values()) and len(set(made().values())) == 1
    assert predict(more) == 0
    for fs in twin_sets:  # as an older parafold left them: no record, taken as done
        timings = json.loads((out / fs.name / "timings.json").read_text())
        del timings[SETTINGS_KEY]
        (out / fs.name / "timings.json").write_text(json.dumps(timings))
    assert predict(settings) == 0


@pytest.mark.timeout(300)  # a run waiting for a fold worker that never starts fails here
def test_run_predicts_twins_once_and_reuses_predictions_across_runs(tiny_params, tmp_path,
                                                                     monkeypatch, settings):
    """`parafold run` (single-sequence mode, the real tiny model): a FASTA repeating one
    sequence under three ids predicts it once, and the ledger says where each copy came from;
    a rerun copies a lost copy again; a second sample with its own OUT and the same
    --cache-dir predicts only the protein the first did not have. Before each run, `run
    --dry-run`'s preview says what it then does, and writes nothing."""
    from parafold.fold.synthetic import random_sequence
    from parafold.ledger import Ledger
    from parafold.pipeline import RunSettings, preview_run, run_pipeline
    from parafold.search.settings import SearchSettings

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    rng = np.random.default_rng(3)
    seq_a, seq_b = random_sequence(26, rng), random_sequence(23, rng)
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">a\n{seq_a}\n>b\n{seq_b}\n>a2 same as a\n{seq_a}\n>a3\n{seq_a.lower()}\n")
    out = tmp_path / "out"
    run_settings = RunSettings(input=fasta, out=out, params_dir=tiny_params,
                               search=SearchSettings(msa_mode="single_sequence"),
                               model=settings, cache_dir=tmp_path / "shared-cache", cpus=2,
                               cpus_per_search=1, max_wait_s=1.0, progress=False, plots=False)

    def preview(settings: RunSettings) -> tuple[int, ...]:
        p = preview_run(settings)
        return (p.done, p.features_in_out, p.features_in_cache, p.to_search, p.searches,
                p.to_predict, p.copies)

    # (done, features in OUT, in the cache, to search, distinct searches, to predict, copies)
    assert preview(run_settings) == (0, 0, 0, 4, 2, 2, 2)
    first = preview_run(run_settings)  # no features yet: no shapes to plan
    assert first.gpu_plan.targets == 0 and first.gpu_unplanned == 2
    assert not any("GPU stage" in line for line in first.lines())
    assert not out.exists() and not (tmp_path / "shared-cache").exists()
    summary = run_pipeline(run_settings)

    assert summary.exit_code == 0, summary.lines()
    assert (summary.done, summary.predicted, summary.copied) == (4, 2, 2), summary.lines()
    assert "2 predicted, 2 copied from identical targets" in summary.lines()[0]
    with Ledger(out, readonly=True) as ledger:
        predicted = sorted(e.target for e in ledger.events("predict"))
        # whichever of a, a2, a3 had its features first (their searches run side by side)
        # is the source; the others are copies of it
        assert len(predicted) == 2 and "b" in predicted, predicted
        source = next(n for n in predicted if n != "b")
        twins = sorted({"a", "a2", "a3"} - {source})
        for twin in twins:
            rec = ledger.get(twin)
            assert rec.state is State.DONE
            assert rec.timings["predict"]["copied_from"] == source
            assert rec.timings["predict"]["mean_plddt"] == pytest.approx(
                ledger.get(source).timings["predict"]["mean_plddt"], abs=1e-3)
    assert {n: r["copied_from"] for n, r in _results_rows(out).items()} == {
        source: "", "b": "", **dict.fromkeys(twins, source)}
    for twin in twins:
        got, original = _files(out / twin), _files(out / source)
        copied = [n for n in original if is_prediction_file(n) and not n.endswith(".cif")]
        assert "ranked_0.pdb" in copied and "pae_model_1_ptm.json" in copied
        for name in copied:
            assert got[name] == original[name], (twin, name)

    (out / twins[-1] / DONE_FILE).unlink()  # a copy lost: the rerun copies it from the source
    assert preview(run_settings) == (3, 1, 0, 0, 0, 0, 1)
    again = run_pipeline(run_settings)
    assert again.exit_code == 0, again.lines()
    assert (again.predicted, again.copied) == (0, 1), again.lines()
    assert (out / twins[-1] / DONE_FILE).is_file()
    # lost again, and the source's ranked files damaged: the rerun has only a copy to make,
    # it fails, and the twin is predicted itself (fold workers start then; the run once hung)
    (out / twins[-1] / DONE_FILE).unlink()
    others = [source, *twins[:-1]]  # any done one of them may be taken as the source
    kept = {name: {f: (out / name / f).read_bytes() for f in ("ranked_0.pdb", "ranked_0.cif")}
            for name in others}
    for name in others:
        for file_name in kept[name]:
            (out / name / file_name).write_text("damaged\n")
    again = run_pipeline(run_settings)
    assert again.exit_code == 0, again.lines()
    assert (again.predicted, again.copied) == (1, 0), again.lines()
    assert (out / twins[-1] / "unrelaxed_model_1_ptm.pdb").is_file()
    for name in others:
        for file_name, data in kept[name].items():
            (out / name / file_name).write_bytes(data)
    # folders cleaned up in part are no finished predictions: copied again from the whole one
    for name in others:
        (out / name / "unrelaxed_model_1_ptm.pdb").unlink()
    again = run_pipeline(run_settings)
    assert again.exit_code == 0, again.lines()
    assert (again.predicted, again.copied) == (0, len(others)), again.lines()
    assert all((out / name / "unrelaxed_model_1_ptm.pdb").is_file() for name in others)

    sample2 = tmp_path / "sample2.fasta"
    sample2.write_text(f">x\n{seq_a}\n>z\n{random_sequence(22, rng)}\n")
    assert preview(replace(run_settings, input=sample2, out=tmp_path / "out2")) == (
        0, 0, 1, 1, 1, 1, 1)
    assert not (tmp_path / "out2").exists()
    other = run_pipeline(replace(run_settings, input=sample2, out=tmp_path / "out2"))
    assert other.exit_code == 0, other.lines()
    assert (other.predicted, other.copied) == (1, 1), other.lines()
    # x's features came from the shared cache: no search, and the summary says so
    assert (other.searched, other.from_cache) == (1, 1), other.lines()
    assert "1 searched, 1 features from the cache and 1 predicted" in other.lines()[0]
    with Ledger(tmp_path / "out2", readonly=True) as ledger:
        assert ledger.get("x").timings["predict"]["copied_from"] in {
            str((out / name).resolve()) for name in ("a", "a2", "a3")}
        assert [e.target for e in ledger.events("predict")] == ["z"]
    assert (tmp_path / "out2" / "x" / "ranked_0.pdb").read_bytes() == (
        out / source / "ranked_0.pdb").read_bytes()
    # z's prediction lost, its features kept: the preview plans its GPU stage
    (tmp_path / "out2" / "z" / DONE_FILE).unlink()
    lost = preview_run(replace(run_settings, input=sample2, out=tmp_path / "out2"))
    assert (lost.to_predict, lost.gpu_unplanned) == (1, 0)
    assert (lost.gpu_plan.targets, lost.gpu_plan.shapes, lost.gpu_plan.executables) == (1, 1, 1)
    text = "\n".join(lost.lines())
    assert "GPU stage of the 1 to predict whose features exist:" in text
    assert "executables to compile for all models: 1" in text and "proteins/hour" in text
    # the first OUT again with more recycles: its predictions are made again (once a
    # sequence), not taken for done, and the preview says so first
    more = replace(run_settings, model=replace(settings, num_recycle=1))
    assert preview(more) == (0, 4, 0, 0, 0, 2, 2)
    changed = run_pipeline(more)
    assert changed.exit_code == 0, changed.lines()
    assert (changed.predicted, changed.copied) == (2, 2), changed.lines()
    assert preview(more)[0] == 4 and preview(run_settings)[0] == 0


def test_the_scheduler_retries_a_failed_source_with_one_twin_then_fails_the_rest(tmp_path):
    """The first twin of a failed source is predicted itself; when it fails too, the others
    fail with its reason. A twin arriving after its source is done is copied at once."""
    from types import SimpleNamespace

    from parafold.engine.inline import InlineExecutor
    from parafold.engine.jobs import FoldBatchResult
    from parafold.engine.scheduler import Scheduler
    from parafold.inputs import Target
    from parafold.ledger import Ledger
    from parafold.pipeline import RunSettings
    from test_pipeline_multi_gpu import _FakeFoldWorker

    def finish(oks: dict[str, bool]) -> object:
        """Complete the newest batch: each target ok or failed with a reason naming it."""
        now = time.time()
        future = gpu0.batches[-1][1]
        future.set_result(FoldBatchResult(
            tuple(SimpleNamespace(name=n, ok=ok, timings={}, error=None if ok else f"{n}: broken")
                  for n, ok in oks.items()), "gpu0@test:1", now - 1, now))
        return future

    sets = {n: _set(n, "MKVLA" if n.startswith("a") else "MKVLW", "k" + n[0])
            for n in ("a", "a2", "a3", "b", "b2")}
    sets = {n: replace(fs, path=tmp_path / "features" / n) for n, fs in sets.items()}
    settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path / "out",
                           params_dir=tmp_path, search=None, model=SETTINGS, max_batch=4,
                           max_wait_s=0.0, plots=False)
    gpu0 = _FakeFoldWorker("gpu0")
    with Ledger(tmp_path / "out") as ledger:
        ledger.register([Target(n, n, fs.sequence) for n, fs in sets.items()])
        for n in sets:
            ledger.reconcile(n, State.FEATURES_READY)
        sched = Scheduler(settings, ledger, 1, InlineExecutor(), None, [],
                          [sets["a"], sets["a2"], sets["a3"], sets["b"]], total=5,
                          done_before=0)
        sched.idle = [gpu0]
        assert sorted(sched.ready) == ["a", "b"]  # a2, a3 wait for a

        sched._dispatch_folds()
        assert sorted(gpu0.batches[-1][0]) == ["a", "b"]
        sched._fold_finished(finish({"a": False, "b": True}))
        assert list(sched.ready) == ["a2"] and sched._parked == {"a2": [sets["a3"]]}
        # b is done: a twin arriving now is copied at once (inline here); b has no files in
        # this test, so the copy fails and b2 is predicted itself
        sched._admit(sets["b2"], time.time())
        assert list(sched.copying.values()) == [(sets["b2"], "b")] and "b2" not in sched.ready
        sched._copy_finished(next(iter(sched.copying)))
        assert "b2" in sched.ready and not sched.copying

        sched._dispatch_folds()
        assert sorted(gpu0.batches[-1][0]) == ["a2", "b2"]
        sched._fold_finished(finish({"a2": False, "b2": True}))
        rec = ledger.get("a3")
        assert rec.state is State.FAILED
        assert rec.error == "same features as a2, which failed: a2: broken"
        assert not sched.ready and not sched._parked and not sched._work_left()
        assert (sched.failed, sched.copied) == (3, 0)


def test_predict_shards_keep_a_source_and_its_twins_together(twin_sets, tiny_params, tmp_path):
    """Each task of a job array predicts its sources and copies their twins: no twin is
    predicted by another task."""
    from typer.testing import CliRunner

    from parafold.cli import app

    status: dict[str, str] = {}
    for k in range(2):
        res = CliRunner().invoke(app, [
            "predict", str(twin_sets[0].path.parent), "-o", str(tmp_path / "out"),
            "--params-dir", str(tiny_params), "--models", "1", "--num-recycle", "0",
            "--float32", "--config", "tiny", "--no-compile-cache", "--shard", f"{k}/2"])
        assert res.exit_code == 0, res.output
        for line in res.output.splitlines():
            name, _, state = (line.split("\t") + ["", ""])[:3]
            if name in {fs.name for fs in twin_sets}:
                assert name not in status, f"{name} in two shards"
                status[name] = state
    assert sorted(status) == ["a", "a_again", "a_third", "b"]
    assert status["a"] == status["b"] == "ok"
    assert status["a_again"] == status["a_third"] == (
        "ok (same features as a: its prediction copied)")


# --- predictions made before, in another OUT (`fold.reuse`) ---


def test_the_prediction_index_finds_only_a_folder_that_still_holds_the_prediction(tmp_path):
    from parafold.fold.params import params_path
    from parafold.fold.reuse import PredictionIndex

    params = tmp_path / "params"
    params_path(params, "model_1_ptm").parent.mkdir(parents=True)
    params_path(params, "model_1_ptm").write_bytes(b"weights")
    index = PredictionIndex.for_settings(tmp_path / "cache", SETTINGS, params)
    fs = _set("a", "MKVLA", "ka")
    folder = tmp_path / "out1" / "a"
    write_target_outputs(folder, "a", _predictions(12, seed=1), {}, save_raw=False)
    assert index.find(fs) is None  # nothing recorded yet
    index.record(fs, folder)
    assert index.find(fs) == folder.resolve()
    assert index.find(replace(fs, name="b")) == folder.resolve()  # another target, same content
    assert index.find(fs, not_in=folder) is None  # never a target's own folder
    assert index.find(_set("a", "MKVLA", "other-search")) is None
    assert index.find(_set("a", "MKVLA", "")) is None  # keyless: never reused
    for changed in (replace(SETTINGS, num_recycle=5), replace(SETTINGS, models=(2,)),
                    replace(SETTINGS, models_to_relax="best")):
        assert PredictionIndex.for_settings(tmp_path / "cache", changed, params).find(fs) is None
    staged = tmp_path / "node-local" / "params"  # copied for a job: new times, same bytes
    params_path(staged, "model_1_ptm").parent.mkdir(parents=True)
    params_path(staged, "model_1_ptm").write_bytes(b"weights")
    os.utime(params_path(staged, "model_1_ptm"), ns=(1, 1))
    assert PredictionIndex.for_settings(tmp_path / "cache", SETTINGS, staged).find(fs) == (
        folder.resolve())
    params_path(staged, "model_1_ptm").write_bytes(b"weightz")  # other weights, same size
    assert PredictionIndex.for_settings(tmp_path / "cache", SETTINGS, staged).find(fs) is None
    # the folder predicted again (another prediction there): the entry no longer holds
    write_target_outputs(folder, "a", _predictions(12, seed=2), {}, save_raw=False)
    assert index.find(fs) is None
    # a damaged entry is a miss; a cache that cannot be written is a warning, never an error
    index.record(fs, folder)
    next(index.root.rglob("*.json")).write_text("{not json")
    assert index.find(fs) is None
    unwritable = PredictionIndex(tmp_path / "out1" / "a" / DONE_FILE / "x", index.fingerprint)
    unwritable.record(fs, folder)


def test_a_prediction_relaxed_later_serves_only_runs_that_relax(tmp_path):
    """`parafold relax OUT` (or a rerun asking for relaxation) rewrites the ranked files and
    writes the relaxation marker, not the done marker: the entry made without relaxation no
    longer holds, so a run without relaxation predicts instead of copying relaxed files."""
    from parafold.fold.params import params_path
    from parafold.fold.reuse import PredictionIndex

    params = tmp_path / "params"
    params_path(params, "model_1_ptm").parent.mkdir(parents=True)
    params_path(params, "model_1_ptm").write_bytes(b"weights")
    plain = PredictionIndex.for_settings(tmp_path / "cache", SETTINGS, params)
    relaxing = PredictionIndex.for_settings(
        tmp_path / "cache", replace(SETTINGS, models_to_relax="best"), params)
    fs = _set("a", "MKVLA", "ka")
    folder = tmp_path / "out1" / "a"
    order = write_target_outputs(folder, "a", _predictions(12, seed=1), {}, save_raw=False)
    plain.record(fs, folder)
    assert plain.find(fs) == folder.resolve()
    # what relax_target leaves: the relaxed structure as ranked_0, the marker written last
    relaxed = "REMARK relaxed\n" + (folder / f"unrelaxed_{order[0]}.pdb").read_text()
    (folder / f"relaxed_{order[0]}.pdb").write_text(relaxed)
    (folder / "ranked_0.pdb").write_text(relaxed)
    (folder / RELAX_METRICS_FILE).write_text(json.dumps({order[0]: {"attempts": 1}}))
    relaxing.record(fs, folder)
    assert plain.find(fs) is None
    assert relaxing.find(fs) == folder.resolve()
    (folder / RELAX_METRICS_FILE).write_text(json.dumps({order[0]: {"attempts": 2}}))
    assert relaxing.find(fs) is None  # relaxed again since: not the recorded relaxation


def test_predict_copies_what_another_out_predicted_with_the_same_settings(twin_sets, tiny_params,
                                                                          tmp_path, settings):
    from parafold.engine.devices import predict_on

    settings = replace(settings, prediction_cache_dir=tmp_path / "shared-cache")
    first = predict_on((), twin_sets[:2], tmp_path / "out1", params_dir=tiny_params,
                       settings=settings)
    assert all(o.ok and o.copied_from is None for o in first.outcomes)

    second = predict_on((), twin_sets, tmp_path / "out2", params_dir=tiny_params,
                        settings=settings)
    by_name = {o.name: o for o in second.outcomes}
    assert all(o.ok for o in second.outcomes), [o.error for o in second.outcomes]
    assert second.stats["this process"]["predictions"] == 0  # nothing on the device
    for name, source in (("a", "a"), ("b", "b"), ("a_again", "a"), ("a_third", "a")):
        assert by_name[name].copied_from == str((tmp_path / "out1" / source).resolve())
        assert _files(tmp_path / "out2" / name)["ranked_0.pdb"] == \
            _files(tmp_path / "out1" / source)["ranked_0.pdb"]

    other = predict_on((), twin_sets[:1], tmp_path / "out3", params_dir=tiny_params,
                       settings=replace(settings, num_recycle=1))  # other settings: predicted
    assert other.outcomes[0].ok and other.outcomes[0].copied_from is None
    assert other.stats["this process"]["predictions"] == 1

    # a folder indexed but no longer whole (cleaned up in part): its targets are predicted in
    # the same pass, once for all the twins, instead of failing
    (tmp_path / "out1" / "a" / "ranked_0.pdb").unlink()
    third = predict_on((), twin_sets, tmp_path / "out4", params_dir=tiny_params,
                       settings=settings)
    by_name = {o.name: o for o in third.outcomes}
    assert all(o.ok for o in third.outcomes), [o.error for o in third.outcomes]
    assert third.stats["this process"]["predictions"] == 1
    assert by_name["a"].copied_from is None
    assert by_name["a_again"].copied_from == "a" and by_name["a_third"].copied_from == "a"
    assert by_name["b"].copied_from == str((tmp_path / "out1" / "b").resolve())


def test_twins_of_a_folder_changed_since_indexed_are_predicted_once(tmp_path):
    """Another OUT's prediction of these features, relaxed there (`parafold relax`) after it
    was indexed: the copies from it are refused, and of the identical targets one is
    predicted and the rest wait to copy it (each was predicted). Once one copy succeeded,
    the later twins copy from this OUT's folder, which no other process changes."""
    from parafold.engine.inline import InlineExecutor
    from parafold.engine.scheduler import Scheduler
    from parafold.inputs import Target
    from parafold.ledger import Ledger
    from parafold.pipeline import RunSettings
    from test_pipeline_multi_gpu import _FakeFoldWorker

    for copied_first in (False, True):
        root = tmp_path / str(copied_first)
        sets = {n: replace(_set(n, "MKVLA", "k"), path=root / "features" / n)
                for n in ("t1", "t2", "t3", "t4")}
        settings = RunSettings(input=root / "in.fasta", out=root / "out", params_dir=root,
                               search=None, model=SETTINGS, max_batch=8, max_wait_s=0.0,
                               plots=False)
        gpu0 = _FakeFoldWorker("gpu0")
        with Ledger(root / "out") as ledger:
            ledger.register([Target(n, n, fs.sequence) for n, fs in sets.items()])
            for n in sets:
                ledger.reconcile(n, State.FEATURES_READY)
            sched = Scheduler(settings, ledger, 1, InlineExecutor(), None, [], [], total=4,
                              done_before=0)
            sched.idle = [gpu0]
            other = root / "other_out" / "x"
            write_target_outputs(other, "x", _predictions(5, seed=1), {}, save_raw=False)
            sched.index.record(sets["t1"], other)
            names = ["t1", "t2", "t3", "t4"]
            if copied_first:
                sched._admit(sets["t1"], time.time())
                sched._copy_finished(next(iter(sched.copying)))
                names = names[1:]
            (other / RELAX_METRICS_FILE).write_text(json.dumps({}))  # relaxed there now
            for n in names:
                sched._admit(sets[n], time.time())
                while sched.copying:
                    sched._copy_finished(next(iter(sched.copying)))
            sched._dispatch_folds()
            predicted = sorted(n for batch, _ in gpu0.batches for n in batch)
            if copied_first:
                assert predicted == [] and sched.copied == 4, (predicted, sched.copied)
            else:
                assert predicted == ["t1"] and sched._parked == {
                    "t1": [sets["t2"], sets["t3"], sets["t4"]]}, (predicted, sched._parked)
