"""Search-stage units that need no database: commands, the subprocess recipe, budget, layout."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from parafold.errors import (
    DatabaseNotFoundError,
    InputError,
    ToolFailedError,
    ToolKilledError,
    ToolNotFoundError,
    ToolTimeoutError,
    was_killed,
)
from parafold.search.budget import CpuBudget, threads_per_search
from parafold.search.databases import check_databases, find_databases
from parafold.search.settings import SearchSettings
from parafold.search.tools import HHBlits, HHSearch, Jackhmmer, run_tool
from parafold.store import fingerprint_files

FAKES = Path(__file__).parent / "fakes"


def _hh_db(prefix: Path) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for part in ("a3m", "hhm", "cs219"):
        for ext in ("ffdata", "ffindex"):
            (prefix.parent / f"{prefix.name}_{part}.{ext}").write_text("x")
    return prefix


def test_jackhmmer_command_has_alphafold_flags(tmp_path: Path) -> None:
    db = tmp_path / "uniref90.fasta"
    db.write_text(">a\nACDE\n")
    cmd = Jackhmmer(database=db, binary=sys.executable, cpus=3).build_command(
        Path("q.fasta"), Path("o.sto"))
    assert cmd[0] == os.path.abspath(sys.executable)
    flags = cmd[1:-2]
    pairs = dict(zip(flags[::1], flags[1:], strict=False))
    assert pairs["-A"] == "o.sto" and pairs["-o"] == "/dev/null" and "--noali" in flags
    assert pairs["-N"] == "1" and pairs["-E"] == "0.0001" and pairs["--incE"] == "0.0001"
    assert pairs["--F1"] == "0.0005" and pairs["--F2"] == "5e-05" and pairs["--F3"] == "5e-07"
    assert pairs["--cpu"] == "3"
    assert cmd[-2:] == ["q.fasta", str(db)]


def test_hhblits_and_hhsearch_commands(tmp_path: Path) -> None:
    bfd, uniref = _hh_db(tmp_path / "bfd" / "bfd"), _hh_db(tmp_path / "u30" / "UniRef30")
    cmd = HHBlits(databases=[bfd, uniref], binary=sys.executable, cpus=2).build_command(
        Path("q.fasta"), Path("o.a3m"))
    text = " ".join(cmd[1:])
    assert ("-i q.fasta -cpu 2 -oa3m o.a3m -o /dev/null -n 3 -e 0.001 -maxseq 1000000 "
            "-realign_max 100000 -maxfilt 100000 -min_prefilter_hits 1000") in text
    assert text.endswith(f"-d {bfd} -d {uniref}")
    pdb70 = _hh_db(tmp_path / "pdb70" / "pdb70")
    cmd = HHSearch(databases=[pdb70], binary=sys.executable).build_command(
        Path("q.a3m"), Path("o.hhr"))
    assert cmd[1:] == ["-i", "q.a3m", "-o", "o.hhr", "-maxseq", "1000000", "-cpu", "1",
                       "-d", str(pdb70)]


def test_constructors_fail_early(tmp_path: Path) -> None:
    with pytest.raises(ToolNotFoundError):
        Jackhmmer(database=tmp_path, binary="no-such-jackhmmer-binary")
    with pytest.raises(DatabaseNotFoundError):
        Jackhmmer(database=tmp_path / "missing.fasta", binary=sys.executable)
    with pytest.raises(DatabaseNotFoundError):
        HHBlits(databases=[tmp_path / "nothing"], binary=sys.executable)
    with pytest.raises(DatabaseNotFoundError):
        HHSearch(databases=[], binary=sys.executable)


def test_failed_tool_raises_with_stderr_tail() -> None:
    with pytest.raises(ToolFailedError) as info:
        run_tool([str(FAKES / "fail_tool"), "--x"], timeout_s=30)
    assert info.value.returncode == 3
    assert "database is corrupt" in info.value.stderr_tail
    assert "database is corrupt" in str(info.value)


def test_missing_program_is_tool_not_found(tmp_path: Path) -> None:
    with pytest.raises(ToolNotFoundError):
        run_tool([str(tmp_path / "nope")], timeout_s=5)


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "FAKE_PID_FILE": str(pid_file)}
    start = time.monotonic()
    with pytest.raises(ToolTimeoutError) as info:
        run_tool([str(FAKES / "sleep_tool")], timeout_s=1.0, env=env)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 10
    _assert_gone(int(pid_file.read_text()))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _assert_gone(pid: int, within_s: float = 5.0) -> None:
    """The process ends (is gone, or a zombie: reaped by init later) within `within_s`; if
    not, it is killed so that a failing test leaves no 300 s sleep behind."""
    import signal

    deadline = time.monotonic() + within_s
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} outlived its tool")
        time.sleep(0.05)


def test_run_tool_measures_the_tools_peak_memory() -> None:
    """The tool's own peak (a grandchild under a shell here): neither the small guard's nor
    the caller's, which a forked child's peak starts at on Linux (the caller holds 700 MiB)."""
    held = bytearray(700 << 20)
    held[::4096] = b"x" * len(held[::4096])  # resident, not only reserved
    grow = "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"
    run = run_tool(["bash", "-c", f'"{sys.executable}" -c "{grow}"; true'], timeout_s=60)
    assert 300 <= run.max_rss_mib < 600, run.max_rss_mib
    assert run_tool(["true"], timeout_s=60).max_rss_mib < 100
    del held


def test_run_tool_measures_the_childs_own_cpu_time(tmp_path: Path) -> None:
    burn = "import time\nt=time.process_time()\nwhile time.process_time()-t<0.4: pass\n"
    idle = [sys.executable, "-c", "import time; time.sleep(0.4)"]
    results: dict[str, float] = {}

    def go(name: str, cmd: list[str]) -> None:
        results[name] = run_tool(cmd, timeout_s=30).cpu_s

    threads = [threading.Thread(target=go, args=("burn", [sys.executable, "-c", burn])),
               threading.Thread(target=go, args=("idle", idle))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["burn"] >= 0.35
    assert results["idle"] < 0.3  # not charged with the other thread's child


def test_cache_fields_ignore_how_tools_run() -> None:
    a = SearchSettings()
    b = SearchSettings(threads_per_search=4, timeout_s=5, retries=3, jackhmmer_binary="/x")
    assert a.cache_fields() == b.cache_fields()
    assert a.cache_fields() != SearchSettings(max_template_date="2021-01-01").cache_fields()
    assert a.cache_fields() != SearchSettings(preset="reduced_dbs").cache_fields()
    with pytest.raises(InputError):
        SearchSettings(max_template_date="yesterday")
    with pytest.raises(InputError):
        SearchSettings(preset="huge_dbs")


def test_threads_per_search_splits_the_budget() -> None:
    assert threads_per_search(24, 1) == 8
    assert threads_per_search(12, 1) == 4
    assert threads_per_search(16, 1000) == 1
    assert threads_per_search(2, 1) == 1
    assert threads_per_search(4, 1, requested=16) == 4


def test_budget_never_oversubscribes() -> None:
    budget = CpuBudget(3)
    peak, lock, in_use = [0], threading.Lock(), [0]

    def work(cores: int) -> None:
        with budget.hold(cores) as got:
            with lock:
                in_use[0] += got
                peak[0] = max(peak[0], in_use[0])
            time.sleep(0.02)
            with lock:
                in_use[0] -= got

    threads = [threading.Thread(target=work, args=(c,)) for c in (1, 2, 2, 1, 5, 1, 2) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 3 and budget.free == 3


def test_alone_waits_for_the_holds_running_and_goes_before_later_ones() -> None:
    budget = CpuBudget(3)
    order: list[str] = []
    first = budget.hold(1)
    first.__enter__()

    def alone() -> None:
        with budget.alone() as cores:
            order.append(f"alone {cores} free {budget.free}")

    def later() -> None:
        with budget.hold(1):
            order.append("later")

    waiting = threading.Thread(target=alone)
    waiting.start()
    time.sleep(0.2)  # the alone hold waits for the running one
    behind = threading.Thread(target=later)
    behind.start()
    time.sleep(0.2)  # 2 cores are free, but a later hold does not pass the waiting alone one
    assert order == []
    first.__exit__(None, None, None)
    waiting.join(5)
    behind.join(5)
    assert order == ["alone 3 free 0", "later"] and budget.free == 3


def _layout(db: Path) -> None:
    (db / "uniref90").mkdir(parents=True)
    (db / "uniref90" / "uniref90.fasta").write_text(">a\nACDE\n")
    (db / "mgnify").mkdir()
    (db / "mgnify" / "mgy_clusters_2022_05.fa").write_text(">a\nACDE\n")
    _hh_db(db / "bfd" / "bfd_metaclust")
    _hh_db(db / "uniref30" / "UniRef30_2021_03")
    _hh_db(db / "pdb70" / "pdb70")
    (db / "pdb_mmcif" / "mmcif_files").mkdir(parents=True)
    (db / "pdb_mmcif" / "mmcif_files" / "1abc.cif").write_text("data_1abc\n")


def test_find_databases_layout_overrides_and_fingerprints(tmp_path: Path) -> None:
    db = tmp_path / "db"
    _layout(db)
    dbs = find_databases(db, "full_dbs")
    assert dbs.missing() == []
    assert dbs.path("bfd") == (db / "bfd" / "bfd_metaclust").absolute()
    assert dbs.path("small_bfd") is None
    prints = dbs.fingerprint_map()
    assert set(prints) == set(dbs.required)
    assert find_databases(db, "full_dbs").fingerprint_map() == prints
    # a copy with new times (`cp` without -p, as jobs stage databases to local disks) and a
    # touched file keep every fingerprint: the searches would find the same
    copy = tmp_path / "local_disk" / "db"
    shutil.copytree(db, copy, copy_function=shutil.copyfile)
    os.utime(copy / "uniref90" / "uniref90.fasta", ns=(1, 1))
    assert find_databases(copy, "full_dbs").fingerprint_map() == prints
    # a changed byte (same size) changes that database's alone; so does an mmCIF of new size
    (copy / "uniref90" / "uniref90.fasta").write_text(">a\nACDF\n")
    (copy / "pdb_mmcif" / "mmcif_files" / "1abc.cif").write_text("data_1abc\n#\n")
    again = find_databases(copy, "full_dbs").fingerprint_map()
    assert {n for n in prints if again[n] != prints[n]} == {"uniref90", "pdb_mmcif"}
    # an override by file, and one by folder
    other = tmp_path / "elsewhere" / "u90.fasta"
    other.parent.mkdir()
    other.write_text(">b\nKLMN\n")
    over = find_databases(db, "full_dbs", {"uniref90": other, "pdb70": db / "pdb70"})
    assert over.path("uniref90") == other.absolute()
    assert over.fingerprint_map()["uniref90"] != prints["uniref90"]
    with pytest.raises(InputError, match="--mgnify"):
        find_databases(db, "full_dbs", {"mgnify": tmp_path / "missing.fa"})
    reduced = find_databases(db, "reduced_dbs")
    assert reduced.missing() == ["small_bfd"]
    with pytest.raises(DatabaseNotFoundError, match="small_bfd"):
        reduced.fingerprinted()
    status = {s.name: s for s in check_databases(reduced)}
    assert not status["small_bfd"].present and status["small_bfd"].required
    assert status["uniref90"].present and len(status["uniref90"].fingerprint) == 64



_MMSEQS_FILES = ("", ".dbtype", ".index", ".lookup", ".source", ".idx", ".idx.dbtype",
                 ".idx.index", "_h", "_h.dbtype", "_h.index", "_seq", "_seq.dbtype", "_seq.index",
                 "_seq.lookup", "_seq_h", "_seq_h.dbtype", "_seq_h.index", "_aln.0", "_aln.1",
                 "_aln.dbtype", "_aln.index", "_mapping", "_taxonomy")


def test_a_large_files_fingerprint_reads_its_start_middle_and_end(tmp_path: Path) -> None:
    big = tmp_path / "big.fasta"
    data = bytearray(os.urandom(1 << 20))
    big.write_bytes(data)
    first, names_and_sizes = fingerprint_files([big]), fingerprint_files([big], sample=False)
    for where in (0, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[where] ^= 0xFF
        big.write_bytes(changed)
        assert fingerprint_files([big]) != first, where
        assert fingerprint_files([big], sample=False) == names_and_sizes  # (mmCIF files)
    big.write_bytes(data)
    assert fingerprint_files([big]) == first


def _mmseqs_db(prefix: Path) -> Path:
    """The files `mmseqs createdb`/`createindex` and ColabFold's setup leave for one database."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for suffix in _MMSEQS_FILES:
        prefix.with_name(prefix.name + suffix).write_text("x")
    return prefix


def test_several_candidates_for_a_database_are_named_once(tmp_path: Path, caplog) -> None:
    """An upgrade that kept the old release beside the new one: which file is searched is
    said (once), with the flag that chooses another."""
    import logging

    db = tmp_path / "db"
    _layout(db)
    (db / "mgnify" / "zz_older.fa").write_text(">m\nACDF\n")
    with caplog.at_level(logging.WARNING, logger="parafold.search.databases"):
        first = find_databases(db, "full_dbs").path("mgnify")
        assert find_databases(db, "full_dbs").path("mgnify") == first
    warnings = [r.getMessage() for r in caplog.records if "candidates" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "mgnify: 2 candidates" in warnings[0] and "zz_older.fa" in warnings[0]
    assert f"using {first.name}" in warnings[0] and "--mgnify PATH" in warnings[0]
    (db / "small_bfd").mkdir(exist_ok=True)  # the option's spelling, not the database's name
    for name in ("a.fasta", "b.fasta"):
        (db / "small_bfd" / name).write_text(">s\nACDF\n")
    with caplog.at_level(logging.WARNING, logger="parafold.search.databases"):
        find_databases(db, "reduced_dbs")
    assert "give --small-bfd PATH to choose" in caplog.text


def test_sibling_mmseqs_database_does_not_change_fingerprint(tmp_path: Path) -> None:
    """`pdb` and `pdb100_db`, `uniref30_db` and `uniref30_db2`: one name starts the other, but
    the files of one database are never counted as the other's."""
    folder = tmp_path / "db" / "mmseqs"
    uniref, pdb = _mmseqs_db(folder / "uniref30_db"), _mmseqs_db(folder / "pdb")
    before = find_databases(tmp_path / "db", msa_mode="mmseqs")
    prints = before.fingerprint_map()
    status = {s.name: s.fingerprint for s in check_databases(before)}
    assert set(prints) == {"mmseqs_uniref30", "mmseqs_pdb"}
    _mmseqs_db(folder / "uniref30_db2")
    _mmseqs_db(folder / "pdb100_db")
    after = find_databases(tmp_path / "db", msa_mode="mmseqs")
    assert after.path("mmseqs_uniref30") == uniref.absolute()
    assert after.path("mmseqs_pdb") == pdb.absolute()
    assert after.fingerprint_map() == prints
    assert {s.name: s.fingerprint for s in check_databases(after)} == status
    from parafold.search.databases import mmseqs_db_files
    from parafold.search.mmseqs import _shadow

    # the database's own files, all of them; none of the sibling's
    for prefix in (uniref, pdb):
        assert [p.name for p in mmseqs_db_files(prefix)] == sorted(
            prefix.name + suffix for suffix in _MMSEQS_FILES)
    # a changed file of its own still changes it
    (folder / "pdb_seq.index").write_text("y")
    assert find_databases(tmp_path / "db", msa_mode="mmseqs").fingerprint_map() != prints
    # a read-only database's shadow links its own files only
    shadow = _shadow(pdb, tmp_path / "index")
    assert sorted(p.name for p in shadow.parent.iterdir()) == sorted(
        "pdb" + suffix for suffix in _MMSEQS_FILES if not suffix.startswith(".idx"))


def test_sibling_hh_database_does_not_change_fingerprint(tmp_path: Path) -> None:
    """`pdb70` beside `pdb70_2023_a3m.ffdata`...: the sibling is not part of pdb70."""
    from parafold.search.databases import hh_db_files
    from parafold.search.tools import HHSearch

    folder = tmp_path / "pdb70"
    folder.mkdir()

    def hh_db(prefix: str) -> Path:
        for part in ("a3m", "cs219", "hhm"):
            for ext in ("ffdata", "ffindex"):
                (folder / f"{prefix}_{part}.{ext}").write_text(prefix)
        return folder / prefix

    own = hh_db("pdb70")
    prints = fingerprint_files(hh_db_files(own))
    hh_db("pdb70_2023")
    assert [p.name for p in hh_db_files(own)] == sorted(
        f"pdb70_{part}.{ext}" for part in ("a3m", "cs219", "hhm") for ext in ("ffdata", "ffindex"))
    assert fingerprint_files(hh_db_files(own)) == prints
    with pytest.raises(DatabaseNotFoundError, match="no database files"):
        HHSearch(databases=[folder / "pdb7"])


def test_interrupted_wait_kills_the_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or any exception) while waiting must not leave the tool running: it sits in its
    own session, so the terminal's SIGINT never reaches it."""
    from parafold.search import tools

    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "FAKE_PID_FILE": str(pid_file)}
    real_join = threading.Thread.join

    class InterruptedThread(threading.Thread):
        interrupted = False

        def join(self, timeout: float | None = None) -> None:
            if timeout is not None and not InterruptedThread.interrupted:
                InterruptedThread.interrupted = True
                for _ in range(100):  # let the tool start its child first
                    if pid_file.is_file() and pid_file.read_text().strip():
                        break
                    time.sleep(0.05)
                raise KeyboardInterrupt
            real_join(self, timeout)

    monkeypatch.setattr(tools.threading, "Thread", InterruptedThread)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_tool([str(FAKES / "sleep_tool")], timeout_s=60, env=env)
    assert time.monotonic() - start < 20
    _assert_gone(int(pid_file.read_text()))



def test_background_children_do_not_outlive_a_finished_tool(tmp_path: Path) -> None:
    """A tool that exits 0 but leaves a child running in the background: run_tool kills it."""

    pid_file = tmp_path / "child.pid"
    env = {**os.environ, "FAKE_PID_FILE": str(pid_file)}
    run = run_tool([str(FAKES / "orphan_tool")], timeout_s=30, env=env)
    assert run.returncode == 0
    _assert_gone(int(pid_file.read_text()))

def test_malformed_m8_row_is_a_feature_error() -> None:
    from parafold.errors import FeatureError
    from parafold.search.mmseqs_templates import hit_from_m8_row

    good = ["q0", "1abc_A", "1.0", "4", "0", "0", "1", "4", "1", "4", "1e-5", "50.0", "4M",
            "ACDE"]
    assert hit_from_m8_row(0, "\t".join(good), "ACDE").query == "ACDE"
    for column, value in ((6, "x"), (11, "n/a"), (6, "0")):
        row = list(good)
        row[column] = value
        with pytest.raises(FeatureError, match="m8 row 0"):
            hit_from_m8_row(0, "\t".join(row), "ACDE")


def test_mmseqs_features_name_the_empty_msa_file(tmp_path: Path) -> None:
    from parafold.errors import FeatureError
    from parafold.search.features import mmseqs_features

    (tmp_path / "uniref.a3m").write_text("\n")
    with pytest.raises(FeatureError, match="uniref.a3m"):
        mmseqs_features("ACDE", "query", tmp_path,
                        databases=find_databases(None, msa_mode="mmseqs"),
                        settings=SearchSettings(msa_mode="mmseqs"))


def test_group_is_killed_before_the_tool_is_reaped(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Killing a finished tool's group must happen while its leader is still an unreaped
    zombie: once reaped, its pid (the group id) may be reused by an unrelated process group,
    such as another thread's tool, which the kill would then hit."""
    killed: list[tuple[int, bool]] = []
    real_killpg = os.killpg

    def killpg(pgid: int, sig: int) -> None:
        stat = Path(f"/proc/{pgid}/stat")
        ours = stat.is_file() and int(stat.read_text().split(")")[1].split()[1]) == os.getpid()
        killed.append((pgid, ours))
        real_killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", killpg)
    run = run_tool([sys.executable, "-c", "pass"], timeout_s=30)
    assert run.returncode == 0
    assert killed and all(ours for _, ours in killed), killed
    with pytest.raises(ToolTimeoutError):
        run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert all(ours for _, ours in killed), killed


_WORKER = """
import sys, threading
from parafold.search.tools import run_tool
# from a thread, as the searches of one protein run
thread = threading.Thread(target=run_tool, args=([sys.argv[1]],), kwargs={"timeout_s": 600})
thread.start()
thread.join()
"""


def test_a_tool_dies_with_the_search_worker_that_started_it(tmp_path: Path) -> None:
    """A search worker killed without cleaning up (SIGKILL, the OOM killer; workers die with a
    killed run) must not leave its tool running, for hours on real databases, beside the
    rerun's searches: the tool and the child it started are gone within seconds."""
    import signal
    import subprocess

    pid_file = tmp_path / "child.pid"
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(FAKES / "sleep_tool")],
                              env={**os.environ, "FAKE_PID_FILE": str(pid_file)})
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, "the tool never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert "Z" not in _state(child)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    _assert_gone(child)


def test_a_tool_killed_by_a_signal_is_reported_as_such() -> None:
    with pytest.raises(ToolFailedError) as info:
        run_tool([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
                 timeout_s=30)
    assert info.value.returncode == -15 and not was_killed(info.value)


@pytest.mark.parametrize("how", ["itself", "under a shell"])
def test_a_tool_killed_by_sigkill_is_named_as_likely_out_of_memory(how: str) -> None:
    """SIGKILL that parafold did not send is the out-of-memory killer's signal: the error says
    so, survives pickling (it comes back from a worker process) and is found in a chain."""
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    cmd = ([sys.executable, "-c", kill] if how == "itself"
           else ["bash", "-c", f'"{sys.executable}" -c "{kill}"; exit $?'])
    with pytest.raises(ToolKilledError) as info:
        run_tool(cmd, timeout_s=30)
    assert info.value.returncode == (-9 if how == "itself" else 137)
    assert "killed (SIGKILL), most likely for want of memory" in str(info.value)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is ToolKilledError and str(again) == str(info.value)
    try:
        raise RuntimeError("the search of one protein failed") from again
    except RuntimeError as wrapped:
        assert was_killed(wrapped)
