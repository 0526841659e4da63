"""The CPU stage on the synthetic databases with the real jackhmmer, hhblits, hhsearch, kalign."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from alphafold.data import parsers
from alphafold.data.pipeline import DataPipeline
from alphafold.data.tools import hhsearch

from parafold.featureset import find_feature_sets, read_feature_set
from parafold.inputs import Target, read_targets
from parafold.search.databases import DatabaseSet, find_databases
from parafold.search.features import make_template_featurizer
from parafold.search.msa_search import MSA_FILES
from parafold.search.runner import featurize_target
from parafold.search.scheduler import featurize_many
from parafold.search.settings import SearchSettings

FAKES = Path(__file__).parent / "fakes"
CPUS = 2
# hhsearch lists at least 10 hits (-z 10) whatever their probability; on a 9-entry pdb70 that
# is every entry. Hits under its own reporting threshold (-p 20) are that filler, not findings.
HHR_MIN_PROB = 20.0


@pytest.fixture(scope="module")
def db(synthetic_db: Path) -> Path:
    return Path(synthetic_db)


@pytest.fixture(scope="module")
def dbs(db: Path) -> DatabaseSet:
    return find_databases(db, "full_dbs").fingerprinted()


@pytest.fixture(scope="module")
def queries(db: Path) -> list[Target]:
    return list(read_targets(db / "queries.fasta").targets)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, queries: list[Target],
             dbs: DatabaseSet) -> dict[str, object]:
    """Every query through featurize_many once; later tests reuse its output and cache."""
    out = tmp_path_factory.mktemp("features")
    outcomes = featurize_many(queries, out_dir=out, databases=dbs, settings=SearchSettings(),
                              cpus=CPUS, cache_dir=out / ".cache")
    return {"out": out, "outcomes": outcomes}


def _truth(db: Path) -> dict[str, str]:
    rows = (db / "truth.tsv").read_text().splitlines()[1:]
    return {r.split("\t")[0]: (r.split("\t") + [""])[1] for r in rows}


def _hit_ids(msa_dir: Path) -> set[str]:
    ids: set[str] = set()
    for name in ("uniref90_hits.sto", "mgnify_hits.sto", "small_bfd_hits.sto"):
        if (msa_dir / name).is_file():
            ids |= {d.split("/")[0] for d in
                    parsers.parse_stockholm((msa_dir / name).read_text()).descriptions}
    if (msa_dir / "bfd_uniref_hits.a3m").is_file():
        ids |= {d.split()[0] for d in
                parsers.parse_a3m((msa_dir / "bfd_uniref_hits.a3m").read_text()).descriptions}
    for line in (msa_dir / "pdb_hits.hhr").read_text().split("\n\n")[1].splitlines()[1:]:
        fields = line.split()
        prob = float(line[34:].split()[0]) if len(line) > 40 else 0.0
        if fields and prob >= HHR_MIN_PROB:
            ids.add(fields[1])
    ids.discard("query")
    return ids


def test_all_queries_get_features_in_alphafold_layout(searched: dict[str, object]) -> None:
    out = Path(searched["out"])  # type: ignore[arg-type]
    outcomes = searched["outcomes"]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]  # type: ignore[attr-defined]
    for o in outcomes:  # type: ignore[attr-defined]
        folder = out / o.target.name
        for name in ("uniref90_hits.sto", "mgnify_hits.sto", "bfd_uniref_hits.a3m",
                     "pdb_hits.hhr"):
            assert (folder / "msas" / name).stat().st_size > 0
        timings = json.loads((folder / "timings.json").read_text())
        steps = ("jackhmmer_uniref90", "jackhmmer_mgnify", "hhblits_bfd_uniref30",
                 "hhsearch_pdb70")
        assert set(timings["tools"]) == set(steps)
        peaks = [timings["tools"][step]["max_rss_mib"] for step in steps]  # each tool's own
        assert min(peaks) > 0 and timings["search_max_rss_mib"] == max(peaks), timings
        fs = read_feature_set(folder)
        feats = fs.load()
        assert feats["domain_name"][0] == o.target.id.encode()
        assert fs.msa_depth > 1 and feats["msa"].shape[1] == o.target.length


def test_recall_and_precision_per_query(searched: dict[str, object], db: Path,
                                        tmp_path: Path, dbs: DatabaseSet,
                                        queries: list[Target]) -> None:
    """>= 90% of each family's searchable members found, <= 5% of hits unrelated.

    Searchable: ids a search returns (uniref90, mgnify, bfd, uniref30, small_bfd members and
    template chains); PDBMSA relatives only shape pdb70's HMMs and are never hits themselves.
    Both presets are searched so small_bfd members count too.
    """
    reduced = find_databases(db, "reduced_dbs")
    out_r = tmp_path / "reduced"
    outcomes = featurize_many(queries, out_dir=out_r, databases=reduced,
                              settings=SearchSettings(preset="reduced_dbs"), cpus=CPUS,
                              cache_dir=tmp_path / "cache")
    assert all(o.ok for o in outcomes)
    truth = _truth(db)
    out = Path(searched["out"])  # type: ignore[arg-type]
    for target in queries:
        family = target.id.split("_")[0]
        members = {k for k, v in truth.items() if v == family and not k.startswith("PDBMSA")}
        hits = _hit_ids(out / target.name / "msas") | _hit_ids(out_r / target.name / "msas")
        unrelated = {h for h in hits if truth.get(h, "") == ""}
        assert len(hits & members) >= 0.9 * len(members), (target.id, members - hits)
        assert len(unrelated) <= 0.05 * len(hits), (target.id, unrelated)


def _deepmind_make_msa_features(msas: list[parsers.Msa]) -> dict[str, np.ndarray]:
    """DeepMind's AlphaFold 2.3 `make_msa_features`, whose de-duplication (first copy of each
    aligned sequence kept) the installed fork commented out."""
    from alphafold.common import residue_constants
    from alphafold.data import msa_identifiers

    int_msa, deletion_matrix, species_ids, seen = [], [], [], set()
    for msa in msas:
        for i, sequence in enumerate(msa.sequences):
            if sequence in seen:
                continue
            seen.add(sequence)
            int_msa.append([residue_constants.HHBLITS_AA_TO_ID[res] for res in sequence])
            deletion_matrix.append(msa.deletion_matrix[i])
            species = msa_identifiers.get_identifiers(msa.descriptions[i]).species_id
            species_ids.append(species.encode("utf-8"))
    num_res = len(msas[0].sequences[0])
    return {"deletion_matrix_int": np.array(deletion_matrix, dtype=np.int32),
            "msa": np.array(int_msa, dtype=np.int32),
            "num_alignments": np.array([len(int_msa)] * num_res, dtype=np.int32),
            "msa_species_identifiers": np.array(species_ids, dtype=np.object_)}


def test_msa_rows_deduplicated_across_databases_as_deepmind_does() -> None:
    """The query once (not once per database), a hit of UniRef90 and BFD once, with the
    deletions and description of its first copy."""
    from parafold.search.features import msa_feature_dict

    q, hit = "MKTAYIAKQR", "MKTAYLAKQR"
    uniref90 = parsers.Msa([q, hit], [[0] * 10, [0] * 10], ["query", "UniRef90_A"])
    bfd = parsers.Msa([q, hit, "MKTAY-AKQR"], [[0] * 10, [1] + [0] * 9, [0] * 10],
                      ["query", "UniRef100_A", "B"])
    mgnify = parsers.Msa([q], [[0] * 10], ["query"])
    feats = msa_feature_dict(q, "query", (uniref90, bfd, mgnify))
    want = _deepmind_make_msa_features([uniref90, bfd, mgnify])
    assert feats["msa"].shape == (3, 10) and feats["num_alignments"][0] == 3
    assert feats["deletion_matrix_int"][1].sum() == 0  # UniRef90's copy, not BFD's
    for key, value in want.items():
        np.testing.assert_array_equal(feats[key], value, err_msg=key)


def test_features_equal_alphafold_datapipeline(searched: dict[str, object], dbs: DatabaseSet,
                                               queries: list[Target], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """DataPipeline's features, its MSA rows de-duplicated as in DeepMind's release."""
    monkeypatch.setattr("alphafold.data.pipeline.make_msa_features",
                        _deepmind_make_msa_features)
    settings = SearchSettings()
    target = queries[0]
    pipeline = DataPipeline(
        jackhmmer_binary_path=shutil.which("jackhmmer"),
        hhblits_binary_path=shutil.which("hhblits"),
        uniref90_database_path=str(dbs.require("uniref90")),
        mgnify_database_path=str(dbs.require("mgnify")),
        bfd_database_path=str(dbs.require("bfd")),
        uniref30_database_path=str(dbs.require("uniref30")),
        small_bfd_database_path=None,
        template_searcher=hhsearch.HHSearch(binary_path=shutil.which("hhsearch"),
                                            databases=[str(dbs.require("pdb70"))]),
        template_featurizer=make_template_featurizer(dbs, settings),
        use_small_bfd=False)
    fasta = tmp_path / "q.fasta"
    fasta.write_text(f">{target.id}\n{target.sequence}\n")
    msa_dir = tmp_path / "af_msas"
    msa_dir.mkdir()
    expected = pipeline.process(str(fasta), str(msa_dir))
    out = Path(searched["out"])  # type: ignore[arg-type]
    got = read_feature_set(out / target.name).load()
    assert set(got) == set(expected)
    assert expected["template_aatype"].shape[0] > 0  # the comparison covers templates
    for key in expected:
        want = np.asarray(expected[key])
        assert got[key].shape == want.shape, key
        if want.dtype == object:
            assert list(got[key].ravel()) == list(want.ravel()), key
        else:
            assert got[key].dtype == want.dtype, key
            np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_second_run_makes_no_tool_call(searched: dict[str, object], queries: list[Target],
                                       dbs: DatabaseSet) -> None:
    out = Path(searched["out"])  # type: ignore[arg-type]
    again = featurize_many(queries, out_dir=out, databases=dbs, settings=SearchSettings(),
                           cpus=CPUS, cache_dir=out / ".cache")
    assert all(o.ok and o.tool_calls == 0 and o.reused == "target" for o in again)
    # a new output folder on the same cache: features copied, still no tool call
    fs = featurize_target(queries[0], out_dir=out / "elsewhere", databases=dbs,
                          settings=SearchSettings(), cpus=CPUS, cache_dir=out / ".cache")
    assert fs.extra["tool_calls"] == 0 and fs.extra["reused"] == "cache"
    assert '"cache_hit": true' in (out / "elsewhere" / queries[0].name / "timings.json").read_text()


def test_identical_sequences_searched_once_and_retry(tmp_path: Path, queries: list[Target],
                                                     dbs: DatabaseSet,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ids, one sequence: one search; the first jackhmmer call fails and is retried."""
    monkeypatch.setenv("FAKE_COUNTER", str(tmp_path / "count"))
    monkeypatch.setenv("FAKE_REAL", shutil.which("jackhmmer") or "jackhmmer")
    settings = SearchSettings(jackhmmer_binary=str(FAKES / "flaky_tool"))
    seq = queries[1].sequence
    twins = [Target("twin_a", "twin_a", seq), Target("twin_b", "twin_b", seq)]
    outcomes = featurize_many(twins, out_dir=tmp_path / "out", databases=dbs,
                              settings=settings, cpus=CPUS, cache_dir=tmp_path / "cache",
                              write_pkl=True)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert sorted(o.tool_calls for o in outcomes) == [0, 5]  # 4 searches + 1 retry, once
    assert (tmp_path / "count").read_text().strip() == "3"  # jackhmmer: 1 failure + 2 runs
    a, b = (read_feature_set(tmp_path / "out" / n).load() for n in ("twin_a", "twin_b"))
    assert a["domain_name"][0] == b"twin_a" and b["domain_name"][0] == b"twin_b"
    np.testing.assert_array_equal(a["msa"], b["msa"])
    # one features.npz on disk for both (and the cache), named for each target when loaded
    assert (tmp_path / "out" / "twin_a" / "features.npz").samefile(
        tmp_path / "out" / "twin_b" / "features.npz")
    for name in ("twin_a", "twin_b"):  # AlphaFold's features.pkl, as AlphaFold writes it
        with open(tmp_path / "out" / name / "features.pkl", "rb") as handle:
            pickled = pickle.load(handle)
        assert pickled["domain_name"][0] == name.encode()
        np.testing.assert_array_equal(pickled["msa"], a["msa"])


def test_a_search_killed_beside_another_is_retried_alone(tmp_path: Path, queries: list[Target],
                                                         dbs: DatabaseSet,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The out-of-memory killer's case: jackhmmer dies of SIGKILL whenever another jackhmmer
    runs beside it. The protein's UniRef90 and MGnify searches start together; the one killed
    runs again once no other search of the budget runs (retried beside the other, it would be
    killed again), and the protein gets its features."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_RUNNING_DIR", str(tmp_path / "running"))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_REAL", shutil.which("jackhmmer") or "jackhmmer")
    settings = SearchSettings(jackhmmer_binary=str(FAKES / "crowded_tool"))
    outcome, = featurize_many([queries[5]], out_dir=tmp_path / "out", databases=dbs,
                              settings=settings, cpus=3, cache_dir=tmp_path / "cache")
    assert outcome.ok, outcome.error
    calls = log.read_text().split()
    assert calls.count("ran") == 2 and calls.count("killed") >= 1, calls
    attempts = {f.stem: json.loads(f.read_text())["attempts"]
                for f in tmp_path.glob("**/.timings/jackhmmer_*.json")}
    assert sorted(attempts) == ["jackhmmer_mgnify", "jackhmmer_uniref90"], attempts
    assert max(attempts.values()) == 2, attempts


def test_a_failing_protein_does_not_stop_the_others(tmp_path: Path, queries: list[Target],
                                                    dbs: DatabaseSet,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    bad = queries[2]
    monkeypatch.setenv("FAKE_MARKER", bad.sequence[:40])
    monkeypatch.setenv("FAKE_REAL", shutil.which("hhblits") or "hhblits")
    settings = SearchSettings(hhblits_binary=str(FAKES / "marker_fail_tool"))
    outcomes = featurize_many([queries[3], bad], out_dir=tmp_path / "out", databases=dbs,
                              settings=settings, cpus=CPUS, cache_dir=tmp_path / "cache")
    good, failed = outcomes
    assert good.ok and good.tool_calls == 4
    assert not failed.ok and failed.feature_set is None
    assert "fake crash on the marked protein" in failed.error
    assert "hhblits_bfd_uniref30 failed after 2 attempts" in failed.error
    assert not (tmp_path / "out" / bad.name / "features.json").exists()


def test_timeout_fails_the_target(tmp_path: Path, queries: list[Target], dbs: DatabaseSet) -> None:
    settings = SearchSettings(hhsearch_binary=str(FAKES / "sleep_tool"), timeout_s=1.0)
    start = time.monotonic()
    outcome = featurize_many([queries[4]], out_dir=tmp_path / "out", databases=dbs,
                             settings=settings, cpus=CPUS, cache_dir=tmp_path / "cache")[0]
    assert not outcome.ok and "ToolTimeoutError" in outcome.error
    assert time.monotonic() - start < 30


def test_an_unusable_output_of_a_tool_that_exits_0_is_never_stored(
        tmp_path: Path, queries: list[Target], dbs: DatabaseSet) -> None:
    """hhblits exits 0 but leaves an empty A3M (a full disk it ignored): the attempt fails and
    nothing is stored, so the rerun searches again (it used to reuse the file and fail the
    target for ever). An unusable file an older version stored is searched again too."""
    real = shutil.which("hhblits")
    calls, fake = tmp_path / "calls", tmp_path / "hhblits"
    fake.write_text(f"""#!/bin/bash
echo call >> {calls}
if [ "$(wc -l < {calls})" = 1 ]; then
  while [ $# -gt 0 ]; do if [ "$1" = -oa3m ]; then : > "$2"; fi; shift; done
  exit 0
fi
exec {real} "$@"
""")
    fake.chmod(0o755)
    settings = SearchSettings(hhblits_binary=str(fake), retries=0)
    target, cache = queries[6], tmp_path / "cache"
    first, = featurize_many([target], out_dir=tmp_path / "out", databases=dbs,
                            settings=settings, cpus=CPUS, cache_dir=cache)
    assert not first.ok and "ToolFailedError" in first.error, first.error
    assert "bfd_uniref_hits.a3m is unusable: it is empty" in first.error
    assert not list(cache.glob("*/*/msas/bfd_uniref_hits.a3m"))
    second, = featurize_many([target], out_dir=tmp_path / "out", databases=dbs,
                             settings=settings, cpus=CPUS, cache_dir=cache)
    assert second.ok, second.error  # searched for real (the others: what the first left)
    assert len(calls.read_text().split()) == 2
    entry, = cache.glob("*/*")
    (entry / "msas" / MSA_FILES["bfd"]).write_text("")  # stored by an older version
    (entry / "features" / "features.json").unlink()
    third = featurize_target(target, out_dir=tmp_path / "out3", databases=dbs,
                             settings=settings, cpus=CPUS, cache_dir=cache)
    assert third.extra["tool_calls"] == 1 and len(calls.read_text().split()) == 3
    assert third.msa_depth == second.feature_set.msa_depth  # type: ignore[union-attr]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "parafold.cli", *args]


def test_bad_inputs_reported_and_good_records_featurized(searched: dict[str, object],
                                                         db: Path, queries: list[Target],
                                                         tmp_path: Path) -> None:
    good = queries[0]
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">{good.id}\n{good.sequence}\n>broken\nACDE1234\n>empty\n\n"
                     f">{good.id}\n{good.sequence}\n")
    out = tmp_path / "out"
    cache = Path(searched["out"]) / ".cache"  # type: ignore[arg-type]
    proc = subprocess.run(_cli("features", str(fasta), "-o", str(out), "--db-dir", str(db),
                               "--cpus", str(CPUS), "--cache-dir", str(cache)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"{fasta}:3 record 'broken': characters that are not amino-acid letters" in proc.stderr
    assert f"{fasta}:5 record 'empty': empty sequence" in proc.stderr
    assert f"{fasta}:7 record '{good.id}': duplicate id" in proc.stderr
    assert "1 of 1 targets have features" in proc.stdout
    assert read_feature_set(out / good.name).sequence == good.sequence


def test_sigkill_mid_run_then_rerun_completes(db: Path, queries: list[Target],
                                              tmp_path: Path) -> None:
    fasta = tmp_path / "in.fasta"
    chosen = queries[:3]
    fasta.write_text("".join(f">{t.id}\n{t.sequence}\n" for t in chosen))
    out = tmp_path / "out"
    args = _cli("features", str(fasta), "-o", str(out), "--db-dir", str(db), "--cpus", "2")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(6.0)  # mid-search: imports take ~2 s, each protein ~5 s of searches
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # whatever a later run would trust is whole: every manifest has its complete features
    sets, problems = find_feature_sets(out)
    assert not problems
    for fs in sets:
        assert fs.load()["aatype"].shape[0] == fs.length
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    for t in chosen:
        fs = read_feature_set(out / t.name)
        assert fs.sequence == t.sequence
        for name in (MSA_FILES["uniref90"], MSA_FILES["mgnify"], MSA_FILES["bfd"],
                     MSA_FILES["pdb70"]):
            assert (out / t.name / "msas" / name).stat().st_size > 0
    assert not list(out.rglob("*.part"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_ends_features_without_waiting_for_the_searches(
        db: Path, queries: list[Target], tmp_path: Path, sig: signal.Signals) -> None:
    """A jackhmmer that would run for 300 s (as on real databases): SIGTERM, or SIGINT to the
    process alone, ends `features` within seconds (it used to wait for every search under
    way), with 143 or 130, and the tool and its child die with it."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    slow = fakes / "jackhmmer"
    slow.write_text("#!/usr/bin/env bash\nsleep 300 &\necho $! >> \"$FAKE_PID_FILE\"\nwait\n")
    slow.chmod(0o755)
    pid_file = tmp_path / "tool_children"
    fasta = tmp_path / "in.fasta"
    fasta.write_text(f">{queries[0].id}\n{queries[0].sequence}\n")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fakes}:{os.environ['PATH']}",
           "FAKE_PID_FILE": str(pid_file)}
    # SIGINT as a terminal's job gets it, even where this test's own is ignored (a background
    # CI job); reset in a wrapper that execs, not in preexec_fn (a fork of a JAX process)
    default_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen(
        [sys.executable, "-c", default_sigint,
         *_cli("features", str(fasta), "-o", str(out), "--db-dir", str(db), "--cpus", "2")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the slow search never started"
            time.sleep(0.1)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        children = [int(p) for p in pid_file.read_text().split()] if pid_file.is_file() else []
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), output
    assert "rerun the same command to resume" in output and "Traceback" not in output, output
    deadline = time.monotonic() + 10
    for child in children:
        while _running(child):
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                raise AssertionError(f"the slow jackhmmer's child {child} outlived features")
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is reaped by init later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigusr1_drains_features_the_searches_under_way_finish(
        db: Path, queries: list[Target], tmp_path: Path) -> None:
    """SIGUSR1 to the whole process group (Slurm's `--signal=USR1@...` before a time limit)
    once the first protein is searching: its search (and any other under way) finishes and
    is kept, no other starts, the tools were not killed by the signal, and `features` exits
    75 naming the proteins left for the rerun."""
    chosen = queries[:3]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{t.id}\n{t.sequence}\n" for t in chosen))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli("features", str(fasta), "-o", str(out), "--db-dir", str(db), "--cpus", "2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "searching (" in line:
                os.killpg(proc.pid, signal.SIGUSR1)
                break
        # the rest through the same buffer the loop read from (communicate() reads the pipe
        # itself and loses lines already buffered: another protein's "searching" line)
        watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            rest = proc.stdout.read()
        finally:
            watchdog.cancel()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 75, output
    assert "stopped early (SIGUSR1: asked to drain)" in output, output
    assert "Traceback" not in output, output
    started = [t for t in chosen if f"{t.name}: searching (" in output]
    assert started and len(started) < len(chosen), output
    for t in started:  # finished, whole, though the signal came mid-search
        assert read_feature_set(out / t.name).sequence == t.sequence
    for t in chosen:
        if t not in started:
            assert f"stopped: {t.id} " in output and "not searched: SIGUSR1" in output, output
            assert not (out / t.name / "features.json").exists()


def test_a_stockholm_output_cut_short_or_without_sequences_is_unusable() -> None:
    """jackhmmer's outputs are checked by their shape, not parsed (they reach hundreds of MB)."""
    from parafold.search.msa_search import _output_problem

    good = "# STOCKHOLM 1.0\n\n#=GS q DE query\nq ACDE\nh1 AC-E\n#=GC RF xxxx\n//\n"
    assert _output_problem("uniref90_hits.sto", good) == ""
    assert "cut short" in _output_problem("uniref90_hits.sto", good[:-3])
    assert "no sequence" in _output_problem("uniref90_hits.sto",
                                            "# STOCKHOLM 1.0\n#=GC RF xx\n//\n")
    assert "not a Stockholm" in _output_problem("mgnify_hits.sto", ">q\nACDE\n")
    assert "empty" in _output_problem("mgnify_hits.sto", "\n")


def test_features_refuses_a_negative_cpu_budget_as_a_usage_error(tmp_path: Path) -> None:
    """Exit 2 (bad options), as run does: a traceback and exit 1 read as failed targets."""
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAKQR\n")
    proc = subprocess.run(_cli("features", str(fasta), "-o", str(tmp_path / "out"),
                               "--db-dir", str(tmp_path), "--cpus", "-1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpus must be >= 0" in proc.stderr, proc.stderr
