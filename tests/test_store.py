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
