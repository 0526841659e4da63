"""Atomic artifacts: a reader sees a whole file or none, and no array file runs code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from parafold.errors import InputError
from parafold.featureset import read_feature_set, write_feature_set
from parafold.store import atomic_writer, content_key, load_arrays, save_arrays


def test_atomic_writer_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_arrays_round_trip_without_pickle(tmp_path: Path) -> None:
    arrays = {
        "aatype": np.arange(12, dtype=np.int32).reshape(3, 4),
        "domain_name": np.array([b"query"], dtype=object),
        "template_domain_names": np.array([], dtype=object),
    }
    save_arrays(tmp_path / "a.npz", arrays)
    back = load_arrays(tmp_path / "a.npz")
    np.testing.assert_array_equal(back["aatype"], arrays["aatype"])
    assert back["domain_name"].dtype == object and back["domain_name"][0] == b"query"
    assert back["template_domain_names"].shape == (0,)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:  # loads with pickles refused
        assert "aatype" in data.files


def test_features_are_stored_deflated_and_read_back_exactly(tmp_path: Path) -> None:
    from parafold.fold.synthetic import make_features, random_sequence

    features = make_features(random_sequence(120, np.random.default_rng(3)), 400, seed=3,
                             num_templates=4)
    save_arrays(tmp_path / "f.npz", features)
    raw_bytes = sum(np.asarray(v).nbytes for v in features.values())
    assert (tmp_path / "f.npz").stat().st_size < raw_bytes / 4
    back = load_arrays(tmp_path / "f.npz")
    assert back.keys() == features.keys()
    for key, value in features.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].dtype == value.dtype, key
    old_style = tmp_path / "old.npz"  # written before compression: still read
    np.savez(old_style, msa=features["msa"])
    np.testing.assert_array_equal(load_arrays(old_style)["msa"], features["msa"])


def test_content_key_is_order_independent_and_sensitive() -> None:
    assert content_key(a=1, b={"x": 1, "y": 2}) == content_key(b={"y": 2, "x": 1}, a=1)
    assert content_key(a=1) != content_key(a=2)


def test_feature_set_manifest_written_last(tmp_path: Path) -> None:
    from alphafold.data import pipeline

    feats = {
        **pipeline.make_sequence_features("MKTAYIAK", "q", 8),
    }
    feats["msa"] = np.zeros((3, 8), np.int32)
    folder = tmp_path / "q"
    fs = write_feature_set(folder, name="q", target_id="q", features=feats, key="k")
    assert fs.msa_depth == 3 and fs.length == 8
    assert read_feature_set(folder).key == "k"
    (folder / "features.json").unlink()  # as if killed before the manifest
    with pytest.raises(InputError):
        read_feature_set(folder)


def test_a_manifest_naming_an_unsafe_folder_is_refused(tmp_path: Path) -> None:
    """A feature folder from elsewhere: its manifest's name becomes the target's output folder
    in `predict`, so a name that is a path is an error naming the manifest, the rest go on."""
    import json

    from parafold.featureset import collect_feature_sets
    from parafold.fold.synthetic import make_features

    for name in ("good", "bad"):
        write_feature_set(tmp_path / "in" / name, name=name, target_id=name,
                          features=make_features("MKTAYIAKQR", 4))
    manifest = tmp_path / "in" / "bad" / "features.json"
    data = json.loads(manifest.read_text())
    data["name"] = "../../escaped"
    manifest.write_text(json.dumps(data))
    with pytest.raises(InputError, match="not a safe folder name"):
        read_feature_set(tmp_path / "in" / "bad")
    sets, problems = collect_feature_sets([tmp_path / "in"])
    assert [fs.name for fs in sets] == ["good"]
    assert len(problems) == 1 and "features.json" in str(problems[0])


def test_foreign_pickle_needs_trust(tmp_path: Path) -> None:
    import pickle

    from alphafold.data import pipeline

    feats = dict(pipeline.make_sequence_features("MKTAYIAK", "q", 8))
    feats["msa"] = np.zeros((1, 8), np.int32)
    folder = tmp_path / "af"
    folder.mkdir()
    (folder / "features.pkl").write_bytes(pickle.dumps(feats))
    with pytest.raises(InputError, match="trust-pickles"):
        read_feature_set(folder)
    assert read_feature_set(folder, trust_pickles=True).from_pickle


def test_object_arrays_with_long_key_names_round_trip(tmp_path: Path) -> None:
    key = "k" * 70  # longer than a fixed-width key list would keep
    save_arrays(tmp_path / "a.npz", {key: np.array([b"x"], dtype=object)})
    back = load_arrays(tmp_path / "a.npz")
    assert back[key].dtype == object and back[key][0] == b"x"


def test_atomic_copy_temp_names_do_not_collide(tmp_path: Path, monkeypatch) -> None:
    """Two copies to one destination in flight at once (threads of one process) both land."""
    import os

    from parafold.store import atomic_copy

    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dst = tmp_path / "out" / "dst.bin"
    real_replace = os.replace
    interleaved: list[bool] = []

    def replace(a, b):  # the other "thread" runs its whole copy just before this rename
        if not interleaved:
            interleaved.append(True)
            atomic_copy(src, dst)
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    atomic_copy(src, dst)
    assert interleaved and dst.read_bytes() == b"payload"
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]


@pytest.mark.parametrize("link_works", [True, False])
def test_atomic_copy_failure_leaves_no_part_file(tmp_path: Path, monkeypatch,
                                                 link_works: bool) -> None:
    import os

    from parafold.store import atomic_copy

    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    if not link_works:
        def no_link(*_args):
            raise OSError("cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    dst = tmp_path / "out" / "dst"
    (dst / "child").mkdir(parents=True)  # a non-empty folder: the final rename must fail
    with pytest.raises(OSError):
        atomic_copy(src, dst)
    assert [p.name for p in dst.parent.iterdir()] == ["dst"]


def test_atomic_copy_without_hard_links_copies(tmp_path: Path, monkeypatch) -> None:
    import os

    from parafold.store import atomic_copy

    def no_link(*_args):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "src.bin").write_bytes(b"payload")
    (tmp_path / "dst.bin").write_bytes(b"old")
    atomic_copy(tmp_path / "src.bin", tmp_path / "dst.bin")
    assert (tmp_path / "dst.bin").read_bytes() == b"payload"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.bin", "src.bin"]


def test_find_feature_sets_names_a_missing_root(tmp_path: Path) -> None:
    from parafold.featureset import find_feature_sets

    with pytest.raises(InputError, match="nowhere: no such folder"):
        find_feature_sets(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="file: not a folder"):
        find_feature_sets(tmp_path / "file")



def test_feature_sets_of_two_roots_with_one_folder_name_get_unique_names(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`predict rootA rootB` with rootA/prot1 and rootB/prot1: one OUT folder each, named the
    way `parafold features` makes ids unique, and a warning naming both folders."""
    import logging

    from parafold.featureset import collect_feature_sets
    from parafold.fold.synthetic import make_features

    for root, seq in (("rootA", "MKTAYIAKQR"), ("rootB", "MKTAYIAKQRQISF")):
        write_feature_set(tmp_path / root / "prot1", name="prot1", target_id="prot1",
                          features=make_features(seq, 4))
    write_feature_set(tmp_path / "rootB" / "Other", name="Other", target_id="Other",
                      features=make_features("ACDEFGHIK", 4))
    write_feature_set(tmp_path / "rootC" / "other", name="other", target_id="other",
                      features=make_features("ACDEFGHIKL", 4))
    roots = [tmp_path / "rootA", tmp_path / "rootB", tmp_path / "rootC"]
    with caplog.at_level(logging.WARNING):
        sets, problems = collect_feature_sets(roots)
    assert problems == []
    assert [(fs.name, fs.path.relative_to(tmp_path).as_posix()) for fs in sets] == [
        ("prot1", "rootA/prot1"), ("Other", "rootB/Other"), ("prot1_2", "rootB/prot1"),
        ("other_2", "rootC/other")]  # case-insensitively unique, as target names are
    assert [fs.length for fs in sets] == [10, 9, 14, 10]  # renamed, not mixed up
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert str(tmp_path / "rootA" / "prot1") in warnings[0]
    assert str(tmp_path / "rootB" / "prot1") in warnings[0] and "prot1_2" in warnings[0]
    assert str(tmp_path / "rootB" / "Other") in warnings[1]
    assert str(tmp_path / "rootC" / "other") in warnings[1]
    assert collect_feature_sets(roots)[0] == sets  # the same names on a rerun

def test_empty_sequence_array_is_a_feature_error(tmp_path: Path) -> None:
    from parafold.errors import FeatureError

    feats = {"aatype": np.zeros((0, 21)), "msa": np.zeros((1, 0), np.int32),
             "sequence": np.array([], dtype=object), "seq_length": np.zeros(0, np.int32),
             "residue_index": np.zeros(0, np.int32)}
    with pytest.raises(FeatureError, match="t9: .*empty 'sequence'"):
        write_feature_set(tmp_path / "t9", name="t9", target_id="t9", features=feats)


def test_search_features_exports_what_other_modules_import() -> None:
    from parafold.search import features

    for name in ("build_features", "make_template_featurizer", "msa_feature_dict",
                 "mmseqs_features", "single_sequence_features", "empty_template_features"):
        assert name in features.__all__, name
    assert all(callable(getattr(features, name)) for name in features.__all__)


def test_atomic_copy_onto_its_own_link_leaves_no_part_file(tmp_path: Path) -> None:
    """Copying again onto a hard link of the source: rename of two links is a no-op (POSIX)."""
    from parafold.store import atomic_copy

    (tmp_path / "src.bin").write_bytes(b"payload")
    atomic_copy(tmp_path / "src.bin", tmp_path / "dst.bin")
    atomic_copy(tmp_path / "src.bin", tmp_path / "dst.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.bin", "src.bin"]
    assert (tmp_path / "dst.bin").read_bytes() == b"payload"


def test_a_damaged_npz_is_named_as_such_never_as_a_pickle(tmp_path: Path) -> None:
    save_arrays(tmp_path / "a.npz", {"x": np.random.default_rng(0).integers(0, 9, 100_000)})
    whole = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "junk.npz").write_bytes(b"not an archive at all")
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    middle = len(whole) // 2  # inside the deflated data of x
    (tmp_path / "flipped.npz").write_bytes(
        whole[:middle] + bytes(b ^ 0xFF for b in whole[middle:middle + 64]) + whole[middle + 64:])
    for name in ("junk.npz", "cut.npz", "flipped.npz"):
        with pytest.raises(ValueError, match=r"damaged") as info:
            load_arrays(tmp_path / name)
        assert name in str(info.value) and "pickle" not in str(info.value)


def test_without_file_locks_no_process_removes_anothers_work_in_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a mount has no locks (Lustre without flock) `file_lock` says it holds none, and a
    search filling a cache entry then leaves the temporary files there alone: they may be
    another process's search of the same sequence, in progress (it failed when they went)."""
    import errno
    import fcntl

    import parafold.search.runner as runner
    from parafold.store import file_lock

    with file_lock(tmp_path / "a.lock") as held:
        assert held is True

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop

    monkeypatch.setattr(runner, "run_searches", stop)
    for locked in (False, True):
        entry = tmp_path / f"entry-{locked}"
        (entry / ".tmp-another-search").mkdir(parents=True)
        (entry / "msas").mkdir()
        (entry / "msas" / ".uniref90_hits.sto.1234.part").write_text("half")
        with pytest.raises(Stop):
            runner._fill_entry(entry, "MKTAYIAK", databases=None, settings=None, budget=None,
                               threads=1, key="k", locked=locked)
        left = sorted(p.name for p in entry.rglob("*") if p.name.startswith("."))
        assert left == ([] if locked else [".tmp-another-search", ".uniref90_hits.sto.1234.part"])
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with file_lock(tmp_path / "b.lock") as held:
        assert held is False


def test_abandoned_temporary_files_are_removed_live_ones_kept(tmp_path: Path) -> None:
    """A killed writer's `.<name>.<random>.part` goes once it is an hour old; a live one
    (seconds old, maybe another process's) and every other file stay."""
    import os
    import time

    from parafold.store import remove_abandoned_parts

    old = time.time() - 2 * 3600
    dead = tmp_path / ".result_model_1_ptm.pkl.abc123.part"
    live = tmp_path / ".report.html.def456.part"
    plain = tmp_path / "result.part"  # not a temporary file of ours: no leading dot
    for path in (dead, live, plain):
        path.write_bytes(b"x")
    os.utime(dead, (old, old))
    os.utime(plain, (old, old))
    assert remove_abandoned_parts(tmp_path) == 1
    assert not dead.exists() and live.exists() and plain.exists()
    assert remove_abandoned_parts(tmp_path / "missing") == 0
