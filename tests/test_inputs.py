"""Input parsing: every bad record is named with file, line and reason; good ones go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from parafold.errors import InputError
from parafold.inputs import Target, read_targets, safe_name


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_fasta_good_and_bad_records(tmp_path: Path) -> None:
    fasta = _write(
        tmp_path / "in.fasta",
        ">good1 some description\nMKTAYIAK\nQRQISFVK\n"
        ">empty\n\n"
        ">badchars\nMKT1AY#\n"
        ">good1 again\nMKTA\n"
        ">lower\nmktayiakbzuox*\n"
        ">complex\nMKTA:MKTA\n"
        ">gene\nATGGCTAGCTTACGNNTAGCATCGATCGGCTAGCTAGGATC\n"
        ">silk_like\nGAGAGAGAGAGAGAGAGAGAGAGAGAGAGAGAGA\n",
    )
    parsed = read_targets(fasta)
    ids = [t.id for t in parsed.targets]
    assert ids == ["good1", "lower", "silk_like"]  # a low-complexity protein is no gene
    assert parsed.targets[0].sequence == "MKTAYIAKQRQISFVK"
    # lower case folded, ambiguous letters kept for AlphaFold's own mapping, stop codon dropped
    assert parsed.targets[1].sequence == "MKTAYIAKBZUOX"
    problems = {p.record_id: p for p in parsed.problems}
    assert set(problems) == {"empty", "badchars", "good1", "complex", "gene"}
    assert "DNA or RNA" in problems["gene"].message
    assert problems["empty"].line == 4 and "empty sequence" in problems["empty"].message
    assert "'#'" in problems["badchars"].message and "'1'" in problems["badchars"].message
    assert "duplicate id" in problems["good1"].message and "in.fasta:1" in problems["good1"].message
    assert str(problems["badchars"]).startswith(f"{fasta}:6 record 'badchars'")


def test_unsafe_ids_never_become_paths(tmp_path: Path) -> None:
    fasta = _write(
        tmp_path / "in.fa",
        ">../../etc/passwd\nMKTAYIAK\n>$(rm -rf ~)\nMKTAYIAK\n>a/b\nMKT\n>a_b\nMKT\n>...\nMKT\n",
    )
    parsed = read_targets(fasta)
    names = [t.name for t in parsed.targets]
    assert len(names) == 5 and len({n.lower() for n in names}) == 5
    for name in names:
        assert "/" not in name and not name.startswith(".") and name == safe_name(name)
        assert set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    assert parsed.targets[0].id == "../../etc/passwd"  # the id is kept for display


@pytest.mark.timeout(120)  # numbering from 2 for each id took hours at this count
def test_many_long_ids_sharing_their_first_80_characters_get_short_unique_names() -> None:
    """Long contig or assembly ids cut to one base: numbered in linear time, the number never
    pushing a name past the limit, case-insensitively unique, as a rerun names them again."""
    from parafold.inputs import MAX_NAME_LEN, UniqueNames

    base = "GCA_000001405.29_GRCh38.p14_genomic_scaffold_assembly_component_region_chr"[:80]
    names = UniqueNames()
    made = [names.add(base) for _ in range(120_000)]
    assert len(set(n.lower() for n in made)) == len(made)
    assert max(len(n) for n in made) <= MAX_NAME_LEN and made[-1].endswith("_120000")
    again = UniqueNames()
    assert [again.add(n) for n in ("P1", "p1", "P1_2", "P1")] == ["P1", "p1_2", "P1_2_2", "P1_3"]


def test_csv_and_folder_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    _write(folder / "a.csv", "id,sequence\nc1,MKTAYIAK\nc2,\nc3,MK TA\n")
    _write(folder / "b.fasta", ">f1\nACDEFGHIK\n")
    _write(folder / "notes.txt", "ignored")
    parsed = read_targets(folder)
    assert [t.id for t in parsed.targets] == ["c1", "c3", "f1"]
    assert parsed.targets[1].sequence == "MKTA"
    assert [(p.record_id, p.line) for p in parsed.problems] == [("c2", 3)]


def test_csv_without_header_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="header"):
        read_targets(_write(tmp_path / "x.csv", "c1,MKT\n"))
    with pytest.raises(InputError, match="no such file"):
        read_targets(tmp_path / "missing.fasta")


def test_target_validates_itself() -> None:
    with pytest.raises(InputError):
        Target("x", "x", "")
    with pytest.raises(InputError):
        Target("x", "../x", "MKT")
    assert Target("x", "x", "MKT").sequence_hash == Target("y", "y", "MKT").sequence_hash


# --- review fixes: BOM, non-ASCII letters, ColabFold A3M inputs ---


def test_byte_order_mark_does_not_hide_the_first_record(tmp_path: Path) -> None:
    fasta = tmp_path / "bom.fasta"
    fasta.write_bytes(b"\xef\xbb\xbf>first\r\nACDEFG\r\n>second\r\nKLMNPQ\r\n")
    csv_file = tmp_path / "bom.csv"
    csv_file.write_bytes(b"\xef\xbb\xbfid,sequence\r\nc1,ACDE\r\n")
    parsed = read_targets(fasta)
    assert [t.id for t in parsed.targets] == ["first", "second"] and not parsed.problems
    assert [t.id for t in read_targets(csv_file).targets] == ["c1"]


def test_non_ascii_letters_are_not_upper_cased_into_residues(tmp_path: Path) -> None:
    # 'ß'.upper() == 'SS' and 'ı'.upper() == 'I': a silently different protein
    parsed = read_targets(_write(tmp_path / "u.fasta", ">u1\nMKTßA\n>u2\nMKıA\n>ok\nMKSSA\n"))
    assert [t.id for t in parsed.targets] == ["ok"]
    assert [p.record_id for p in parsed.problems] == ["u1", "u2"]
    assert "'ß'" in parsed.problems[0].message


def test_colabfold_a3m_input_with_comment_line(tmp_path: Path) -> None:
    a3m = _write(tmp_path / "t1.a3m", "#8\t1\n>101\nMKTAYIAK\n>hit\nMKT-YIaAK\n")
    parsed = read_targets(a3m)
    assert [(t.id, t.sequence) for t in parsed.targets] == [("t1", "MKTAYIAK")]
    junk = read_targets(_write(tmp_path / "junk.a3m", "MKTAYIAK\n"))
    assert "\0" not in junk.problems[0].message
    assert "before any '>' header" in junk.problems[0].message


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_fasta_and_csv_read_as_the_plain_files(tmp_path: Path, suffix: str) -> None:
    """Proteomes come as `.fasta.gz` (UniProt): the same targets and problems as the plain
    file, with line numbers and the compressed file's name; a folder takes them too."""
    import bz2
    import gzip
    import lzma

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    fasta = "\ufeff>sp|P1|A desc\nMKTAYIAK\nQRQ\n>bad\nMK1\n>sp|P2|B\nmkvl*\n"
    plain = read_targets(_write(tmp_path / "plain.fasta", fasta))
    folder = tmp_path / "folder"
    folder.mkdir()
    packed = folder / f"proteome.fasta{suffix}"
    packed.write_bytes(compress(fasta.encode("utf-8")))
    (folder / f"table.tsv{suffix}").write_bytes(compress(b"id\tsequence\nP3\tMKVL\n"))
    (folder / f"notes.txt{suffix}").write_bytes(compress(b"not an input"))
    parsed = read_targets(packed)
    assert [(t.id, t.sequence) for t in parsed.targets] == \
        [(t.id, t.sequence) for t in plain.targets] == [("sp|P1|A", "MKTAYIAKQRQ"),
                                                        ("sp|P2|B", "MKVL")]
    (problem,) = parsed.problems
    assert (problem.source, problem.line, problem.record_id) == (str(packed), 4, "bad")
    assert parsed.targets[0].source == f"{packed}:1"
    both = read_targets(folder)
    assert [t.id for t in both.targets] == ["sp|P1|A", "sp|P2|B", "P3"]


def test_a3m_files_are_named_by_their_whole_stem(tmp_path: Path) -> None:
    """An A3M input's id is its file's stem, spaces and all: `my prot.a3m` and `my other.a3m`
    are two targets (the stem's first word made them one id, the second a duplicate), and the
    precomputed-MSA lookup then finds each by its id."""
    from parafold.inputs import Target
    from parafold.search.precomputed import find_msa_file

    for stem, seq in (("my prot", "MKVLAAG"), ("my other", "MKTAYIA")):
        (tmp_path / f"{stem}.a3m").write_text(f">query\n{seq}\n")
    parsed = read_targets(tmp_path)
    assert parsed.problems == ()
    assert sorted(t.id for t in parsed.targets) == ["my other", "my prot"]
    for t in parsed.targets:
        assert " " not in t.name
        assert find_msa_file(tmp_path, Target(t.id, t.name, t.sequence)).stem == t.id


def test_a_broken_or_compressed_a3m_input_is_refused_naming_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "cut.fasta.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(InputError, match=r"cut\.fasta\.gz: cannot read"):
        read_targets(broken)
    import gzip

    a3m = tmp_path / "msa.a3m.gz"
    a3m.write_bytes(gzip.compress(b">q\nMKVL\n"))
    with pytest.raises(InputError, match=r"msa\.a3m\.gz: compressed A3M files are not read"):
        read_targets(a3m)


def test_in_a_folder_an_unreadable_or_empty_file_is_one_problem(tmp_path: Path) -> None:
    """A proteome folder with one download cut short, a CSV without its header and an empty
    file: each is reported, naming the file, and the good files' records go on (a single
    such file given as INPUT stays an error of the whole input, or a problem of its own)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    _write(folder / "a.fasta", ">a1\nMKTAYIAK\n")
    (folder / "b.fasta.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    _write(folder / "c.csv", "name,seq\nx,MKT\n")
    _write(folder / "d.fasta", "")
    _write(folder / "e.fasta", ">e1\nACDEFGHIK\n")
    parsed = read_targets(folder)
    assert [t.id for t in parsed.targets] == ["a1", "e1"]
    problems = {Path(p.source).name: (p.line, p.message) for p in parsed.problems}
    assert sorted(problems) == ["b.fasta.gz", "c.csv", "d.fasta"]
    assert problems["b.fasta.gz"][1].startswith("cannot read")
    assert problems["c.csv"] == (1, "CSV needs a header with columns 'id' and 'sequence'")
    assert problems["d.fasta"] == (0, "no records (an empty file?)")
    assert str(parsed.problems[0]).startswith(f"{folder / 'b.fasta.gz'}: cannot read")
    empty = read_targets(folder / "d.fasta")
    assert not empty.targets and [p.message for p in empty.problems] == [
        "no records (an empty file?)"]


def test_a3m_share_of_an_input(tmp_path: Path) -> None:
    from parafold.inputs import a3m_share

    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "q.a3m", ">q\nMKVL\n")
    assert a3m_share(folder) == a3m_share(folder / "q.a3m") == "all"
    _write(folder / "notes.txt", "ignored")
    assert a3m_share(folder) == "all"
    _write(folder / "p.fasta", ">p\nMKVL\n")
    assert a3m_share(folder) == "some"
    assert a3m_share(folder / "p.fasta") == "none"
    (folder / "q.a3m").unlink()
    assert a3m_share(folder) == "none"


def test_a_folder_mixing_a3m_and_fasta_needs_a_msa_mode(tmp_path: Path) -> None:
    """One stray .a3m in a folder of FASTA files used to switch the whole run to precomputed
    MSAs (every FASTA record then failed for want of one); now it asks which is meant."""
    from typer.testing import CliRunner

    from parafold.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "q.a3m", ">q\nMKVLAAGIVG\n")
    _write(folder / "p.fasta", ">p\nACDEFGHIKL\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["features", str(folder), "-o", str(out), "--cpus", "1"])
    assert res.exit_code == 2, res.output
    assert "holds both A3M files and FASTA or CSV files" in res.output
    assert "--msa-mode" in res.output and not out.exists()
    res = CliRunner().invoke(app, ["features", str(folder), "-o", str(out), "--cpus", "1",
                                   "--msa-mode", "single_sequence"])
    assert res.exit_code == 0, res.output
    assert (out / "p" / "features.npz").is_file() and (out / "q" / "features.npz").is_file()
