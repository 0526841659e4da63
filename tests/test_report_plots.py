"""Per-target plots: every file a target has inputs for exists and is a valid PNG; missing or
broken inputs mean a missing plot, never an exception."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parafold.report.plots import (
    COVERAGE_PNG,
    PAE_PNG,
    PLDDT_PNG,
    coverage_stats,
    plddt_of,
    plot_msa_coverage,
    plot_pae,
    plot_plddt,
    read_model_scores,
    write_target_plots,
)
from parafold.report.synthetic import make_synthetic_run


def _assert_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    assert path.is_file(), f"{path} missing"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
        # Not a blank canvas: a drawn plot has many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("out")
    return make_synthetic_run(out, n_targets=3, n_models=2, n_failed=1)


def test_every_plot_for_every_done_target(run) -> None:
    for name in run.done:
        written = write_target_plots(run.out / name)
        expected = {PLDDT_PNG, COVERAGE_PNG} | ({PAE_PNG} if name not in run.no_pae else set())
        assert {p.name for p in written} == expected
        for png in expected:
            _assert_png(run.out / name / png)
        # No temporary files left behind by the atomic writes.
        assert not list((run.out / name).glob(".*.part"))


def test_target_without_pae_gets_no_pae_plot(run) -> None:
    (name,) = run.no_pae
    write_target_plots(run.out / name)
    assert not (run.out / name / PAE_PNG).exists()
    assert (run.out / name / PLDDT_PNG).exists()


def test_models_come_in_ranking_order(run) -> None:
    folder = run.out / run.done[0]
    order = json.loads((folder / "ranking_debug.json").read_text())["order"]
    assert list(read_model_scores(folder)) == order


def test_empty_and_failed_folders_write_nothing(tmp_path: Path, run) -> None:
    assert write_target_plots(tmp_path) == []
    (failed,) = run.failed
    assert write_target_plots(run.out / failed) == []  # never created: no inputs at all


def test_broken_inputs_are_skipped_not_raised(tmp_path: Path, run) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(run.out / run.done[0], folder)
    for png in folder.glob("*.png"):
        png.unlink()
    for scores in folder.glob("scores_*.json"):
        scores.write_text("{not json")
    first_pae = sorted(folder.glob("pae_*.json"))[0]
    first_pae.write_text(json.dumps([{"predicted_aligned_error": [[1.0, 2.0]]}]))  # not square
    (folder / "features.npz").write_bytes(b"garbage")
    written = {p.name for p in write_target_plots(folder)}
    assert written == {PAE_PNG}  # the one intact PAE file still draws
    _assert_png(folder / PAE_PNG)


def test_scores_that_are_no_numbers_are_skipped_not_raised(tmp_path: Path, run) -> None:
    """A hand-edited or foreign scores file ("n/a", ragged rows) gives no pLDDT curve and no
    pLDDT plot; the target's other plots are still drawn."""
    assert plddt_of({"plddt": ["n/a", 50]}) is None
    assert plddt_of({"plddt": [[1, 2], [3]]}) is None
    assert plddt_of({"plddt": [[]]}) is None
    assert plddt_of({"plddt": [50, 70]}) is not None
    folder = tmp_path / "odd"
    shutil.copytree(run.out / run.done[0], folder)
    for png in folder.glob("*.png"):
        png.unlink()
    for i, scores in enumerate(sorted(folder.glob("scores_*.json"))):
        scores.write_text(json.dumps({"plddt": ["n/a", 50] if i else [[1, 2], [3]]}))
    assert {p.name for p in write_target_plots(folder)} == {PAE_PNG, COVERAGE_PNG}


def test_plot_functions_validate_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_plddt({}, tmp_path / "a.png")
    with pytest.raises(ValueError):
        plot_pae(np.zeros((3, 4)), tmp_path / "b.png")
    with pytest.raises(ValueError):
        plot_msa_coverage(np.zeros((0, 5), dtype=int), tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


def test_single_plots_are_valid_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    _assert_png(plot_plddt({"m1": rng.uniform(30, 95, 50)}, tmp_path / "p.png"))
    _assert_png(plot_pae(rng.uniform(0, 30, (40, 40)), tmp_path / "e.png", "model_1"))
    msa = rng.integers(0, 22, (3000, 60))  # deeper than the image rows: subsampled, not lost
    _assert_png(plot_msa_coverage(msa, tmp_path / "c.png"))


def test_coverage_stats_identity_and_depth() -> None:
    gap = 21
    msa = np.array([[0, 1, 2, 3],        # query
                    [0, 1, 5, 5],        # 2 of 4 identical
                    [gap, gap, 2, 3],    # identical where it aligns
                    [gap, gap, gap, 9]])  # 0 of 1
    identity, depth = coverage_stats(msa)
    assert identity.tolist() == [1.0, 0.5, 1.0, 0.0]
    assert depth.tolist() == [2, 2, 3, 4]


def test_import_has_no_pyplot_side_effects(run) -> None:
    # The raw rcParams value: matplotlib.get_backend() would itself import pyplot.
    code = ("import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, "
            "'backend'); b = raw(); "
            "from parafold.report.plots import write_target_plots; "
            f"write_target_plots({str(run.out / run.done[0])!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; "
            "assert raw() == b, 'backend changed'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_plots_from_the_fold_stage_writer(tmp_path: Path) -> None:
    """Files written by the GPU stage's own writer (not our fixture) give every plot."""
    outputs = pytest.importorskip("parafold.fold.outputs")
    rng = np.random.default_rng(2)
    length = 24
    preds = []
    for k, model in enumerate(("model_1_ptm", "model_2_ptm")):
        result = {
            "plddt": rng.uniform(40, 95, length),
            "ptm": np.float32(0.5 + 0.1 * k),
            "predicted_aligned_error": rng.uniform(0, 20, (length, length)),
            "max_predicted_aligned_error": np.float32(31.75),
            "structure_module": {
                "final_atom_positions": rng.normal(0, 10, (length, 37, 3)),
                "final_atom_mask": np.ones((length, 37)),
            },
        }
        preds.append(outputs.Prediction(
            name=model, model_name=model, seed=0, result=result,
            aatype=rng.integers(0, 20, length), residue_index=np.arange(length), timings={}))
    folder = tmp_path / "T1"
    outputs.write_target_outputs(folder, "T1", preds, {"predict_model_1_ptm": 1.0},
                                 save_raw=False)
    written = {p.name for p in write_target_plots(folder)}
    assert written == {PLDDT_PNG, PAE_PNG}  # no features.npz here: no coverage plot
    for png in written:
        _assert_png(folder / png)
    assert list(read_model_scores(folder)) == json.loads(
        (folder / "ranking_debug.json").read_text())["order"]
