"""The run report: self-contained, correct data, and working in a real headless Chromium
(no console errors, sortable table, a target's plots and a 3D view that draws)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from parafold.report.collect import COLUMNS, FLAG_PAE, FLAG_STRUCTURE
from parafold.report.html import ASSET_DIR, VIEWER_JS, render_page, write_report
from parafold.report.synthetic import make_synthetic_run

COL = {c: i for i, c in enumerate(COLUMNS)}


class _Refs(HTMLParser):
    """Every URL a page would load: script/img/iframe src, link href."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value and (key == "src" or (tag == "link" and key == "href")):
                self.urls.append(value)


def _page_data(report: Path) -> dict[str, Any]:
    text = report.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="pf-data">(.*?)</script>', text, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    from parafold.ledger import Ledger

    run = make_synthetic_run(tmp_path_factory.mktemp("out"), n_targets=4, n_models=2, n_failed=1)
    with Ledger(run.out) as ledger:  # a GPU that failed to start, as the scheduler records it
        ledger.add_worker_event(run_id=ledger.runs()[-1].id, worker="gpu1", kind="retired",
                                reason="failed to start: RuntimeError: no device")
    return run, write_report(run.out)


def test_page_is_self_contained(report) -> None:
    run, path = report
    text = path.read_text(encoding="utf-8")
    refs = _Refs()
    refs.feed(text)
    assert not [u for u in refs.urls if re.match(r"(https?:)?//", u)], refs.urls
    # The script tags in the page itself have no src at all: CSS, script and data are inline.
    assert "<script src" not in text
    assert (run.out / ASSET_DIR / VIEWER_JS).stat().st_size > 100_000
    assert (run.out / ASSET_DIR / "3Dmol-LICENSE.txt").is_file()
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_embedded_data_matches_the_run(report) -> None:
    run, path = report
    data = _page_data(path)
    summary = data["summary"]
    assert (summary["targets"], summary["done"], summary["failed"]) == (4, 3, 1)
    assert summary["compiles"] == 1 and summary["compile_s"] == pytest.approx(12.5)
    assert summary["proteins_per_hour"] > 0
    assert [f[0] for f in summary["failures"]] == list(run.failed)
    assert "jackhmmer exited" in summary["failures"][0][1]
    rows = {r[COL["name"]]: r for r in data["rows"]}
    assert sorted(rows) == sorted(run.done + run.failed)
    for name in run.done:
        row = rows[name]
        assert row[COL["state"]] == "done"
        assert 5 <= row[COL["plddt"]] <= 100 and row[COL["ptm"]] is not None
        assert row[COL["msa_depth"]] >= 5 and row[COL["length"]] >= 30
        assert row[COL["search_s"]] > 0 and row[COL["predict_s"]] > 0
        assert bool(row[COL["flags"]] & FLAG_PAE) == (name not in run.no_pae)
        assert row[COL["flags"]] & FLAG_STRUCTURE
        js = (run.out / name / "ranked_0.pdb.js").read_text()
        assert js.startswith(f'parafoldStructure("{name}", ') and "ATOM" in js
    assert rows[run.failed[0]][COL["state"]] == "failed"
    kinds = {lane["kind"] for lane in data["lanes"]}
    assert kinds == {"search", "predict"}
    assert len(data["events"]) == 4 + 3  # every target searched, three predicted


def test_report_without_ledger_and_without_plots(tmp_path: Path, report) -> None:
    run, _ = report
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copytree(run.out / run.done[0], out / run.done[0])
    for png in (out / run.done[0]).glob("*.png"):
        png.unlink()
    data = _page_data(write_report(out, plots=False))
    assert not list((out / run.done[0]).glob("*.png"))
    (row,) = data["rows"]
    assert row[COL["state"]] == "done" and row[COL["flags"]] == FLAG_STRUCTURE
    assert data["events"] == [] and data["summary"]["proteins_per_hour"] is None
    write_report(out)  # plots on: the missing ones get drawn
    assert {p.name for p in (out / run.done[0]).glob("*.png")} == {
        "plddt.png", "pae.png", "coverage.png"}


def test_a_folder_without_its_done_marker_offers_no_stale_structure(tmp_path: Path,
                                                                   report) -> None:
    """A target queued again (its sequence changed) or failed has no ranking_debug.json: the
    old prediction's ranked_0.pdb and plots are not its result, so no 3D view, no plots."""
    run, _ = report
    name = run.done[0]
    folder = tmp_path / "copy" / name
    shutil.copytree(run.out / name, folder)
    (folder / "ranking_debug.json").unlink()
    (folder / "ranked_0.pdb.js").unlink()
    data = _page_data(write_report(folder.parent, plots=False))
    (row,) = data["rows"]
    assert row[COL["state"]] == "features_ready" and row[COL["flags"]] == 0
    assert not (folder / "ranked_0.pdb.js").exists()
    table = (folder.parent / "results.tsv").read_text(encoding="utf-8").splitlines()
    assert f"{name}/ranked_0.pdb" not in table[1]


def test_one_malformed_file_does_not_stop_the_report(tmp_path: Path, report) -> None:
    """An MSA depth that is no integer ("n/a", NaN, 1e400 read as inf) or pLDDTs that are no
    numbers give null fields for that target; the report of the others is whole."""
    run, _ = report
    out = tmp_path / "copy"
    shutil.copytree(run.out / run.done[0], out / "good")
    for name, depth in zip(run.done, ('"n/a"', "NaN", "1e400"), strict=True):
        shutil.copytree(run.out / name, out / name)
        (out / name / "features.json").write_text(f'{{"msa_depth": {depth}}}')
        for scores in (out / name).glob("scores_*.json"):
            scores.write_text('{"plddt": ["n/a", 50]}')
        (out / name / "plddt.png").unlink()
    rows = {r[COL["name"]]: r for r in _page_data(write_report(out))["rows"]}
    assert rows["good"][COL["msa_depth"]] >= 5 and rows["good"][COL["flags"]] & FLAG_PAE
    for name in run.done:
        assert rows[name][COL["msa_depth"]] is None and rows[name][COL["state"]] == "done"
        assert not (out / name / "plddt.png").exists()


def test_page_escapes_script_breaking_text(tmp_path: Path) -> None:
    data = {"summary": {"failures": []}, "columns": COLUMNS, "lanes": [], "events": [],
            "rows": [["x", 1, 1, None, None, None, None, "failed", "</script><b>", 0, None]]}
    page = render_page(data, title="<t>")
    assert "</script><b>" not in page and "<t>" not in page


# --- in a real browser -------------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    why = "chromium/chromedriver not installed (scripts/setup.sh installs them)"
    if os.environ.get("CI"):
        pytest.fail(why)
    print(f"skipping browser tests: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    profile = tempfile.mkdtemp(prefix="pf-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,1000",
                # Software WebGL, so 3Dmol.js can draw without a GPU.
                "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(fn: Any, timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _severe(drv: Any) -> list[dict[str, Any]]:
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def test_report_in_chromium(browser: Any, report) -> None:
    from selenium.webdriver.common.by import By

    run, path = report
    browser.get(path.as_uri())
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#pf-tbody tr")
    assert len(rows) == 4

    def column(i: int) -> list[str]:
        return [tr.find_elements(By.TAG_NAME, "td")[i].text
                for tr in browser.find_elements(By.CSS_SELECTOR, "#pf-tbody tr")]

    length_col = 1  # Target, Length, ...
    header = browser.find_element(By.CSS_SELECTOR, '#pf-head th[data-key="length"]')
    header.click()
    asc = [int(v) for v in column(length_col)]
    assert asc == sorted(asc) and asc != sorted(asc, reverse=True)
    header.click()
    assert [int(v) for v in column(length_col)] == sorted(asc, reverse=True)

    search = browser.find_element(By.ID, "pf-filter")
    search.send_keys("failed")
    assert column(0) == list(run.failed)
    search.clear()
    search.send_keys(" ")  # "input" fires; blank filter shows all again
    _wait(lambda: len(column(0)) == 4)

    target = run.done[0]
    next(tr for tr in browser.find_elements(By.CSS_SELECTOR, "#pf-tbody tr")
         if tr.find_element(By.TAG_NAME, "td").text == target).click()
    assert browser.find_element(By.ID, "pf-dname").text == target
    imgs = browser.find_elements(By.CSS_SELECTOR, "#pf-plots img")
    assert len(imgs) == 3
    _wait(lambda: all(browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in imgs))
    viewer = browser.find_element(By.ID, "pf-viewer")
    _wait(lambda: viewer.get_attribute("data-rendered") == target, timeout=30)
    time.sleep(0.5)  # let the first frame reach the screen
    canvas = viewer.find_element(By.TAG_NAME, "canvas")
    shot = Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")
    background = shot.getpixel((0, 0))
    pixels = shot.get_flattened_data() if hasattr(shot, "get_flattened_data") else shot.getdata()
    drawn = sum(1 for px in pixels if px != background)
    assert drawn > 0.01 * shot.width * shot.height, f"3D view looks blank ({drawn} px drawn)"
    retired = browser.find_element(By.CSS_SELECTOR, "#pf-failures details:last-child")
    assert "1 fold worker(s) out of rotation" in retired.text
    assert _severe(browser) == []


def test_ten_thousand_targets_open_fast(browser: Any, tmp_path: Path) -> None:
    """The table renders lazily: 10,000 rows in the data, 100 in the DOM, first page quickly."""
    from selenium.webdriver.common.by import By

    n = 10_000
    rows = [[f"T{i:05d}", 50 + i % 400, 1 + i % 900, 40 + (i * 7) % 60, 0.5, 10.0, 1.0,
             "done" if i % 50 else "failed", None if i % 50 else "boom", 0, "model_1"]
            for i in range(n)]
    events = [[i % 8, i * 0.5, i * 0.5 + 4, i, 1] for i in range(n)] + \
             [[8, i * 0.5 + 4, i * 0.5 + 4.4, i, 1] for i in range(n)]
    lanes = [{"kind": "search", "worker": f"cpu-{i}"} for i in range(8)] + \
            [{"kind": "predict", "worker": "gpu-0"}]
    data = {"summary": {"out_dir": "x", "generated": "now", "run_started": None,
                        "targets": n, "done": n - 200, "failed": 200, "states": {},
                        "wall_s": 5004.4, "proteins_per_hour": 7000, "compiles": 3,
                        "compile_s": 40.0, "gpu_busy": 0.8,
                        "failures": [[r[0], "boom"] for r in rows if r[7] == "failed"]},
            "columns": COLUMNS, "rows": rows, "lanes": lanes, "events": events}
    page = tmp_path / "report.html"
    page.write_text(render_page(data, title="big"), encoding="utf-8")
    start = time.monotonic()
    browser.get(page.as_uri())
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    elapsed = time.monotonic() - start
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pf-tbody tr")) == 100
    assert "of 10000 targets" in browser.find_element(By.ID, "pf-page").text
    assert elapsed < 10, f"first page took {elapsed:.1f} s"
    browser.find_element(By.CSS_SELECTOR, '#pf-head th[data-key="plddt"]').click()
    first = browser.find_element(By.CSS_SELECTOR, "#pf-tbody tr td:nth-child(4)").text
    assert float(first) == min(r[3] for r in rows)
    assert _severe(browser) == []
