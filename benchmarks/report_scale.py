"""How the run report scales: write it for a synthetic run of N targets and open it in Chromium.

    .venv/bin/python benchmarks/report_scale.py --targets 10000 --full 100

Measures `write_report` (ledger + folders -> page and `results.tsv`; plots for the `--full`
targets that have files), the page size, the table alone (`write_results_table` on rows already
collected), and in headless Chromium the time until the first table page is drawn,
a sort of all rows and opening one target. Results are logged and, with `--json`, written out.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from parafold.report.collect import collect
from parafold.report.html import write_report
from parafold.report.results_table import write_results_table
from parafold.report.synthetic import make_synthetic_run

log = logging.getLogger("report_scale")


def _browser_timings(page: Path) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    profile = tempfile.mkdtemp(prefix="pf-bench-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1000",
                "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"),
                           options=opts)
    try:
        t0 = time.monotonic()
        drv.get(page.as_uri())
        while not drv.find_element(By.TAG_NAME, "body").get_attribute("data-ready"):
            time.sleep(0.02)
        opened = time.monotonic() - t0
        t0 = time.monotonic()
        drv.find_element(By.CSS_SELECTOR, '#pf-head th[data-key="plddt"]').click()
        drv.find_element(By.CSS_SELECTOR, "#pf-tbody tr")
        sort_s = time.monotonic() - t0
        t0 = time.monotonic()
        drv.execute_script("location.hash = ''; history.replaceState(null, '', '#')")
        drv.find_element(By.CSS_SELECTOR, '#pf-head th[data-key="name"]').click()
        drv.find_element(By.CSS_SELECTOR, "#pf-tbody tr").click()
        viewer = drv.find_element(By.ID, "pf-viewer")
        while not viewer.get_attribute("data-rendered"):
            if time.monotonic() - t0 > 60:
                raise TimeoutError("3D view did not render in 60 s")
            time.sleep(0.02)
        target_s = time.monotonic() - t0
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {"open_first_page_s": round(opened, 3), "sort_all_s": round(sort_s, 3),
            "open_target_with_3d_s": round(target_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--full", type=int, default=100, help="targets with output files")
    parser.add_argument("--out", type=Path, default=None, help="keep the run here")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = args.out or Path(tempfile.mkdtemp(prefix="pf-report-scale-"))
    t0 = time.monotonic()
    make_synthetic_run(out, args.targets, full_files=args.full, n_failed=args.targets // 50)
    results: dict[str, Any] = {"targets": args.targets, "full": args.full,
                               "make_run_s": round(time.monotonic() - t0, 2)}
    t0 = time.monotonic()
    page = write_report(out)
    results["write_report_s"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    write_report(out)
    results["rewrite_report_s"] = round(time.monotonic() - t0, 2)  # plots already there
    results["page_kib"] = round(page.stat().st_size / 1024, 1)
    rows = collect(out).rows
    t0 = time.monotonic()
    table = write_results_table(out, rows)
    results["results_table_s"] = round(time.monotonic() - t0, 3)  # the table's share of a report
    results["results_table_kib"] = round(table.stat().st_size / 1024, 1)
    if not args.no_browser:
        results.update(_browser_timings(page))
    for key, value in results.items():
        log.info("%-24s %s", key, value)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
