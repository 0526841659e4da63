"""`OUT/results.tsv`: exact cells from a real ledger and folders written by the stages' own
writers (feature set, GPU-stage outputs), flattened user text, and an atomic rewrite."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from parafold.cli import app
from parafold.featureset import write_feature_set
from parafold.inputs import Target
from parafold.ledger import Ledger
from parafold.report.html import write_report
from parafold.report.results_table import RESULTS_COLUMNS, RESULTS_FILE, write_results_table
from parafold.store import atomic_write_json

HBA_SEQ = "MVLSPADKTNVKAAWGKVGAHAGE"  # 24 residues
HEADER = "\t".join(RESULTS_COLUMNS)
HBA_LINE = ("hba\tsp|P69905|HBA_HUMAN\t24\t12\tdone\tmodel_2_ptm\t87.12\t0.6124\t31.75\t1"
            "\thba/ranked_0.pdb\t4.25\t3.500\t\t512.2\t\t2")
BAD_LINE = ("bad\tbad\t10\t\tfailed\t\t\t\t\t0\t\t\t\t"
            "[search] jackhmmer exited 1: line one line two  \t\t\t")
TABBED_LINE = "tabbed\tsp|X Y Z\t10\t\tqueued\t\t\t\t\t0\t\t\t\t\t\t\t"


def _predicted(folder: Path, target_id: str, sequence: str, *, relax_best: bool) -> None:
    """A target folder as `features` then `predict` leave it: model_2_ptm (pLDDT 87.123, pTM
    0.61237, max PAE 31.75) ranks above model_1_ptm; optionally the best one relaxed."""
    from parafold.fold.outputs import Prediction, write_target_outputs
    from parafold.fold.synthetic import make_features

    write_feature_set(folder, name=folder.name, target_id=target_id,
                      features=make_features(sequence, 12, num_templates=2))
    rng = np.random.default_rng(0)
    length = len(sequence)
    preds = []
    for model, plddt, ptm, max_pae in (("model_1_ptm", 70.0, 0.3, 12.0),
                                       ("model_2_ptm", 87.123, 0.61237, 31.75)):
        result = {"plddt": np.full(length, plddt), "ptm": np.float32(ptm),
                  "predicted_aligned_error": rng.uniform(0, max_pae, (length, length)),
                  "max_predicted_aligned_error": np.float32(max_pae),
                  "structure_module": {"final_atom_positions": rng.normal(0, 10, (length, 37, 3)),
                                       "final_atom_mask": np.ones((length, 37))}}
        preds.append(Prediction(name=model, model_name=model, seed=0, result=result,
                                aatype=rng.integers(0, 20, length),
                                residue_index=np.arange(length), timings={}))
    write_target_outputs(folder, folder.name, preds, {}, save_raw=False)
    if relax_best:  # what `parafold.relax` leaves: the structure, then the metrics entry
        shutil.copy(folder / "unrelaxed_model_2_ptm.pdb", folder / "relaxed_model_2_ptm.pdb")
        atomic_write_json(folder / "relax_metrics.json", {"model_2_ptm": {"rmsd": 0.1}})


@pytest.fixture()
def run_out(tmp_path: Path) -> Path:
    """A run's OUT: `hba` done (id from the input, relaxed), `bad` failed in the search with
    a tab and newlines in its error, `tabbed` queued with a tab and newline in its id."""
    out = tmp_path / "out"
    hba = Target("sp|P69905|HBA_HUMAN", "hba", HBA_SEQ)
    bad = Target("bad", "bad", "MKTAYIAKQR")
    tabbed = Target("sp|X\tY\nZ", "tabbed", "MKTAYIAKQR")
    with Ledger(out) as ledger:
        run_id = ledger.begin_run({})
        ledger.register([hba, bad, tabbed], run_id=run_id)
        ledger.start_search("hba")
        ledger.add_event(run_id=run_id, worker="cpu-0", kind="search", target="hba",
                         start=100.0, end=104.25, ok=True)
        _predicted(out / "hba", hba.id, HBA_SEQ, relax_best=True)
        ledger.features_ready("hba", {"max_rss_mib": 512.25})
        ledger.start_predict(["hba"])
        ledger.done("hba", {"predict_model_1_ptm": 1.5, "predict_model_2_ptm": 2.0})
        ledger.start_search("bad")
        ledger.fail("bad", "search", "jackhmmer exited 1:\tline one\nline two\r\n")
        ledger.end_run(run_id, 1)
    return out


def test_cells_of_done_failed_and_queued_targets(run_out: Path) -> None:
    path = write_results_table(run_out)
    assert path == run_out / RESULTS_FILE
    assert path.read_text(encoding="utf-8").split("\n") == [
        HEADER, BAD_LINE, HBA_LINE, TABBED_LINE, ""]


def test_report_writes_the_table_beside_the_page(run_out: Path) -> None:
    write_report(run_out, plots=False)
    lines = (run_out / RESULTS_FILE).read_text(encoding="utf-8").splitlines()
    assert lines == [HEADER, BAD_LINE, HBA_LINE, TABBED_LINE]
    assert all(line.count("\t") == len(RESULTS_COLUMNS) - 1 for line in lines)


def _hba_cells(out: Path) -> dict[str, str]:
    write_results_table(out)
    cells = (out / RESULTS_FILE).read_text(encoding="utf-8").splitlines()[2].split("\t")
    return dict(zip(RESULTS_COLUMNS, cells, strict=True))


def test_relaxed_is_the_best_models_relaxation_as_relax_counts_it(run_out: Path) -> None:
    """Another model's entry is not the best model's; an entry whose relaxed structure is
    gone is no relaxation (`parafold relax` redoes it)."""
    hba = run_out / "hba"
    atomic_write_json(hba / "relax_metrics.json", {"model_1_ptm": {"rmsd": 0.1}})
    assert _hba_cells(run_out)["relaxed"] == "0"
    atomic_write_json(hba / "relax_metrics.json", {"model_2_ptm": {"rmsd": 0.1}})
    assert _hba_cells(run_out)["relaxed"] == "1"
    (hba / "relaxed_model_2_ptm.pdb").unlink()
    assert _hba_cells(run_out)["relaxed"] == "0"


def test_a_missing_ranked_pdb_is_an_empty_cell(run_out: Path) -> None:
    (run_out / "hba" / "ranked_0.pdb").unlink()
    row = _hba_cells(run_out)
    assert (row["name"], row["state"], row["ranked_pdb"]) == ("hba", "done", "")


def test_a_failed_target_without_its_done_marker_has_no_ranked_pdb(run_out: Path) -> None:
    """Its sequence changed (the marker removed), then the new search failed: the folder's
    ranked_0.pdb is the old sequence's, not this target's result."""
    (run_out / "hba" / "ranking_debug.json").unlink()
    with Ledger(run_out) as ledger:
        run_id = ledger.begin_run({})
        ledger.register([Target("sp|P69905|HBA_HUMAN", "hba", "MKTAYIAKQR")], run_id=run_id)
        ledger.start_search("hba")
        ledger.fail("hba", "search", "jackhmmer died")
        ledger.end_run(run_id, 1)
    row = _hba_cells(run_out)
    assert (row["state"], row["ranked_pdb"], row["best_model"]) == ("failed", "", "")


def test_without_a_ledger_the_id_comes_from_the_features_manifest(tmp_path: Path) -> None:
    _predicted(tmp_path / "t1", "my\tprotein\r\n1", "MKTAYIAKQRQISF", relax_best=False)
    write_results_table(tmp_path)
    assert (tmp_path / RESULTS_FILE).read_text(encoding="utf-8").splitlines()[1] == (
        "t1\tmy protein  1\t14\t12\tdone\tmodel_2_ptm\t87.12\t0.6124\t31.75\t0"
        "\tt1/ranked_0.pdb\t\t\t\t\t\t2")


def test_a_killed_rewrite_keeps_the_old_table_and_leaves_no_temp_file(
        run_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_results_table(run_out)
    before = (run_out / RESULTS_FILE).read_bytes()
    shutil.rmtree(run_out / "hba")  # the next table would differ

    def killed(fd: int) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(OSError, match="killed mid-write"):
        write_results_table(run_out)
    assert (run_out / RESULTS_FILE).read_bytes() == before
    monkeypatch.undo()
    write_results_table(run_out)
    assert (run_out / RESULTS_FILE).read_bytes() != before
    assert sorted(p.name for p in run_out.iterdir() if "results" in p.name) == [RESULTS_FILE]


def test_a_table_that_cannot_be_written_does_not_fail_the_report(
        run_out: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import parafold.report.html as html

    def refuse(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(html, "write_results_table", refuse)
    with caplog.at_level(logging.ERROR):
        page = write_report(run_out, plots=False)
    assert page.is_file() and not (run_out / RESULTS_FILE).exists()
    assert "could not write the results table" in caplog.text and "disk full" in caplog.text


def test_report_command_writes_results_tsv(run_out: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(run_out), "--no-plots"])
    assert res.exit_code == 0, res.output
    assert f"results: {run_out / RESULTS_FILE}" in res.output
    assert (run_out / RESULTS_FILE).read_text(encoding="utf-8").splitlines() == [
        HEADER, BAD_LINE, HBA_LINE, TABBED_LINE]


def test_predict_writes_results_tsv_with_its_failures(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`predict` has no ledger: rows from OUT's folders, ids and failures from the call (the
    fold worker is a stub that writes `ok` with the GPU stage's writer and fails `broken`)."""
    import parafold.fold.worker as worker
    from parafold.fold.synthetic import make_features

    class StubWorker:
        stats: dict[str, object] = {"compiles": 0}

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> StubWorker:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def load_params(self) -> None:
            pass

        def fold(self, sets, out):
            outcomes = []
            for fs in sets:
                ok = fs.name == "ok"
                if ok:
                    _predicted(Path(out) / fs.name, "ignored", fs.sequence, relax_best=False)
                    (Path(out) / fs.name / "features.json").unlink()  # predict's OUT has none
                outcomes.append(SimpleNamespace(name=fs.name, length=fs.length, ok=ok,
                                                skipped=False, copied_from=None,
                                                error=None if ok else "OOM:\tshape\n(512, 512)"))
            return outcomes

    monkeypatch.setattr(worker, "FoldWorker", StubWorker)
    for name, target_id, seq in (("ok", "sp|OK1", "MKTAYIAKQR"),
                                 ("broken", "sp|BAD\t2", "MKTAYIAKQRQISF")):
        write_feature_set(tmp_path / "feats" / name, name=name, target_id=target_id,
                          features=make_features(seq, 4))
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "feats"), "-o", str(tmp_path / "o"),
                                   "--params-dir", str(tmp_path), "--config", "tiny",
                                   "--no-compile-cache", "--gpus", "none"])
    assert res.exit_code == 1, res.output  # a target failed
    assert f"results: {tmp_path / 'o' / RESULTS_FILE}" in res.output
    table = [
        HEADER,
        "broken\tsp|BAD 2\t14\t4\tfailed\t\t\t\t\t0\t\t\t\tOOM: shape (512, 512)\t\t\t0",
        "ok\tsp|OK1\t10\t4\tdone\tmodel_2_ptm\t87.12\t0.6124\t31.75\t0\tok/ranked_0.pdb"
        "\t\t\t\t\t\t0",
    ]
    assert (tmp_path / "o" / RESULTS_FILE).read_text(encoding="utf-8").splitlines() == table
    # `report` later, from the folders alone (no ledger, no manifests, no folder for `broken`):
    # what only predict knew is kept
    write_report(tmp_path / "o", plots=False)
    assert (tmp_path / "o" / RESULTS_FILE).read_text(encoding="utf-8").splitlines() == table


def test_a_double_quote_in_an_id_or_error_keeps_every_line(tmp_path: Path) -> None:
    """A record id starting with `"` made pandas fail and Python's csv merge the lines after
    it: such cells are quoted as CSV readers expect, and read back as written (also by the
    next table of a `predict` OUT, which keeps what only this one knew)."""
    import csv
    import io

    from parafold.report.collect import _Row

    rows = {"q": _Row("q", target_id='"quoted', state="failed", error='bad "x"\tthere'),
            "r": _Row("r", target_id="r", state="queued"),
            "s": _Row("s", target_id='say "hi"', state="queued")}
    path = write_results_table(tmp_path, rows)

    def read() -> list[tuple[str, str, str, str]]:
        text = path.read_text(encoding="utf-8")
        return [(r["name"], r["id"], r["state"], r["error"])
                for r in csv.DictReader(io.StringIO(text), delimiter="\t")]

    assert read() == [("q", '"quoted', "failed", 'bad "x" there'), ("r", "r", "queued", ""),
                      ("s", 'say "hi"', "queued", "")]
    assert path.read_text(encoding="utf-8").splitlines()[2] == "r\tr" + "\t" * 3 + "queued" + (
        "\t\t\t\t\t0" + "\t" * 7)
    write_results_table(tmp_path, {})  # no ledger: the failed row is known from the table
    assert read() == [("q", '"quoted', "failed", 'bad "x" there')]


def test_a_target_dropped_from_the_input_unfinished_is_removed_not_searching(tmp_path: Path
                                                                            ) -> None:
    """A run killed while `b` was searching, then rerun without `b` in its input: no run
    works on `b`, so the table and the report say `removed`, not `searching` (a script
    waiting for it would wait for ever); a finished target of an earlier input stays done."""
    from parafold.report.collect import collect_run

    out = tmp_path / "out"
    a, b, c = (Target(n, n, "MKTAYIAKQR") for n in ("a", "b", "c"))
    with Ledger(out) as ledger:
        first = ledger.begin_run({})
        ledger.register([a, b, c], run_id=first)
        ledger.start_search("b")
        ledger.start_search("c")
        ledger.features_ready("c", {})
        ledger.start_predict(["c"])
        ledger.done("c", {})
        second = ledger.begin_run({})  # the first was killed: never ended
        ledger.register([a], run_id=second)
        ledger.end_run(second, 0)
    write_results_table(out)
    import csv
    import io

    rows = {r["name"]: r["state"] for r in csv.DictReader(
        io.StringIO((out / RESULTS_FILE).read_text(encoding="utf-8")), delimiter="\t")}
    assert rows == {"a": "queued", "b": "removed", "c": "done"}
    page = collect_run(out)
    assert page["summary"]["states"] == {"queued": 1, "removed": 1, "done": 1}
