"""MMseqs2 mode builds each query's features in spawned processes (real mmseqs, real children):
the same entries and features as threads, per-query errors that survive pickling, threads for
small batches, and a dead process that costs no query its features."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import parafold.errors as errors
from parafold.featureset import FeatureSet, read_feature_set
from parafold.inputs import Target, read_targets
from parafold.search import runner
from parafold.search.budget import CpuBudget
from parafold.search.databases import DatabaseSet, find_databases
from parafold.search.runner import TIMINGS_FILE, cache_key, featurize_batch
from parafold.search.settings import SearchSettings
from parafold.store import file_lock

CPUS = 2


@pytest.fixture(scope="module")
def queries(synthetic_db: Path) -> list[Target]:
    targets = list(read_targets(Path(synthetic_db) / "queries.fasta").targets)
    assert len(targets) >= runner.PROCESS_FILL_MIN_QUERIES  # else nothing here uses processes
    assert len({t.sequence for t in targets}) == len(targets)
    return targets


@pytest.fixture(scope="module")
def dbs(synthetic_db: Path) -> DatabaseSet:
    return find_databases(Path(synthetic_db), msa_mode="mmseqs").fingerprinted()


@pytest.fixture
def process_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many queries each call of the process path got (a spy; the work is unchanged)."""
    return _spy(monkeypatch)


def _spy(mp: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = runner._fill_in_processes

    def spy(pool: Any, names: Any, job: Any) -> Any:
        calls.append(len(names))
        return real(pool, names, job)

    mp.setattr(runner, "_fill_in_processes", spy)
    return calls


@pytest.fixture
def threads_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "PROCESS_FILL_MIN_QUERIES", 10**9)


def _batch(targets: list[Target], root: Path, dbs: DatabaseSet,
           settings: SearchSettings) -> list[FeatureSet | BaseException]:
    return featurize_batch(targets, out_dir=root / "out", databases=dbs, settings=settings,
                           budget=CpuBudget(CPUS), cache_dir=root / "cache")


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory, queries: list[Target],
             dbs: DatabaseSet) -> Path:
    """Every query through the thread path (the behaviour before processes): the reference."""
    root = tmp_path_factory.mktemp("threaded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "PROCESS_FILL_MIN_QUERIES", 10**9)
        calls = _spy(mp)
        results = _batch(queries, root, dbs, SearchSettings(msa_mode="mmseqs"))
    assert calls == []
    assert all(isinstance(r, FeatureSet) for r in results), results
    return root


def _assert_same_features(got_dir: Path, want_dir: Path) -> None:
    got, want = read_feature_set(got_dir).load(), read_feature_set(want_dir).load()
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if value.dtype == object:
            assert list(got[name].ravel()) == list(value.ravel()), name
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def _entry(root: Path, key: str) -> Path:
    return root / "cache" / key[:2] / key


def test_processes_fill_the_same_entries_and_features_as_threads(
        tmp_path: Path, queries: list[Target], dbs: DatabaseSet, threaded: Path,
        process_calls: list[int]) -> None:
    settings = SearchSettings(msa_mode="mmseqs")
    results = _batch(queries, tmp_path, dbs, settings)
    assert process_calls == [len(queries)]
    assert all(isinstance(r, FeatureSet) for r in results), results
    assert sum(r.num_templates > 0 for r in results) > 0  # type: ignore[union-attr]
    for target, result in zip(queries, results, strict=True):
        _assert_same_features(tmp_path / "out" / target.name, threaded / "out" / target.name)
        key = cache_key(target.sequence, dbs, settings)
        got, want = _entry(tmp_path, key), _entry(threaded, key)
        _assert_same_features(got / "features", want / "features")
        files = sorted(p.relative_to(want).as_posix() for p in want.rglob("*") if p.is_file())
        assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*")
                      if p.is_file()) == files
        for name in files:
            if name.startswith("msas/"):
                assert (got / name).read_bytes() == (want / name).read_bytes(), name
        timings = json.loads((got / TIMINGS_FILE).read_text())
        reference = json.loads((want / TIMINGS_FILE).read_text())
        assert set(timings) == set(reference)
        assert timings["batch"]["queries"] == len(queries) and timings["features_s"] > 0
        assert isinstance(result, FeatureSet)
        assert result.extra["reused"] == ""


def _m8_breaking_mmseqs(folder: Path) -> tuple[Path, Path]:
    """Real mmseqs, except that every template row of the first query (q<i>, lowest i) with a
    hit loses its last column: a broken pdb_hits.m8 for that query alone, named in `record`."""
    real, record = shutil.which("mmseqs"), folder / "broken_query"
    assert real is not None
    wrapper = folder / "mmseqs_breaking_m8"
    wrapper.write_text(f"""#!{sys.executable}
import subprocess, sys
from pathlib import Path
rc = subprocess.call([{real!r}, *sys.argv[1:]])
m8 = [Path(a) for a in sys.argv[2:] if a.endswith(".m8")]
if rc == 0 and sys.argv[1] == "convertalis" and m8:
    rows = m8[0].read_text().splitlines()
    broken = min((r.split("\\t")[0] for r in rows), key=lambda q: int(q[1:]))
    Path({str(record)!r}).write_text(broken)
    m8[0].write_text("".join((r.rsplit("\\t", 1)[0] if r.split("\\t")[0] == broken else r)
                             + "\\n" for r in rows))
sys.exit(rc)
""")
    wrapper.chmod(0o755)
    return wrapper, record


def test_a_query_error_in_a_child_comes_back_as_the_thread_path_records_it(
        tmp_path: Path, queries: list[Target], dbs: DatabaseSet,
        monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper, record = _m8_breaking_mmseqs(tmp_path)
    settings = SearchSettings(msa_mode="mmseqs", mmseqs_binary=str(wrapper))
    seen: dict[str, list[FeatureSet | BaseException]] = {}
    for path in ("processes", "threads"):
        with monkeypatch.context() as mp:
            calls = _spy(mp)
            if path == "threads":
                mp.setattr(runner, "PROCESS_FILL_MIN_QUERIES", 10**9)
            seen[path] = _batch(queries, tmp_path / path, dbs, settings)
        assert calls == ([len(queries)] if path == "processes" else []), path
    broken = int(record.read_text().removeprefix("q"))  # q<i>: the i-th query of the batch
    for path, results in seen.items():
        for i, result in enumerate(results):
            if i == broken:
                assert type(result) is errors.FeatureError, (path, result)
                assert "pdb_hits.m8: m8 row 0" in str(result), str(result)
                assert "13 columns, expected 14" in str(result)
            else:
                assert isinstance(result, FeatureSet), (path, i, result)
    child, thread = seen["processes"][broken], seen["threads"][broken]
    assert str(child).replace(str(tmp_path / "processes"), "") == \
        str(thread).replace(str(tmp_path / "threads"), "")
    assert not (tmp_path / "processes" / "out" / queries[broken].name).exists()
    key = cache_key(queries[broken].sequence, dbs, settings)
    assert not (_entry(tmp_path / "processes", key) / "features" / "features.json").exists()


def test_every_pipeline_error_survives_pickling() -> None:
    made = [errors.ToolFailedError(["mmseqs", "search"], 1, "failed\n"),
            errors.ToolKilledError(["mmseqs", "search"], 137, "killed\n"),
            errors.ToolTimeoutError(["kalign"], 2.5)]
    classes = {name for name in errors.__all__ if isinstance(getattr(errors, name), type)}
    made += [getattr(errors, name)(f"{name} message") for name in sorted(classes)
             if name not in {"ToolFailedError", "ToolKilledError", "ToolTimeoutError"}]
    assert {type(e).__name__ for e in made} == classes and "StorageFullError" in classes
    for exc in made:
        exc.add_note("a note")
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
        assert back.__notes__ == ["a note"] and vars(back) == vars(exc)


def test_small_batch_and_single_core_fill_in_threads(tmp_path: Path, queries: list[Target],
                                                     dbs: DatabaseSet, threaded: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     process_calls: list[int]) -> None:
    def no_processes(*args: object, **kwargs: object) -> None:
        raise AssertionError("a small batch must not start processes")

    monkeypatch.setattr(runner.cf, "ProcessPoolExecutor", no_processes)
    for workers, count in ((CPUS, runner.PROCESS_FILL_MIN_QUERIES - 1), (1, 10**6), (0, 10**6)):
        with runner._fill_pool(workers, count) as pool:
            assert pool is None
    small = queries[:2]
    results = _batch(small, tmp_path, dbs, SearchSettings(msa_mode="mmseqs"))
    assert process_calls == []
    assert all(isinstance(r, FeatureSet) for r in results), results
    for target in small:
        _assert_same_features(tmp_path / "out" / target.name, threaded / "out" / target.name)


def _wait_for(condition: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def background() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for t in threads:
        t.join(timeout=300)


def _dead(pid: int | None) -> bool:
    """Gone or a zombie; a process reaped between two reads of /proc counts as gone."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_killed_fill_process_loses_no_query(tmp_path: Path, queries: list[Target],
                                              dbs: DatabaseSet, threaded: Path,
                                              caplog: pytest.LogCaptureFixture,
                                              background: list[threading.Thread],
                                              process_calls: list[int]) -> None:
    """The first query's entry is locked, so the child that takes it blocks; once every other
    query is done, the children are SIGKILLed and the lock released: the first query is then
    filled in this process, and nothing is lost."""
    settings = SearchSettings(msa_mode="mmseqs")
    keys = [cache_key(t.sequence, dbs, settings) for t in queries]
    before = {p.pid for p in multiprocessing.active_children()}
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["results"] = _batch(queries, tmp_path, dbs, settings)
        except BaseException as exc:  # reported by the assertions below
            out["error"] = exc

    caplog.set_level(logging.WARNING, logger="parafold.search.runner")
    with file_lock(_entry(tmp_path, keys[0]) / ".lock"):
        worker = threading.Thread(target=run, name="batch")
        background.append(worker)
        worker.start()
        _wait_for(lambda: all((_entry(tmp_path, k) / "features" / "features.json").is_file()
                              for k in keys[1:]) or not worker.is_alive(), "the other queries")
        assert worker.is_alive(), out
        children = [p for p in multiprocessing.active_children() if p.pid not in before]
        assert len(children) == CPUS
        for child in children:
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
        _wait_for(lambda: all(_dead(c.pid) for c in children), "the children to die", 30)
    worker.join(timeout=300)
    assert "error" not in out, out.get("error")
    results = out["results"]
    assert process_calls == [len(queries)]
    assert all(isinstance(r, FeatureSet) for r in results), results
    assert "a feature process died; building the features of 1 queries" in caplog.text
    for target in queries:
        _assert_same_features(tmp_path / "out" / target.name, threaded / "out" / target.name)
    assert not list(_entry(tmp_path, keys[0]).rglob("*.part"))


def test_a_missing_template_mmcif_fails_only_its_query(
        tmp_path: Path, queries: list[Target], dbs: DatabaseSet, threaded: Path) -> None:
    """A PDB mirror missing one hit's mmCIF: the query that hit it gets a FeatureError naming
    the file (AlphaFold's featurizer stops there with an OSError, which used to end the whole
    batch); every other query gets its features."""
    from dataclasses import replace

    m8 = {t.name: (threaded / "out" / t.name / "msas" / "pdb_hits.m8").read_text()
          for t in queries}
    victim = next(t for t in queries if m8[t.name].strip())
    codes = {row.split("\t")[1].split("_")[0].lower() for row in m8[victim.name].splitlines()
             if row.strip()}
    spared = [t for t in queries if t is not victim and not any(
        row.split("\t")[1].split("_")[0].lower() in codes
        for row in m8[t.name].splitlines() if row.strip())]
    assert spared, "every query hit the victim's templates"
    mirror = tmp_path / "pdb_mmcif"
    shutil.copytree(dbs.require("pdb_mmcif"), mirror)
    for code in codes:
        (mirror / "mmcif_files" / f"{code}.cif").unlink(missing_ok=True)
        (mirror / f"{code}.cif").unlink(missing_ok=True)
    broken = replace(dbs, paths=tuple((n, mirror if n == "pdb_mmcif" else p)
                                      for n, p in dbs.paths))
    assert broken.mmcif_dir is not None and not any(
        (broken.mmcif_dir / f"{code}.cif").exists() for code in codes)
    results = dict(zip((t.name for t in queries),
                       _batch(queries, tmp_path, broken, SearchSettings(msa_mode="mmseqs")),
                       strict=True))
    failure = results[victim.name]
    assert type(failure) is errors.FeatureError, failure
    assert ".cif" in str(failure) and "pdb_mmcif" in str(failure)
    assert str(broken.mmcif_dir) in str(failure)
    for target in spared:
        assert isinstance(results[target.name], FeatureSet), (target.name, results[target.name])
