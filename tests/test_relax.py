"""Amber relaxation (`parafold.relax`), with AlphaFold's relaxation code and OpenMM on the CPU:
the files AlphaFold writes, resume without redoing a model, stale relaxations removed by a new
prediction, errors named per target, the relax-only path of `predict` and `run`, and the
`parafold relax` stage. Structures come from the real tiny model on random weights (short
proteins: one relaxation takes a few seconds)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from parafold.cli import app
from parafold.featureset import write_feature_set
from parafold.fold.settings import ModelSettings
from parafold.relax import RELAX_METRICS_FILE, RelaxError, relax_pending, relax_target

SETTINGS = ModelSettings(config_size="tiny", models=(1,), num_seeds=2, num_recycle=0,
                         float32=True, compile_ahead=0)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_params):
    """Two targets predicted (two seeds each: two predictions to rank), nothing relaxed."""
    from parafold.fold.synthetic import make_features, random_sequence
    from parafold.fold.worker import FoldWorker

    root = tmp_path_factory.mktemp("relax")
    rng = np.random.default_rng(7)
    sets = [write_feature_set(root / "features" / name, name=name, target_id=name,
                              features=make_features(random_sequence(length, rng), 8, seed=i),
                              key=f"search-key-{i}")  # content keys: indexable predictions
            for i, (name, length) in enumerate((("t22", 22), ("t20", 20)))]
    with FoldWorker(tiny_params, SETTINGS) as worker:
        outcomes = worker.fold(sets, root / "out")
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    return root, sets


def _copy(predicted, tmp_path: Path) -> Path:
    root, _ = predicted
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    return out


def _order(folder: Path) -> list[str]:
    return json.loads((folder / "ranking_debug.json").read_text())["order"]


def _heavy_atoms(pdb: str) -> list[tuple[str, str, str]]:
    """(residue number, residue name, atom name) of every non-hydrogen atom line."""
    return [(line[22:26].strip(), line[17:20], line[12:16].strip()) for line in pdb.splitlines()
            if line.startswith("ATOM") and line[76:78].strip() != "H" and
            line[12:16].strip() != "OXT"]


def test_best_is_relaxed_into_alphafolds_files(predicted, tmp_path):
    from Bio.PDB import MMCIFParser

    folder = _copy(predicted, tmp_path) / "t22"
    best, second = _order(folder)
    outcome = relax_target(folder, "best")
    assert outcome.relaxed == (best,) and outcome.already == ()

    relaxed = (folder / f"relaxed_{best}.pdb").read_text()
    unrelaxed = (folder / f"unrelaxed_{best}.pdb").read_text()
    assert not (folder / f"relaxed_{second}.pdb").exists()
    # the ranked files of the best prediction are the relaxed structure (with hydrogens, as
    # AlphaFold writes it); the other prediction's stay unrelaxed
    assert (folder / "ranked_0.pdb").read_text() == relaxed
    assert (folder / "ranked_1.pdb").read_text() == (folder / f"unrelaxed_{second}.pdb").read_text()
    assert any(line[76:78].strip() == "H" for line in relaxed.splitlines() if line.startswith("ATOM"))
    assert _heavy_atoms(relaxed) == _heavy_atoms(unrelaxed)
    # pLDDT stays in the B-factor column, per residue
    plddt = json.loads((folder / f"scores_{best}.json").read_text())["plddt"]
    ca = [float(line[60:66]) for line in relaxed.splitlines()
          if line.startswith("ATOM") and line[12:16].strip() == "CA"]
    assert np.allclose(ca, plddt, atol=0.01)
    structure = MMCIFParser(QUIET=True).get_structure("t", str(folder / "ranked_0.cif"))
    assert len(list(structure.get_residues())) == 22
    coords = np.array([a.coord for a in structure.get_atoms() if a.get_id() == "CA"])
    relaxed_ca = np.array([[float(line[30:38]), float(line[38:46]), float(line[46:54])]
                           for line in relaxed.splitlines()
                           if line.startswith("ATOM") and line[12:16].strip() == "CA"])
    assert np.allclose(coords, relaxed_ca, atol=0.001)

    metrics = json.loads((folder / RELAX_METRICS_FILE).read_text())
    assert set(metrics) == {best}
    entry = metrics[best]
    assert len(entry["remaining_violations"]) == 22
    assert entry["remaining_violations_count"] == sum(entry["remaining_violations"])
    # OpenMM's minimizer on a random-weights structure (energies ~1e11) can end above where
    # its last attempt started (its constraints are applied after it stops; seen in 1 of 4
    # runs here): what holds is that it moved the atoms and reports finite energies
    assert np.isfinite([entry["initial_energy"], entry["final_energy"]]).all()
    assert entry["rmsd"] > 0 and entry["attempts"] >= 1
    timings = json.loads((folder / "timings.json").read_text())
    assert timings[f"relax_{best}"] > 0 and f"predict_{best}" in timings
    assert not relax_pending(folder, "best") and relax_pending(folder, "all")


def test_a_second_call_relaxes_only_what_is_missing(predicted, tmp_path):
    folder = _copy(predicted, tmp_path) / "t20"
    best, second = _order(folder)
    relax_target(folder, "best")
    best_file = folder / f"relaxed_{best}.pdb"
    stamp = best_file.stat().st_mtime_ns

    outcome = relax_target(folder, "all")
    assert outcome.relaxed == (second,) and outcome.already == (best,)
    assert best_file.stat().st_mtime_ns == stamp
    assert (folder / "ranked_1.pdb").read_text() == (folder / f"relaxed_{second}.pdb").read_text()
    assert set(json.loads((folder / RELAX_METRICS_FILE).read_text())) == {best, second}

    again = relax_target(folder, "all")
    assert again.relaxed == () and again.already == (best, second)
    # a relaxed file without its metrics entry (killed before the marker): done again
    metrics = json.loads((folder / RELAX_METRICS_FILE).read_text())
    del metrics[second]
    (folder / RELAX_METRICS_FILE).write_text(json.dumps(metrics))
    assert relax_target(folder, "all").relaxed == (second,)


def test_a_failure_keeps_the_models_relaxed_before_it(predicted, tmp_path, monkeypatch):
    import parafold.relax as relax_module

    folder = _copy(predicted, tmp_path) / "t20"
    best, second = _order(folder)
    real = relax_module._relaxer
    made = []

    class Exploding:
        def process(self, *, prot):
            raise RuntimeError("OpenMM exploded")

    def relaxer():
        made.append(1)
        return real() if len(made) == 1 else Exploding()

    monkeypatch.setattr(relax_module, "_relaxer", relaxer)
    with pytest.raises(RelaxError, match=f"t20: relaxing {second} failed: RuntimeError"):
        relax_target(folder, "all")
    assert set(json.loads((folder / RELAX_METRICS_FILE).read_text())) == {best}
    assert (folder / "ranked_0.pdb").read_text() == (folder / f"relaxed_{best}.pdb").read_text()
    monkeypatch.undo()
    assert relax_target(folder, "all").relaxed == (second,)


def test_errors_name_the_target_and_the_file(predicted, tmp_path):
    out = _copy(predicted, tmp_path)
    with pytest.raises(RelaxError, match="t22: not predicted yet"):
        (out / "t22" / "ranking_debug.json").unlink()
        relax_target(out / "t22", "best")
    best = _order(out / "t20")[0]
    (out / "t20" / f"unrelaxed_{best}.pdb").write_text("not a structure\n")
    with pytest.raises(RelaxError, match=f"t20: cannot read unrelaxed_{best}.pdb"):
        relax_target(out / "t20", "best")
    ranking = out / "t20" / "ranking_debug.json"
    ranking.write_text(json.dumps({"order": ["../../t22/unrelaxed_x"]}))
    with pytest.raises(RelaxError, match="unexpected prediction name"):
        relax_target(out / "t20", "best")


def test_predict_relaxes_and_a_rerun_relaxes_without_predicting(predicted, tiny_params,
                                                                tmp_path, monkeypatch):
    """A relaxation that fails fails its target but keeps the prediction; the rerun relaxes
    only, and records the relaxed prediction in the prediction index (for runs with these
    settings to copy). A new prediction of a target removes its old relaxation."""
    import parafold.relax as relax_module
    from parafold.fold.reuse import PredictionIndex
    from parafold.fold.worker import FoldWorker

    _, sets = predicted
    out = tmp_path / "out"

    class Exploding:
        def process(self, *, prot):
            raise RuntimeError("OpenMM exploded")

    monkeypatch.setattr(relax_module, "_relaxer", lambda: Exploding())
    settings = replace(SETTINGS, models_to_relax="best", prediction_cache_dir=tmp_path / "idx")
    index = PredictionIndex.for_settings(tmp_path / "idx", settings, tiny_params)
    with FoldWorker(tiny_params, settings) as worker:
        first = worker.fold(sets[:1], out)
        assert not first[0].ok and index.find(sets[0]) is None
        assert "t22: relaxing" in first[0].error and "OpenMM exploded" in first[0].error
        folder = out / "t22"
        assert (folder / "ranking_debug.json").is_file()  # the prediction is kept
        assert (folder / "ranked_0.pdb").read_text() == \
            (folder / f"unrelaxed_{_order(folder)[0]}.pdb").read_text()
        predicted_at = (folder / "ranking_debug.json").stat().st_mtime_ns

        monkeypatch.undo()
        again = worker.fold(sets[:1], out)
        assert again[0].ok and again[0].skipped, again[0].error
        assert again[0].relaxed == (_order(folder)[0],)
        assert worker.stats["predictions"] == 2  # the first call's two seeds, no more
        assert (folder / "ranking_debug.json").stat().st_mtime_ns == predicted_at
        assert not relax_pending(folder, "best")
        assert index.find(sets[0]) == folder.resolve()

    (folder / "ranking_debug.json").unlink()  # predicted again, now without relaxation
    with FoldWorker(tiny_params, SETTINGS) as worker:
        assert worker.fold(sets[:1], out)[0].ok
    assert not list(folder.glob("relaxed_*.pdb")) and not (folder / RELAX_METRICS_FILE).exists()


def test_relax_command_relaxes_each_target_and_names_failures(predicted, tmp_path):
    out = _copy(predicted, tmp_path)
    best = _order(out / "t20")[0]
    (out / "t20" / f"unrelaxed_{best}.pdb").write_text("not a structure\n")
    (out / "t9").mkdir()
    (out / "t9" / "features.json").write_text("{}")  # a target not predicted yet

    from parafold.report import write_results_table

    def relaxed_column() -> dict[str, str]:
        lines = [line.split("\t") for line in (out / "results.tsv").read_text().splitlines()]
        column = lines[0].index("relaxed")
        return {cells[0]: cells[column] for cells in lines[1:]}

    write_results_table(out)  # as predict leaves it
    assert relaxed_column()["t22"] == "0"
    res = CliRunner().invoke(app, ["relax", str(out), "--cpus", "2"])
    assert res.exit_code == 1, res.output
    assert "t20\tFAILED: t20: cannot read" in res.output
    assert "t22\trelaxed model_1_ptm_pred_" in res.output
    assert "1 target folder(s) not predicted yet, left alone: t9" in res.output
    assert "1/2 targets relaxed" in res.output
    assert not relax_pending(out / "t22", "best")
    assert relaxed_column()["t22"] == "1" and relaxed_column()["t20"] == "0"

    res = CliRunner().invoke(app, ["relax", str(out / "t22"), "--cpus", "1"])
    assert res.exit_code == 0 and "t22\talready relaxed" in res.output, res.output
    res = CliRunner().invoke(app, ["relax", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no predicted targets" in res.output


def test_run_sends_a_predicted_but_unrelaxed_target_to_the_fold_worker(tmp_path, monkeypatch):
    """`run --models-to-relax` on a target a run without relaxation finished: not done, but
    ready (its features are there), so a fold worker relaxes it without predicting again."""
    import parafold.pipeline as pipeline
    from parafold.featureset import MANIFEST_FILE, FeatureSet
    from parafold.inputs import Target
    from parafold.ledger import Ledger
    from parafold.pipeline import RunSettings

    target = Target("t", "t", "MKVLAAGIVG")
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(json.dumps({"sequence": target.sequence, "key": "k"}))
    (folder / "ranking_debug.json").write_text(json.dumps({"order": ["model_1_ptm"]}))
    for name in ("ranked_0.pdb", "ranked_0.cif", "unrelaxed_model_1_ptm.pdb",
                 "scores_model_1_ptm.json"):  # what the done marker's order implies
        (folder / name).write_text("")
    monkeypatch.setattr(pipeline, "_expected_key", lambda *_: "k")
    features = FeatureSet(name="t", target_id="t", sequence=target.sequence, path=folder,
                          msa_depth=1, num_templates=0, key="k")
    monkeypatch.setattr(pipeline, "_usable_features", lambda t, f, k: features)
    for relax, expect_done in (("none", True), ("best", False)):
        settings = RunSettings(input=tmp_path / "in.fasta", out=tmp_path, params_dir=tmp_path,
                               search=None, model=ModelSettings(config_size="tiny", models=(1,),
                                                                models_to_relax=relax))
        with Ledger(tmp_path) as ledger:
            ledger.register([target])
            plan = pipeline._reconcile(ledger, [target], settings, databases=object())
        assert (plan.done == ["t"]) == expect_done and (len(plan.ready) == 1) != expect_done


def test_residues_after_an_unknown_one_keep_their_numbers(tmp_path, tiny_params):
    """An X (or U, B, Z, O) has no atoms, so it is in no PDB and OpenMM numbered the relaxed
    residues after it one lower; the relaxed files keep the prediction's numbering, and the
    relaxed mmCIF keeps a trailing X in its sequence, as the unrelaxed one does."""
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict

    from parafold.fold.synthetic import make_features
    from parafold.fold.worker import FoldWorker

    sequence = "MKVLAXGIVGKTAYIAKQRX"  # X at 6 and 20
    sets = [write_feature_set(tmp_path / "features" / "tx", name="tx", target_id="tx",
                              features=make_features(sequence, 8, seed=3))]
    settings = replace(SETTINGS, num_seeds=1)
    with FoldWorker(tiny_params, settings) as worker:
        outcomes = worker.fold(sets, tmp_path / "out")
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    folder = tmp_path / "out" / "tx"
    (model,) = _order(folder)
    unrelaxed_cif = MMCIF2Dict(str(folder / "ranked_0.cif"))
    relax_target(folder, "best")

    def numbers(pdb: str) -> list[tuple[str, str]]:
        return sorted({(line[22:26].strip(), line[17:20]) for line in pdb.splitlines()
                       if line.startswith("ATOM")}, key=lambda r: int(r[0]))

    relaxed = (folder / f"relaxed_{model}.pdb").read_text()
    unrelaxed = (folder / f"unrelaxed_{model}.pdb").read_text()
    assert numbers(relaxed) == numbers(unrelaxed)
    assert ("7", "GLY") in numbers(relaxed) and "6" not in dict(numbers(relaxed))
    relaxed_cif = MMCIF2Dict(str(folder / "ranked_0.cif"))
    seq = relaxed_cif["_entity_poly_seq.mon_id"]
    assert seq == unrelaxed_cif["_entity_poly_seq.mon_id"] and len(seq) == 20
    assert seq[5] == seq[19] == "UNK"
    assert sorted(set(map(int, relaxed_cif["_atom_site.label_seq_id"]))) == [
        i for i in range(1, 21) if i not in (6, 20)]


def test_a_structure_with_one_residue_with_atoms_says_why_it_is_not_relaxed(tmp_path):
    """All but one residue unknown (no atoms): AlphaFold's relaxer failed with a bare
    AttributeError; the error says what is wrong, and the unrelaxed files stay."""
    from parafold.fold.outputs import Prediction, write_target_outputs

    n = 6
    aatype = np.full(n, 20)
    aatype[2] = 0  # one alanine
    from alphafold.common import residue_constants as rc

    mask = rc.STANDARD_ATOM_MASK[aatype].astype(np.float32)
    result = {"plddt": np.full(n, 50.0), "ptm": np.float32(0.5),
              "predicted_aligned_error": np.ones((n, n)),
              "max_predicted_aligned_error": np.float32(31.75),
              "structure_module": {"final_atom_positions": np.random.default_rng(0).normal(
                  size=(n, 37, 3)) * 3, "final_atom_mask": mask}}
    pred = Prediction(name="model_1_ptm", model_name="model_1_ptm", seed=0, result=result,
                      aatype=aatype, residue_index=np.arange(n), timings={})
    folder = tmp_path / "onea"
    write_target_outputs(folder, "onea", [pred], {}, save_raw=False)
    with pytest.raises(RelaxError, match=r"cannot be relaxed: 1 of its residues have atoms"):
        relax_target(folder, "best")
    assert (folder / "ranked_0.pdb").is_file() and not (folder / RELAX_METRICS_FILE).exists()
