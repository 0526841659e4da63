"""Synthetic databases: layout, truth, searchability with the real tools, templates, rebuilds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from parafold.errors import InputError, ToolFailedError, ToolNotFoundError
from parafold.testdata import (
    LAYOUT,
    MARKER,
    TestdataSummary,
    build_testdata,
    read_testdata,
    read_truth,
)
from parafold.testdata.sequences import (
    AlignedSeq,
    mutate,
    random_sequence,
    redundant_sequences,
    to_a3m,
)

HH_DBS = ("bfd", "uniref30", "pdb70")
FASTA_DBS = ("uniref90", "mgnify", "small_bfd")
SMALL = {"families": 2, "members_per_family": 5, "sequences": 30, "seed": 1, "mmseqs": False}


@pytest.fixture(scope="module")
def tiny(synthetic_db_summary: TestdataSummary) -> TestdataSummary:
    return synthetic_db_summary


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> TestdataSummary:
    return build_testdata(tmp_path_factory.mktemp("small") / "db", **SMALL)


def _fasta_ids(path: Path) -> list[str]:
    with path.open(encoding="ascii") as fh:
        return [line[1:].split()[0] for line in fh if line.startswith(">")]


def _ffindex_entries(prefix: Path, kind: str) -> dict[str, bytes]:
    data = Path(f"{prefix}_{kind}.ffdata").read_bytes()
    entries = {}
    for line in Path(f"{prefix}_{kind}.ffindex").read_text().splitlines():
        key, offset, length = line.split("\t")
        entries[key] = data[int(offset):int(offset) + int(length)]
    return entries


def _a3m_ids(prefix: Path) -> list[str]:
    ids = []
    for text in _ffindex_entries(prefix, "a3m").values():
        ids += [ln[1:].split()[0] for ln in text.decode().splitlines() if ln.startswith(">")]
    return ids


def _all_db_ids(s: TestdataSummary) -> list[str]:
    ids = [i for db in FASTA_DBS for i in _fasta_ids(s.path(db))]
    ids += [i for db in HH_DBS for i in _a3m_ids(s.path(db))]
    return ids


def _queries(s: TestdataSummary) -> dict[str, str]:
    lines = s.queries.read_text().splitlines()
    return {lines[i][1:].split()[0]: lines[i + 1] for i in range(0, len(lines), 2)}


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300)


# --- the generator ---


def test_mutate_stays_near_the_requested_identity() -> None:
    rng = np.random.default_rng(0)
    ancestor = random_sequence(rng, 150)
    for identity in (0.35, 0.6, 0.95):
        member = mutate(rng, ancestor, identity)
        assert abs(member.identity_to(ancestor) - identity) < 0.08
        assert "-" not in member.sequence


def test_redundant_background_comes_in_clusters_of_relatives() -> None:
    def identity(a: str, b: str) -> float:
        return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)

    seqs = list(redundant_sequences(np.random.default_rng(3), 23, min_len=60, max_len=90,
                                    per_cluster=5))
    assert len(seqs) == 23  # the last cluster is cut short
    clusters = [seqs[i:i + 5] for i in range(0, 23, 5)]
    for cluster in clusters:
        assert len({len(s) for s in cluster}) == 1
        # relatives of one ancestor at 70-95%: pairwise identity well above random (~6%)
        assert min(identity(a, b) for a in cluster for b in cluster) > 0.4
    a, b = clusters[0][0], clusters[1][0]
    assert len(a) != len(b) or identity(a, b) < 0.2
    with pytest.raises(InputError, match="redundancy"):
        build_testdata(Path("/nonexistent/never-built"), uniref90_redundancy=0)


def test_a3m_master_defines_the_match_columns() -> None:
    master = AlignedSeq("AC-E", ("", "GG", "", "", "W"))
    other = AlignedSeq("ACDE", ("K", "", "", "", ""))
    a3m = to_a3m([("m", master), ("o", other)]).splitlines()
    assert a3m == [">m", "AGGCEW", ">o", "kA--CdE-"]
    assert a3m[1] == master.sequence


# --- layout and truth ---


def test_layout_is_complete(tiny: TestdataSummary) -> None:
    for name in LAYOUT:
        assert tiny.path(name).exists() or name in HH_DBS, name
    for db in HH_DBS:
        for kind in ("a3m", "hhm", "cs219"):
            entries = _ffindex_entries(tiny.path(db), kind)
            assert len(entries) == tiny.counts[db] > 0
    cifs = sorted(tiny.path("mmcif_dir").glob("*.cif"))
    assert len(cifs) == tiny.counts["pdb_mmcif"] and all(len(c.stem) == 4 for c in cifs)
    assert (tiny.root / MARKER).is_file()
    assert read_testdata(tiny.root).counts == tiny.counts
    assert len(_queries(tiny)) == tiny.families == 8


def test_truth_covers_every_id_once(tiny: TestdataSummary) -> None:
    truth = read_truth(tiny.truth)
    ids = _all_db_ids(tiny)
    seqres = _fasta_ids(tiny.path("pdb_seqres"))
    assert len(ids) == len(set(ids)), "an id occurs twice across the databases"
    assert set(ids) == set(truth)
    assert set(seqres) <= set(truth)
    assert len(truth) == tiny.sequences
    assert sum(1 for f in truth.values() if f) == tiny.family_members
    queries = _queries(tiny)
    assert not set(queries) & set(truth), "queries must not be in the databases"
    for query in queries:
        family = query.removesuffix("_query")
        for db in (*FASTA_DBS, "bfd", "uniref30"):
            ids = _fasta_ids(tiny.path(db)) if db in FASTA_DBS else _a3m_ids(tiny.path(db))
            assert any(truth[i] == family for i in ids), (family, db)


def test_sequences_sets_the_total(small: TestdataSummary) -> None:
    assert len(read_truth(small.truth)) == small.sequences == SMALL["sequences"]
    with pytest.raises(InputError, match="cannot hold"):
        build_testdata(small.root.parent / "too_few", families=4, sequences=10, mmseqs=False)


# --- found by the real tools ---


def test_jackhmmer_finds_the_planted_members(tiny: TestdataSummary, tmp_path: Path) -> None:
    truth = read_truth(tiny.truth)
    query = next(iter(_queries(tiny).items()))
    (tmp_path / "q.fasta").write_text(f">{query[0]}\n{query[1]}\n")
    db = tiny.path("uniref90")
    _run(["jackhmmer", "-o", "/dev/null", "-A", "out.sto", "--noali", "-N", "1", "-E", "0.0001",
          "--incE", "0.0001", "--cpu", "1", "q.fasta", str(db)], tmp_path)
    hits = {ln.split()[1].split("/")[0] for ln in (tmp_path / "out.sto").read_text().splitlines()
            if ln.startswith("#=GS")} - {query[0]}
    family = query[0].removesuffix("_query")
    members = {i for i in _fasta_ids(db) if truth[i] == family}
    assert hits == members


def test_hhblits_finds_the_planted_family(tiny: TestdataSummary, tmp_path: Path) -> None:
    truth = read_truth(tiny.truth)
    name, seq = list(_queries(tiny).items())[1]
    (tmp_path / "q.fasta").write_text(f">{name}\n{seq}\n")
    _run(["hhblits", "-i", "q.fasta", "-oa3m", "out.a3m", "-o", "/dev/null", "-cpu", "1",
          "-n", "2", "-e", "0.001", "-v", "0", "-d", str(tiny.path("bfd")),
          "-d", str(tiny.path("uniref30"))], tmp_path)
    hits = {ln[1:].split()[0] for ln in (tmp_path / "out.a3m").read_text().splitlines()
            if ln.startswith(">")} - {name}
    family = name.removesuffix("_query")
    members = {i for db in ("bfd", "uniref30") for i in _a3m_ids(tiny.path(db))
               if truth[i] == family}
    assert members and hits == members


def test_templates_featurize(tiny: TestdataSummary, tmp_path: Path) -> None:
    """hhsearch finds the family's pdb70 entries; AlphaFold's featurizer reads their mmCIFs."""
    from alphafold.data import parsers, templates

    truth = read_truth(tiny.truth)
    name, seq = next(iter(_queries(tiny).items()))  # fam0000 has two templates
    (tmp_path / "q.fasta").write_text(f">{name}\n{seq}\n")
    _run(["hhsearch", "-i", "q.fasta", "-o", "out.hhr", "-cpu", "1", "-v", "0",
          "-d", str(tiny.path("pdb70"))], tmp_path)
    hits = parsers.parse_hhr((tmp_path / "out.hhr").read_text())
    family = name.removesuffix("_query")
    expected = {i for i in truth if truth[i] == family and i[:4] + ".cif" in
                {p.name for p in tiny.path("mmcif_dir").iterdir()}}
    assert {h.name.split()[0] for h in hits[:2]} == expected
    featurizer = templates.HhsearchHitFeaturizer(
        mmcif_dir=str(tiny.path("mmcif_dir")), max_template_date="2022-01-01", max_hits=20,
        kalign_binary_path=shutil.which("kalign"), release_dates_path=None,
        obsolete_pdbs_path=str(tiny.path("obsolete")))
    result = featurizer.get_templates(query_sequence=seq, hits=hits)
    feats = result.features
    assert feats["template_aatype"].shape[0] >= 2, result.errors or result.warnings
    assert {d.decode() for d in feats["template_domain_names"][:2]} == expected
    assert feats["template_all_atom_masks"][0].sum() > 4 * 50  # N, CA, C, O (+CB) per residue


# --- determinism and rebuilds ---


def test_same_seed_same_bytes(small: TestdataSummary, tmp_path: Path) -> None:
    again = build_testdata(tmp_path / "db", **SMALL)
    files = sorted(p.relative_to(small.root) for p in small.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != MARKER:
            assert (small.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel


def test_other_seed_other_data(small: TestdataSummary, tiny: TestdataSummary) -> None:
    assert list(_queries(small).values()) != list(_queries(tiny).values())[:2]


def test_complete_build_is_reused_and_incomplete_rebuilt(small: TestdataSummary,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "db"
    shutil.copytree(small.root, out)
    assert build_testdata(out, **SMALL).reused
    (out / MARKER).unlink()
    (out / "stray.txt").write_text("left by a killed build")
    with pytest.raises(InputError):
        read_testdata(out)
    rebuilt = build_testdata(out, **SMALL)
    assert not rebuilt.reused and not (out / "stray.txt").exists()
    marker = json.loads((out / MARKER).read_text())
    marker["params"]["seed"] = 99  # a set built with other parameters is never reused
    (out / MARKER).write_text(json.dumps(marker))
    assert not build_testdata(out, **SMALL).reused


def test_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(InputError, match="refusing"):
        build_testdata(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool failing mid-build (after the FASTA files) leaves neither OUT nor a temp folder."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ffindex_apply").write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    (fake / "ffindex_apply").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ToolFailedError, match="broken"):
        build_testdata(tmp_path / "db", **SMALL)
    assert not (tmp_path / "db").exists()
    assert not list(tmp_path.glob(".db.partial-*"))
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(ToolNotFoundError):
        build_testdata(tmp_path / "db", **SMALL)


def test_cli_prints_a_summary(tiny: TestdataSummary) -> None:
    from parafold.cli import app

    result = CliRunner().invoke(app, ["testdata", str(tiny.root)])
    assert result.exit_code == 0, result.output
    assert "8 families" in result.output and "reused" in result.output
