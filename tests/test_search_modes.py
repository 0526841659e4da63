"""MSA modes besides classic: MMseqs2 batch search (real mmseqs), precomputed MSAs, single
sequence; their keys, resume and validation."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from alphafold.data import parsers, pipeline, templates

from parafold.featureset import read_feature_set
from parafold.inputs import Target, read_targets
from parafold.search.databases import DatabaseSet, find_databases
from parafold.search.runner import cache_key, target_key
from parafold.search.scheduler import TargetOutcome, featurize_many
from parafold.search.settings import SearchSettings
from parafold.testdata import read_truth

CPUS = 2
MODES = ("classic", "mmseqs", "precomputed", "single_sequence")


def _logged_mmseqs(folder: Path) -> tuple[Path, Path]:
    """A wrapper that records every call, then runs the real mmseqs (no fake results)."""
    log, wrapper = folder / "calls.log", folder / "mmseqs_logged"
    real = shutil.which("mmseqs")
    assert real is not None
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def _calls(log: Path, module: str) -> list[str]:
    if not log.is_file():
        return []
    return [line for line in log.read_text().splitlines() if line.split()[0] == module]


@pytest.fixture(scope="module")
def db(synthetic_db: Path) -> Path:
    return Path(synthetic_db)


@pytest.fixture(scope="module")
def queries(db: Path) -> list[Target]:
    return list(read_targets(db / "queries.fasta").targets)


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory: pytest.TempPathFactory, db: Path,
           queries: list[Target]) -> dict[str, object]:
    """Every query through MMseqs2 mode once, with the calls recorded."""
    out = tmp_path_factory.mktemp("mmseqs")
    wrapper, log = _logged_mmseqs(out)
    settings = SearchSettings(msa_mode="mmseqs", mmseqs_binary=str(wrapper))
    outcomes = featurize_many(queries, out_dir=out / "features",
                              databases=find_databases(db, msa_mode="mmseqs"),
                              settings=settings, cpus=CPUS, cache_dir=out / "cache")
    return {"out": out / "features", "outcomes": outcomes, "log": log, "settings": settings}


def _ok(outcomes: object) -> list[TargetOutcome]:
    result = list(outcomes)  # type: ignore[call-overload]
    assert all(o.ok for o in result), [o.error for o in result]
    return result


def test_mmseqs_recall_and_unrelated_hits(mm_run: dict[str, object], db: Path,
                                          queries: list[Target]) -> None:
    """>= 90% of each family's members in its MSAs and template hits, <= 5% unrelated."""
    _ok(mm_run["outcomes"])
    truth = read_truth(db / "truth.tsv")
    out = Path(mm_run["out"])  # type: ignore[arg-type]
    for target in queries:
        msas = out / target.name / "msas"
        hits: set[str] = set()
        for name in ("uniref.a3m", "env.a3m"):
            hits |= {d.split()[0] for d in parsers.parse_a3m((msas / name).read_text()).descriptions}
        hits |= {row.split("\t")[1] for row in (msas / "pdb_hits.m8").read_text().splitlines()}
        hits.discard("query")
        family = target.id.split("_")[0]
        members = {k for k, v in truth.items() if v == family and not k.startswith("PDBMSA")}
        unrelated = {h for h in hits if truth.get(h, "") == ""}
        assert len(hits & members) >= 0.9 * len(members), (target.id, members - hits)
        assert len(unrelated) <= 0.05 * len(hits), (target.id, unrelated)


def test_mmseqs_searches_all_queries_in_one_batch(mm_run: dict[str, object],
                                                  queries: list[Target]) -> None:
    outcomes = _ok(mm_run["outcomes"])
    log = Path(mm_run["log"])  # type: ignore[arg-type]
    searches = _calls(log, "search")
    assert len(searches) == 3  # uniref30, env, pdb: once each for 8 queries
    # ColabFold's default k-mer thresholds for the profile searches, -s 7.5 for templates
    assert sum("--k-score seq:96,prof:80" in c and " -s " not in c for c in searches) == 2
    assert sum(" -s 7.5 " in c for c in searches) == 1
    assert len(_calls(log, "createdb")) == 1 and not _calls(log, "createindex")
    assert sum(o.tool_calls for o in outcomes) == len(log.read_text().splitlines())
    first = read_feature_set(Path(mm_run["out"]) / queries[0].name)  # type: ignore[arg-type]
    assert first.msa_mode == "mmseqs" and first.msa_depth > 5
    assert sum(o.feature_set.num_templates > 0 for o in outcomes  # type: ignore[union-attr]
               ) >= len(queries) // 2 - 1  # every other family has a template


def test_mmseqs_sensitivity_is_passed_checked_and_keyed(tmp_path: Path, db: Path,
                                                        queries: list[Target]) -> None:
    from parafold.errors import InputError

    with pytest.raises(InputError, match="sensitivity"):
        SearchSettings(msa_mode="mmseqs", mmseqs_sensitivity=0)
    default = SearchSettings(msa_mode="mmseqs")
    fast = SearchSettings(msa_mode="mmseqs", mmseqs_sensitivity=6.0)
    dbs = find_databases(db, msa_mode="mmseqs").fingerprinted()
    seq = queries[0].sequence
    assert cache_key(seq, dbs, default) != cache_key(seq, dbs, fast)
    wrapper, log = _logged_mmseqs(tmp_path)
    _ok(featurize_many(queries[:1], out_dir=tmp_path / "out", databases=dbs,
                       settings=SearchSettings(msa_mode="mmseqs", mmseqs_sensitivity=6.0,
                                               mmseqs_binary=str(wrapper)),
                       cpus=CPUS, cache_dir=tmp_path / "cache"))
    searches = _calls(log, "search")
    assert sum(" -s 6.0 " in c for c in searches) == 2
    assert not any("--k-score" in c for c in searches)


def test_mmseqs_index_is_made_once_and_reused(tmp_path: Path, db: Path,
                                              queries: list[Target]) -> None:
    copy = tmp_path / "dbcopy"
    copy.mkdir()
    for f in (db / "mmseqs").glob("uniref30_db*"):
        if ".idx" not in f.name:
            shutil.copy(f, copy / f.name)
    wrapper, log = _logged_mmseqs(tmp_path)
    dbs = find_databases(db, overrides={"mmseqs_uniref30": copy / "uniref30_db"},
                         msa_mode="mmseqs")
    settings = SearchSettings(msa_mode="mmseqs", mmseqs_binary=str(wrapper))
    for run in ("first", "second"):  # a fresh cache each time: both runs search
        _ok(featurize_many(queries[:2], out_dir=tmp_path / run, databases=dbs,
                           settings=settings, cpus=CPUS, cache_dir=tmp_path / f"cache_{run}"))
        assert len(_calls(log, "createindex")) == 1, run
    assert (copy / "uniref30_db.idx.dbtype").is_file()


def _createdb(fasta_text: str, prefix: Path) -> None:
    """`prefix` made afresh from `fasta_text` (a new release at the same path)."""
    for old in prefix.parent.glob(prefix.name + "*"):
        if ".idx" not in old.name:
            old.unlink()
    fasta = prefix.parent.parent / "release.fasta"
    fasta.write_text(fasta_text)
    subprocess.run(["mmseqs", "createdb", str(fasta), str(prefix), "-v", "1"], check=True)


@pytest.mark.parametrize("shadow", [True, False])
def test_mmseqs_index_is_remade_when_its_database_is_replaced(
        tmp_path: Path, db: Path, queries: list[Target], shadow: bool) -> None:
    """A new release at the same path gets a new index (in the shadow folder and beside the
    database): the old index's hits would be stored under the new database's cache key."""
    from parafold.search.databases import database_fingerprint
    from parafold.search.mmseqs import Mmseqs, ensure_index, search_batch

    prefix = tmp_path / "dbs" / "uniref30_db"
    prefix.parent.mkdir()
    wrapper, log = _logged_mmseqs(tmp_path)
    settings = SearchSettings(msa_mode="mmseqs", mmseqs_binary=str(wrapper),
                              mmseqs_num_iterations=1,
                              mmseqs_index_dir=str(tmp_path / "index") if shadow else "")
    rng = np.random.default_rng(3)
    unrelated = "".join(f">rnd{i}\n" + "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 120))
                        + "\n" for i in range(30))

    rows = []
    for n, release in enumerate(((db / "uniref90" / "uniref90.fasta").read_text(), unrelated)):
        _createdb(release, prefix)
        out = search_batch([("q0", queries[0].sequence)], tmp_path / f"work{n}", uniref=prefix,
                           env=None, pdb=None, settings=settings, threads=CPUS)
        rows.append(out.msas["q0"]["uniref"].count(">"))
    assert rows[0] > 1 and rows[1] == 1, rows  # release 2 has no relative: the query alone
    assert len(_calls(log, "createindex")) == 2
    indexed = next((tmp_path / "index").iterdir()) / prefix.name if shadow else prefix
    stamp = indexed.with_name(prefix.name + ".idx.fingerprint")
    assert stamp.read_text().strip() == database_fingerprint("mmseqs_uniref30", prefix)
    if not shadow:  # an index without a stamp beside the database is someone else's: kept
        stamp.unlink()
        assert ensure_index(Mmseqs(binary=str(wrapper)), prefix) == prefix
        assert len(_calls(log, "createindex")) == 2


def _precomputed_folder(mm_out: Path, folder: Path, targets: list[Target]) -> Path:
    """Each target's uniref and env A3M from the MMseqs2 run concatenated, as `<id>.a3m`."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in targets:
        msas = mm_out / t.name / "msas"
        (folder / f"{t.id}.a3m").write_text(
            (msas / "uniref.a3m").read_text() + (msas / "env.a3m").read_text())
    return folder


def test_precomputed_features_equal_search_features(mm_run: dict[str, object], db: Path,
                                                    queries: list[Target],
                                                    tmp_path: Path) -> None:
    mm_out = Path(mm_run["out"])  # type: ignore[arg-type]
    chosen = queries[:3]
    folder = _precomputed_folder(mm_out, tmp_path / "msas", chosen)
    settings = SearchSettings(msa_mode="precomputed", msa_dir=str(folder))
    outcomes = _ok(featurize_many(chosen, out_dir=tmp_path / "out",
                                  databases=find_databases(None, msa_mode="precomputed"),
                                  settings=settings, cpus=CPUS, cache_dir=tmp_path / "cache"))
    assert all(o.tool_calls == 0 for o in outcomes)
    for t in chosen:
        searched = read_feature_set(mm_out / t.name).load()
        got = read_feature_set(tmp_path / "out" / t.name).load()
        assert set(got) == set(searched)
        for key, want in searched.items():
            if key.startswith("template_"):
                assert got[key].shape == (0,), key  # no template search on precomputed MSAs
                continue
            assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
            if want.dtype == object:
                assert list(got[key].ravel()) == list(want.ravel()), key
            else:
                np.testing.assert_array_equal(got[key], want, err_msg=key)
        assert (tmp_path / "out" / t.name / "msas" / "precomputed.a3m").is_file()


def test_precomputed_stockholm_equals_alphafold_parse(tmp_path: Path) -> None:
    target = Target("sto1", "sto1", "ACDEFGHIKL")
    sto = ("# STOCKHOLM 1.0\n\nsto1 ACDEFGHIKL\nhitA ACDE-GHIKV\nhitB AC--FGHIKL\n//\n")
    (tmp_path / "sto1.sto").write_text(sto)
    settings = SearchSettings(msa_mode="precomputed", msa_dir=str(tmp_path))
    (o,) = _ok(featurize_many([target], out_dir=tmp_path / "out",
                              databases=find_databases(None, msa_mode="precomputed"),
                              settings=settings, cpus=1, cache_dir=tmp_path / "cache"))
    feats = read_feature_set(tmp_path / "out" / "sto1").load()
    want = pipeline.make_msa_features((parsers.parse_stockholm(sto),))
    np.testing.assert_array_equal(feats["msa"], want["msa"])
    assert o.feature_set is not None and o.feature_set.msa_depth == 3


@pytest.mark.parametrize(("content", "expected"), [
    (">q\nACDEFGHIKV\n", ":1: the first sequence is not target"),
    (">q\nACDEFGHIKL\n>hit\nACDEFGH\n", ":3: row 'hit' aligns 7 columns; the query has 10"),
    (">q\nACDEFGHIKL\n>hit\nACDEFGHIK1\n", ":4: characters not allowed in A3M"),
    (">q\nACDEFGHIKL\n>hit\nACDEFGHIKL*\n", ":4: characters not allowed in A3M: ['*']"),
    ("", ": empty MSA file"),
    (None, "no precomputed MSA in"),
])
def test_precomputed_validation_names_the_file(tmp_path: Path, content: str | None,
                                               expected: str) -> None:
    target = Target("bad_one", "bad_one", "ACDEFGHIKL")
    path = tmp_path / "bad_one.a3m"
    if content is not None:
        path.write_text(content)
    settings = SearchSettings(msa_mode="precomputed", msa_dir=str(tmp_path))
    (o,) = featurize_many([target], out_dir=tmp_path / "out",
                          databases=find_databases(None, msa_mode="precomputed"),
                          settings=settings, cpus=1, cache_dir=tmp_path / "cache")
    assert not o.ok and "InputError" in o.error
    assert expected in o.error
    if content is not None:
        assert f"{path}{expected}" in o.error or (str(path) in o.error and expected in o.error)


def test_single_sequence_features_equal_alphafold(tmp_path: Path,
                                                  queries: list[Target]) -> None:
    t = queries[0]
    (o,) = _ok(featurize_many([t], out_dir=tmp_path, databases=find_databases(
        None, msa_mode="single_sequence"), settings=SearchSettings(msa_mode="single_sequence"),
        cpus=1, cache_dir=tmp_path / ".cache"))
    assert o.tool_calls == 0 and o.feature_set is not None and o.feature_set.msa_depth == 1
    got = read_feature_set(tmp_path / t.name).load()
    msa = parsers.Msa([t.sequence], [[0] * t.length], ["query"])
    want = {**pipeline.make_sequence_features(t.sequence, t.id, t.length),
            **pipeline.make_msa_features((msa,)),
            **{k: np.array([], dtype=v) for k, v in templates.TEMPLATE_FEATURES.items()}}
    assert set(got) == set(want)
    for key, value in want.items():
        value = np.asarray(value)
        if value.dtype == object:
            assert list(got[key].ravel()) == list(value.ravel()), key
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)
            assert got[key].dtype == value.dtype, key


def test_cache_keys_differ_per_mode(db: Path, queries: list[Target], tmp_path: Path) -> None:
    t = queries[0]
    (tmp_path / f"{t.id}.a3m").write_text(f">q\n{t.sequence}\n")
    keys = {}
    for mode in MODES:
        settings = SearchSettings(msa_mode=mode, msa_dir=str(tmp_path))
        dbs: DatabaseSet = find_databases(db, msa_mode=mode)
        keys[mode] = target_key(t, dbs, settings)[0]
        if mode != "precomputed":
            assert keys[mode] == cache_key(t.sequence, dbs, settings)
    assert len(set(keys.values())) == len(MODES)
    (tmp_path / f"{t.id}.a3m").write_text(f">q\n{t.sequence}\n>h\n{t.sequence[:-1]}-\n")
    changed = target_key(t, find_databases(db, msa_mode="precomputed"),
                         SearchSettings(msa_mode="precomputed", msa_dir=str(tmp_path)))[0]
    assert changed != keys["precomputed"]


def test_resume_in_every_new_mode(mm_run: dict[str, object], db: Path,
                                  queries: list[Target], tmp_path: Path) -> None:
    mm_out = Path(mm_run["out"])  # type: ignore[arg-type]
    folder = _precomputed_folder(mm_out, tmp_path / "msas", queries[:2])
    runs = {
        "mmseqs": (mm_out, mm_run["settings"], queries),
        "precomputed": (tmp_path / "pre",
                        SearchSettings(msa_mode="precomputed", msa_dir=str(folder)), queries[:2]),
        "single_sequence": (tmp_path / "single", SearchSettings(msa_mode="single_sequence"),
                            queries[:2]),
    }
    for mode, (out, settings, targets) in runs.items():
        dbs = find_databases(db, msa_mode=mode)
        for attempt in (1, 2):
            outcomes = _ok(featurize_many(targets, out_dir=out, databases=dbs,
                                          settings=settings,  # type: ignore[arg-type]
                                          cpus=CPUS, cache_dir=out.parent / f"{out.name}_c"
                                          if mode != "mmseqs" else out.parent / "cache"))
            if attempt == 2 or mode == "mmseqs":
                assert all(o.reused == "target" and o.tool_calls == 0 for o in outcomes), mode
        # a killed run leaves a target without its manifest: only that one is redone
        (out / targets[0].name / "features.json").unlink()
        again = _ok(featurize_many(targets, out_dir=out, databases=dbs,
                                   settings=settings,  # type: ignore[arg-type]
                                   cpus=CPUS, cache_dir=out.parent / f"{out.name}_c"
                                   if mode != "mmseqs" else out.parent / "cache"))
        assert [o.reused for o in again] == ["cache"] + ["target"] * (len(targets) - 1), mode
        assert all(o.tool_calls == 0 for o in again), mode


def test_a_finished_folder_is_reused_only_for_its_own_target(tmp_path: Path) -> None:
    """'sp|P1|X' and 'sp_P1_X' collide on the safe name 'sp_P1_X' and get folders by input
    order: reordered, each folder is another id's, with the same key (same sequence). It was
    reused as is, so a target got the other's features (named for the other)."""
    seq = "MKTAYIAKQRQISFVKSHFSRQ"
    settings = SearchSettings(msa_mode="single_sequence")
    dbs = find_databases(None, msa_mode="single_sequence")
    fasta = tmp_path / "in.fasta"

    def run(ids: tuple[str, str]) -> list[TargetOutcome]:
        fasta.write_text("".join(f">{i}\n{seq}\n" for i in ids))
        return _ok(featurize_many(read_targets(fasta).targets, out_dir=tmp_path / "out",
                                  databases=dbs, settings=settings, cpus=1,
                                  cache_dir=tmp_path / "cache"))

    run(("sp|P1|X", "sp_P1_X"))
    again = run(("sp_P1_X", "sp|P1|X"))
    assert [o.target.name for o in again] == ["sp_P1_X", "sp_P1_X_2"]
    for o in again:
        assert o.reused == "cache", o  # remade from the cache, not taken from the other id
        on_disk = read_feature_set(tmp_path / "out" / o.target.name)
        assert on_disk.target_id == o.feature_set.target_id == o.target.id  # type: ignore
    assert all(o.reused == "target" for o in run(("sp_P1_X", "sp|P1|X")))


def test_cli_a3m_input_defaults_to_precomputed(mm_run: dict[str, object], queries: list[Target],
                                               tmp_path: Path) -> None:
    folder = _precomputed_folder(Path(mm_run["out"]), tmp_path / "in",  # type: ignore[arg-type]
                                 queries[:2])
    (folder / "broken.a3m").write_text(f">q\n{queries[2].sequence}\n>h\nACD\n")
    proc = subprocess.run([sys.executable, "-m", "parafold.cli", "features", str(folder),
                           "-o", str(tmp_path / "out"), "--cpus", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"{folder / 'broken.a3m'}:3: row 'h' aligns 3 columns" in proc.stderr
    assert "2 of 3 targets have features" in proc.stdout
    fs = read_feature_set(tmp_path / "out" / queries[0].id)
    assert fs.msa_mode == "precomputed" and fs.sequence == queries[0].sequence


# --- review fixes: ColabFold A3M comments, BOM, very long ids ---


def test_precomputed_a3m_with_comment_lines_and_bom(tmp_path: Path) -> None:
    from parafold.search.precomputed import read_msa

    target = Target("t1", "t1", "MKTAYIAK")
    colabfold = tmp_path / "t1.a3m"  # ColabFold's files start with '#<length>\t<cardinality>'
    colabfold.write_text("#8\t1\n>101\nMKTAYIAK\n>hit\nMKT-YIaAK\n")
    msa = read_msa(colabfold, target)
    assert list(msa.sequences) == ["MKTAYIAK", "MKT-YIAK"]
    bom = tmp_path / "bom.a3m"
    bom.write_bytes(b"\xef\xbb\xbf>q\r\nMKTAYIAK\r\n")
    assert list(read_msa(bom, target).sequences) == ["MKTAYIAK"]


def test_precomputed_a3m_with_mmseqs2_nul_bytes(tmp_path: Path) -> None:
    """ColabFold's MSA server files end each entry with a NUL byte, and its UniRef and
    environmental entries of one query may be joined: read as ColabFold reads them; entries
    of several queries are refused, naming them."""
    from parafold.errors import InputError
    from parafold.inputs import read_targets
    from parafold.search.precomputed import read_msa

    target = Target("q", "q", "MKTAYIAK")
    path = tmp_path / "q.a3m"
    path.write_bytes(b">101\nMKTAYIAK\n>h1\nMKTAYIAR\n\x00")
    assert list(read_msa(path, target).sequences) == ["MKTAYIAK", "MKTAYIAR"]
    path.write_bytes(b">101\nMKTAYIAK\n>h1\nMKTAYIAR\n\x00>101\nMKTAYIAK\n>e1\nMKSAYIAK\n\x00")
    assert list(read_msa(path, target).sequences) == ["MKTAYIAK", "MKTAYIAR", "MKTAYIAK",
                                                      "MKSAYIAK"]
    assert [t.sequence for t in read_targets(path).targets] == ["MKTAYIAK"]  # as INPUT too
    path.write_bytes(b">101\nMKTAYIAK\n\x00>102\nMKVLAAGI\n\x00")
    with pytest.raises(InputError, match=r"MSAs of 2 queries \(>101, >102\)"):
        read_msa(path, target)


def test_precomputed_msa_named_as_colabfold_search_names_it_is_found(tmp_path: Path) -> None:
    """`colabfold_search` names each A3M after the query's whole FASTA header (its
    `safe_filename`): a UniProt proteome's MSAs are found by that name through --msa-dir."""
    from parafold.errors import InputError
    from parafold.inputs import read_targets
    from parafold.search.precomputed import find_msa_file

    fasta = tmp_path / "proteome.fasta"
    fasta.write_text(">sp|P12345|NAME_HUMAN Some protein OS=Homo sapiens OX=9606\nMKTAYIAK\n"
                     ">plain\nMKVLAAGI\n")
    target, plain = read_targets(fasta).targets
    msas = tmp_path / "msas"
    msas.mkdir()
    path = msas / "sp_P12345_NAME_HUMAN_Some_protein_OS_Homo_sapiens_OX_9606.a3m"
    path.write_text(">101\nMKTAYIAK\n")
    (msas / "plain.a3m").write_text(">101\nMKVLAAGI\n")
    assert find_msa_file(msas, target) == path
    assert find_msa_file(msas, plain) == msas / "plain.a3m"
    path.unlink()
    with pytest.raises(InputError, match="sp_P12345_NAME_HUMAN_Some_protein_OS_Homo_sapiens"):
        find_msa_file(msas, target)


def test_precomputed_msa_of_a_very_long_id_is_found_by_its_safe_name(tmp_path: Path) -> None:
    from parafold.inputs import safe_name
    from parafold.search.precomputed import find_msa_file

    long_id = "x" * 300  # too long for a file name: the lookup falls back to the safe name
    target = Target(long_id, safe_name(long_id), "MKTAYIAK")
    path = tmp_path / f"{target.name}.a3m"
    path.write_text(">q\nMKTAYIAK\n")
    assert find_msa_file(tmp_path, target) == path


def test_precomputed_stockholm_rows_aligned_with_spaces_and_tabs(tmp_path: Path) -> None:
    """Stockholm allows any run of whitespace between a row's name and its sequence."""
    from parafold.errors import InputError
    from parafold.search.precomputed import read_msa

    target = Target("sto2", "sto2", "ACDEFGHIKL")
    sto = ("# STOCKHOLM 1.0\n\n#=GS hitA DE some hit\n"
           "sto2      ACDEF\nhitA\tACDE-\nhitB  \t  AC--F\n\n"  # two blocks, columns padded
           "sto2      GHIKL\nhitA\tGHIKV\nhitB  \t  GHIKL\n//\n")
    path = tmp_path / "sto2.sto"
    path.write_text(sto)
    msa = read_msa(path, target)
    assert list(msa.sequences) == ["ACDEFGHIKL", "ACDE-GHIKV", "AC--FGHIKL"]
    assert list(msa.descriptions) == ["sto2", "hitA", "hitB"]
    ragged = tmp_path / "ragged.sto"
    ragged.write_text("# STOCKHOLM 1.0\nsto2\t\tACDEFGHIKL\nhitA     ACDEFGHIK\n//\n")
    with pytest.raises(InputError, match="row 'hitA' has 9 columns, the first row 10"):
        read_msa(ragged, target)
    no_sequence = tmp_path / "no_sequence.sto"
    no_sequence.write_text("# STOCKHOLM 1.0\nsto2 ACDEFGHIKL\nhitA\n//\n")
    with pytest.raises(InputError, match=r"no_sequence.sto:3: expected"):
        read_msa(no_sequence, target)


def test_precomputed_msas_with_dots_and_lowercase_query_columns(tmp_path: Path) -> None:
    """HH-suite A3M's '.' (a gap in an insert column) is dropped like the insertions; hmmalign
    Stockholm's '.' gaps are '-' and its lowercase query residues columns. Both used to pass
    validation and end in KeyError: '.'; a '*' is an InputError naming the file and line."""
    from parafold.errors import InputError
    from parafold.search.precomputed import read_msa

    target = Target("t1", "t1", "MKTAYIAKQR")
    a3m = tmp_path / "t1.a3m"
    a3m.write_text(">query\nMKTAYIAKQR\n>hit\nMKT..AYIAKQR\n>hit2\nMKTabAYIAKQ-\n")
    msa = read_msa(a3m, target)
    assert list(msa.sequences) == ["MKTAYIAKQR", "MKTAYIAKQR", "MKTAYIAKQ-"]
    assert [list(row) for row in msa.deletion_matrix] == [[0] * 10] * 2 + [[0, 0, 0, 2] + [0] * 6]
    sto = tmp_path / "t2.sto"
    sto.write_text("# STOCKHOLM 1.0\nquery  MKT..AYiAKQR\nhit1   MKTgsAYIAKQR\n"
                   "hit2   MKT..AY.AK-R\n//\n")
    msa = read_msa(sto, target)
    assert list(msa.sequences) == ["MKTAYIAKQR", "MKTAYIAKQR", "MKTAY-AK-R"]
    assert [row[3] for row in msa.deletion_matrix] == [0, 2, 0]  # 'gs' before hit1's A
    settings = SearchSettings(msa_mode="precomputed", msa_dir=str(tmp_path))
    sto.rename(tmp_path / "t1.sto")
    for suffix in (".a3m", ".sto"):  # the whole way to features
        if suffix == ".sto":
            a3m.unlink()
        (o,) = _ok(featurize_many([target], out_dir=tmp_path / f"out{suffix}",
                                  databases=find_databases(None, msa_mode="precomputed"),
                                  settings=settings, cpus=1, cache_dir=tmp_path / "cache"))
        assert o.feature_set is not None and o.feature_set.msa_depth >= 2
    star = tmp_path / "star.sto"
    star.write_text("# STOCKHOLM 1.0\nquery MKTAYIAKQR\nhit1  MKTAYIAKQ*\n//\n")
    with pytest.raises(InputError, match=r"star.sto:3: characters not allowed in Stockholm"):
        read_msa(star, target)


def test_precomputed_msa_extension_in_any_case(tmp_path: Path) -> None:
    """`P2.A3M` (as some tools and file systems write it) is P2's MSA; `.sto` likewise."""
    from parafold.search.precomputed import find_msa_file, stored_msa_name

    upper, mixed = tmp_path / "P2.A3M", tmp_path / "P3.Sto"
    upper.write_text(">q\nMKTAYIAK\n")
    mixed.write_text("# STOCKHOLM 1.0\nq MKTAYIAK\n//\n")
    assert find_msa_file(tmp_path, Target("P2", "P2", "MKTAYIAK")) == upper
    assert find_msa_file(tmp_path, Target("P3", "P3", "MKTAYIAK")) == mixed
    assert stored_msa_name(mixed) == "precomputed.sto"
    (lower := tmp_path / "P2.a3m").write_text(">q\nMKTAYIAK\n")
    assert find_msa_file(tmp_path, Target("P2", "P2", "MKTAYIAK")) == lower  # exact first
    settings = SearchSettings(msa_mode="precomputed", msa_dir=str(tmp_path))
    lower.unlink()
    _ok(featurize_many([Target("P2", "P2", "MKTAYIAK"), Target("P3", "P3", "MKTAYIAK")],
                       out_dir=tmp_path / "out", databases=find_databases(
                           None, msa_mode="precomputed"), settings=settings, cpus=1,
                       cache_dir=tmp_path / "cache"))


def test_no_templates_needs_no_template_database_and_searches_none(
        mm_run: dict[str, object], db: Path, queries: list[Target], tmp_path: Path) -> None:
    """--no-templates: no template search or database (absent here), no template features,
    a cache key of its own that no template database changes; in MMseqs2 mode no PDB search."""
    from parafold.search.mmseqs import MMSEQS_FILES

    with_templates = [o.target for o in _ok(mm_run["outcomes"])
                      if o.feature_set.num_templates > 0][:2]  # type: ignore[union-attr]
    assert len(with_templates) == 2
    bare = tmp_path / "db"  # the synthetic databases but the template ones
    bare.mkdir()
    for sub in db.iterdir():
        if sub.name not in ("pdb70", "pdb_mmcif", "pdb_seqres"):
            (bare / sub.name).symlink_to(sub)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{t.id}\n{t.sequence}\n" for t in with_templates))
    command = [sys.executable, "-m", "parafold.cli", "features", str(fasta),
               "-o", str(tmp_path / "out"), "--db-dir", str(bare), "--cpus", "2"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "pdb70, pdb_mmcif (or run without templates: --no-templates)" in refused.stderr
    from typer.testing import CliRunner

    from parafold.cli import app

    check = CliRunner().invoke(app, ["databases", "check", str(bare)])
    assert check.exit_code == 1 and "--no-templates runs without them" in check.output
    check = CliRunner().invoke(app, ["databases", "check", str(bare), "--no-templates"])
    assert check.exit_code == 0, check.output
    assert "unused   pdb70" in check.output and "MISSING  pdb70" not in check.output
    proc = subprocess.run(command + ["--no-templates"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for t in with_templates:
        fs = read_feature_set(tmp_path / "out" / t.name)
        assert fs.num_templates == 0 and fs.load()["template_aatype"].shape[0] == 0
        assert sorted(p.name for p in (tmp_path / "out" / t.name / "msas").iterdir()) == [
            "bfd_uniref_hits.a3m", "mgnify_hits.sto", "uniref90_hits.sto"]
        full = find_databases(db)  # the template databases there change nothing
        assert fs.key == cache_key(t.sequence, full, SearchSettings(use_templates=False))
        assert fs.key != cache_key(t.sequence, full, SearchSettings())

    wrapper, log = _logged_mmseqs(tmp_path)
    outcomes = _ok(featurize_many(
        with_templates, out_dir=tmp_path / "mm", databases=find_databases(db, msa_mode="mmseqs"),
        settings=SearchSettings(msa_mode="mmseqs", use_templates=False,
                                mmseqs_binary=str(wrapper)),
        cpus=CPUS, cache_dir=tmp_path / "cache"))
    assert len(_calls(log, "search")) == 2  # uniref30 and env; no PDB search
    for o in outcomes:
        assert o.feature_set.num_templates == 0  # type: ignore[union-attr]
        assert not (tmp_path / "mm" / o.target.name / "msas" / MMSEQS_FILES["pdb"]).exists()


def test_a_precomputed_msa_is_copied_not_linked(tmp_path: Path) -> None:
    """The user's MSA file must not become the cache's: linked, an edit to the input changed
    a cache entry under its old key (and an edit in OUT changed the user's file)."""
    from typer.testing import CliRunner

    from parafold.cli import app

    msas = tmp_path / "msas"
    msas.mkdir()
    given = msas / "q.a3m"
    given.write_text(">q\nMKTAYIAK\n>h\nMKTAYIAR\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["features", str(msas), "-o", str(out), "--cpus", "1",
                                   "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    stored = list((tmp_path / "cache").rglob("precomputed.a3m"))
    assert len(stored) == 1 and stored[0].read_text() == given.read_text()
    inode = given.stat().st_ino
    assert stored[0].stat().st_ino != inode
    assert all(p.stat().st_ino != inode for p in out.rglob("*.a3m"))


def test_work_folders_of_killed_mmseqs_batches_are_removed(tmp_path: Path) -> None:
    """A SIGKILLed batch leaves its MMseqs2 work folder in the shared cache (hundreds of GB
    for a proteome): the next batch removes it, never one a live batch holds."""
    import fcntl
    import os

    from parafold.search import runner

    abandoned = tmp_path / ".tmp-mmseqs-killed"
    (abandoned / "tmp").mkdir(parents=True)
    (abandoned / ".lock").touch()
    (abandoned / "tmp" / "big").write_bytes(b"x" * 1000)
    live = tmp_path / ".tmp-mmseqs-live"
    live.mkdir()
    fresh = tmp_path / ".tmp-mmseqs-fresh"  # just made: its lock file not there yet
    fresh.mkdir()
    with open(live / ".lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with runner._batch_workdir(tmp_path) as work:
            assert work.is_dir() and work.name.startswith(".tmp-mmseqs-")
            assert not abandoned.exists() and live.is_dir() and fresh.is_dir()
            runner._remove_abandoned_workdirs(tmp_path)  # another batch starting meanwhile
            assert work.is_dir()
        assert not work.exists()
    # a batch being made (its folder not yet locked and renamed) is never swept: a sweep
    # run at the instant before its lock is taken leaves it alone
    import parafold.search.runner as runner_module

    real_flock, swept = fcntl.flock, []

    def flock(fd, op):
        if op == fcntl.LOCK_EX and not swept:
            swept.append(True)
            runner._remove_abandoned_workdirs(tmp_path)
        return real_flock(fd, op)

    import types

    monkeypatch_fcntl = types.SimpleNamespace(flock=flock, LOCK_EX=fcntl.LOCK_EX,
                                              LOCK_NB=fcntl.LOCK_NB)
    runner_module.fcntl, saved = monkeypatch_fcntl, runner_module.fcntl
    try:
        with runner._batch_workdir(tmp_path) as work:
            (work / "qdb").write_text("x")  # MMseqs2's first file
            assert swept and work.is_dir()
    finally:
        runner_module.fcntl = saved
    old = time.time() - 2 * 24 * 3600
    os.utime(fresh, (old, old))  # an older parafold's, days old
    runner._remove_abandoned_workdirs(tmp_path)
    assert not fresh.exists() and not live.exists()  # live's holder is gone now


def test_an_entry_another_batch_filled_meanwhile_is_kept(tmp_path: Path, monkeypatch) -> None:
    """Two MMseqs2 batches searching one sequence at once (a job array's task and an
    unsharded run): the second to finish keeps the first's files, which targets link to."""
    from parafold.search import runner

    entry = tmp_path / "ab" / "abcd"
    (entry / "features").mkdir(parents=True)
    manifest = entry / "features" / runner.MANIFEST_FILE
    manifest.write_text("{}")
    before = manifest.stat().st_ino

    def never(*args, **kwargs):
        raise AssertionError("features built again")

    monkeypatch.setattr(runner, "mmseqs_features", never)
    runner._fill_mmseqs_entry(entry, "MKTAYIAK", {"uniref": ">q\nMKTAYIAK\n"}, databases=None,
                              settings=None, key="abcd", batch={})
    assert manifest.stat().st_ino == before and not (entry / "msas").exists()
