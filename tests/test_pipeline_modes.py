"""`parafold run` in every MSA mode with the real tools and the tiny model on random weights:
single-sequence and precomputed runs need no databases, MMseqs2 searches all targets in one
batch job, a missing precomputed MSA fails only its target, and a resumed precomputed run
reschedules nothing. The MMseqs2 run's report is also opened in a headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from parafold.ledger import Ledger
from test_pipeline import PARAFOLD, QUERY_LENGTH, check_complete, check_plots_and_report
from test_pipeline import jax_cache_home as _jax_cache_home
from test_report_html import _severe, _wait
from test_report_html import browser as browser  # the module's Chromium fixture, reused

N_MMSEQS = 3


@pytest.fixture(scope="module")
def modes_inputs(synthetic_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random weights and queries of the synthetic set cut to one length bucket."""
    from parafold.fold.params import write_random_params
    from parafold.fold.settings import ModelSettings
    from parafold.inputs import read_targets

    root = tmp_path_factory.mktemp("modes")
    write_random_params(root / "params", ModelSettings(config_size="tiny", models=(1,)))
    targets = read_targets(synthetic_db / "queries.fasta").targets[:N_MMSEQS]
    for n in (1, 2, N_MMSEQS):
        (root / f"q{n}.fasta").write_text("".join(
            f">{t.id}\n{t.sequence[:QUERY_LENGTH]}\n" for t in targets[:n]))
    return {"db": synthetic_db, "params": root / "params", "root": root,
            "xdg": _jax_cache_home(tmp_path_factory)}


def _run(inputs: dict[str, Path], fasta: Path, out: Path, *extra: str,
         timeout: int = 600) -> subprocess.CompletedProcess[str]:
    import os

    args = [PARAFOLD, "run", str(fasta), "-o", str(out), "--params-dir", str(inputs["params"]),
            "--config", "tiny", "--models", "1", "--num-recycle", "0", "--cpus", "2",
            "--float32", "--max-wait", "1", "--no-progress", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XDG_CACHE_HOME": str(inputs["xdg"])}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def _names(fasta: Path) -> list[str]:
    from parafold.inputs import read_targets

    return [t.name for t in read_targets(fasta).targets]


def _search_timings(out: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    with Ledger(out, readonly=True) as ledger:
        return {n: ledger.get(n).timings.get("search", {}) for n in names}  # type: ignore[union-attr]


def test_single_sequence_needs_no_databases(modes_inputs: dict[str, Path]) -> None:
    fasta = modes_inputs["root"] / "q2.fasta"
    out = modes_inputs["root"] / "single_out"
    proc = _run(modes_inputs, fasta, out, "--msa-mode", "single_sequence")  # no --db-dir
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = _names(fasta)
    check_complete(out, names)
    check_plots_and_report(out, names)
    assert all(t["tool_calls"] == 0 for t in _search_timings(out, names).values())
    for name in names:
        manifest = json.loads((out / name / "features.json").read_text())
        assert manifest["msa_depth"] == 1, manifest


@pytest.fixture(scope="module")
def mmseqs_run(modes_inputs: dict[str, Path]) -> tuple[Path, list[str]]:
    fasta = modes_inputs["root"] / f"q{N_MMSEQS}.fasta"
    out = modes_inputs["root"] / "mmseqs_out"
    proc = _run(modes_inputs, fasta, out, "--msa-mode", "mmseqs", "--db-dir",
                str(modes_inputs["db"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, _names(fasta)


def test_mmseqs_searches_every_target_in_one_batch(mmseqs_run: tuple[Path, list[str]]) -> None:
    out, names = mmseqs_run
    assert len(names) == N_MMSEQS
    check_complete(out, names)
    check_plots_and_report(out, names)
    with Ledger(out, readonly=True) as ledger:
        searches = ledger.events("search")
    assert sorted(e.target for e in searches) == sorted(names)
    # One job: every search event carries the same batch number, start and end.
    assert len({(e.batch, e.start, e.end, e.worker) for e in searches}) == 1, searches
    assert searches[0].batch is not None
    # One MMseqs2 batch of all queries: its calls are counted once, on one target.
    timings = _search_timings(out, names)
    assert sum(1 for t in timings.values() if t["tool_calls"]) == 1, timings
    for name in names:
        target_timings = json.loads((out / name / "timings.json").read_text())
        batch = target_timings["batch"]
        assert batch["queries"] == N_MMSEQS, batch
        # the batch's peak memory: the largest of its MMseqs2 calls
        assert target_timings["search_max_rss_mib"] == max(
            t["max_rss_mib"] for t in target_timings["tools"].values()) > 0, target_timings
        assert (out / name / "msas" / "uniref.a3m").is_file()


def test_mmseqs_report_in_chromium(browser: Any, mmseqs_run: tuple[Path, list[str]]) -> None:
    from selenium.webdriver.common.by import By

    out, names = mmseqs_run
    browser.get((out / "report.html").as_uri())
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    listed = [tr.find_element(By.TAG_NAME, "td").text
              for tr in browser.find_elements(By.CSS_SELECTOR, "#pf-tbody tr")]
    assert sorted(listed) == sorted(names)
    assert _severe(browser) == []


def test_precomputed_msas_from_a_classic_search(modes_inputs: dict[str, Path]) -> None:
    root = modes_inputs["root"]
    one, two = root / "q1.fasta", root / "q2.fasta"
    (first,), names = _names(one), _names(two)
    # The classic search of one target (CPU stage only), its BFD/UniRef A3M as the MSA.
    feats = subprocess.run([PARAFOLD, "features", str(one), "-o", str(root / "classic"),
                            "--db-dir", str(modes_inputs["db"]), "--cpus", "2"],
                           capture_output=True, text=True, timeout=300)
    assert feats.returncode == 0, feats.stdout + feats.stderr
    msa_dir = root / "msas"
    msa_dir.mkdir()
    shutil.copy(root / "classic" / first / "msas" / "bfd_uniref_hits.a3m",
                msa_dir / f"{first}.a3m")

    out = root / "precomputed_out"
    args = ("--msa-mode", "precomputed", "--msa-dir", str(msa_dir))  # no --db-dir
    proc = _run(modes_inputs, two, out, *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the target without an MSA ...
    missing = next(n for n in names if n != first)
    assert f"{missing} [search]" in proc.stdout and "no precomputed MSA" in proc.stdout
    check_complete(out, [first])  # ... fails alone
    check_plots_and_report(out, [first])
    manifest = json.loads((out / first / "features.json").read_text())
    assert manifest["msa_depth"] > 1 and manifest["msa_mode"] == "precomputed"

    # A rerun keys the target by its MSA file and finds it done: nothing is rescheduled.
    with Ledger(out, readonly=True) as ledger:
        before = len(ledger.events())
    again = _run(modes_inputs, two, out, *args)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "1/2 targets done" in again.stdout and "0 searched and 0 predicted" in again.stdout
    with Ledger(out, readonly=True) as ledger:
        assert len(ledger.events()) == before
