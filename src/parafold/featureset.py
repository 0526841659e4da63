"""The CPU stage's product and the GPU stage's input: one target's AlphaFold feature dict.

On disk a feature set is two files in one folder: `features.npz` (the raw monomer feature dict
of `alphafold.data.pipeline`, stored by `store.save_arrays`, no pickle) and `features.json`
(the manifest, written last: its presence means the set is complete). `predict` reads either
this folder or, only when the user trusts it, an AlphaFold/ParaFold `features.pkl`.

Targets with the same sequence and search settings share one cached `features.npz` (a hard
link where the file system allows), so its `domain_name` is not theirs; `FeatureSet.load`
sets it to the manifest's target id.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from parafold.errors import FeatureError, InputError
from parafold.inputs import UniqueNames, safe_name
from parafold.store import (
    atomic_copy,
    atomic_write_json,
    atomic_writer,
    load_arrays,
    read_json,
    save_arrays,
)

__all__ = ["FeatureSet", "FEATURES_FILE", "MANIFEST_FILE", "PICKLE_FILE", "write_feature_set",
           "share_feature_set", "twin_key_of", "read_feature_set", "load_features",
           "find_feature_sets", "collect_feature_sets"]

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.npz"
MANIFEST_FILE = "features.json"
PICKLE_FILE = "features.pkl"


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """Where one target's features live and what the scheduler needs to know about them.

    `msa_depth` and `num_templates` let the GPU stage choose buckets without loading arrays.
    """

    name: str
    target_id: str
    sequence: str
    path: Path
    msa_depth: int
    num_templates: int
    key: str = ""
    msa_mode: str = ""
    from_pickle: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sequence:
            raise FeatureError(f"{self.name}: feature set without a sequence")
        if self.msa_depth < 1:
            raise FeatureError(f"{self.name}: MSA depth must be >= 1, got {self.msa_depth}")

    @property
    def length(self) -> int:
        return len(self.sequence)

    @property
    def twin_key(self) -> str | None:
        """Equal for feature sets with the same content (search key and sequence), which the
        GPU stage predicts once (`fold.twins`); None for a set without a key (a foreign
        `features.pkl`), which is nobody's twin."""
        return None if self.from_pickle else twin_key_of(self.key, self.sequence)

    def load(self, *, trust_pickles: bool = False) -> dict[str, np.ndarray]:
        """The raw feature dict; ours named for this target (a foreign pickle as it was)."""
        feats = load_features(self.path, trust_pickles=trust_pickles)
        if not self.from_pickle:
            feats["domain_name"] = np.array([self.target_id.encode("utf-8")], dtype=object)
        return feats


def twin_key_of(key: str, sequence: str) -> str | None:
    """`FeatureSet.twin_key` of features with this search key and sequence (None: no key)."""
    return f"{key}:{sequence}" if key else None


def _check_feature_dict(name: str, feats: dict[str, Any]) -> tuple[str, int, int]:
    for key in ("aatype", "msa", "sequence", "seq_length", "residue_index"):
        if key not in feats:
            raise FeatureError(f"{name}: feature dict has no {key!r}")
    seq_array = np.asarray(feats["sequence"]).ravel()
    if seq_array.size == 0:
        raise FeatureError(f"{name}: feature dict has an empty 'sequence' array")
    seq_raw = seq_array[0]
    sequence = seq_raw.decode() if isinstance(seq_raw, bytes | np.bytes_) else str(seq_raw)
    if np.asarray(feats["aatype"]).shape[0] != len(sequence):
        raise FeatureError(f"{name}: aatype length does not match the sequence")
    depth = int(np.asarray(feats["msa"]).shape[0])
    templates = int(np.asarray(feats["template_aatype"]).shape[0]) if "template_aatype" in feats else 0
    return sequence, depth, templates


def write_feature_set(folder: Path, *, name: str, target_id: str, features: dict[str, Any],
                      key: str = "", msa_mode: str = "", extra: dict[str, Any] | None = None,
                      write_pickle: bool = False) -> FeatureSet:
    """Store a feature dict in `folder`; the manifest goes last so a killed write is invisible."""
    sequence, depth, templates = _check_feature_dict(name, features)
    folder.mkdir(parents=True, exist_ok=True)
    save_arrays(folder / FEATURES_FILE, features)
    fs = FeatureSet(name=name, target_id=target_id, sequence=sequence, path=folder,
                    msa_depth=depth, num_templates=templates, key=key, msa_mode=msa_mode,
                    extra=dict(extra or {}))
    return _finish(fs, dict(features) if write_pickle else None)


def share_feature_set(source: FeatureSet, folder: Path, *, name: str, target_id: str,
                      key: str = "", msa_mode: str = "", extra: dict[str, Any] | None = None,
                      write_pickle: bool = False) -> FeatureSet:
    """`source`'s features as target `name`'s in `folder`: its `features.npz` hard-linked (a
    copy across file systems), not read and written again, and a manifest of the target's own.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_FILE).unlink(missing_ok=True)  # never pair an old manifest with new files
    atomic_copy(source.path / FEATURES_FILE, folder / FEATURES_FILE)
    fs = replace(source, name=name, target_id=target_id, path=folder, key=key,
                 msa_mode=msa_mode, from_pickle=False, extra=dict(extra or {}))
    return _finish(fs, fs.load() if write_pickle else None)


class _NumpyOnePickler(pickle.Pickler):
    """A pickle of arrays that numpy 1 loads as well as numpy 2: AlphaFold 2.3 pins numpy
    1.21-1.24, and numpy 2's own pickles name `numpy._core`, which numpy 1 lacks. Arrays go
    as `numpy.ndarray(shape, dtype, bytearray)` (writeable, as AlphaFold's code expects),
    object arrays as `numpy.array(list, "O")`, numpy scalars as 0-d arrays."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.generic):
            obj = np.asarray(obj)
        if type(obj) is not np.ndarray:
            return NotImplemented
        if obj.dtype.hasobject:
            if obj.size == 0:  # np.array([], "O") would lose an empty array's other axes
                return np.empty, (obj.shape, "O")
            return np.array, (obj.tolist(), "O")
        data = np.ascontiguousarray(obj).tobytes()  # (ascontiguousarray makes 0-d arrays 1-d)
        return np.ndarray, (obj.shape, obj.dtype.str, bytearray(data))


def _finish(fs: FeatureSet, pickled: dict[str, Any] | None) -> FeatureSet:
    """AlphaFold's `features.pkl` of `pickled` when given, then the manifest, last."""
    if pickled is not None:
        with atomic_writer(fs.path / PICKLE_FILE, "wb") as handle:
            _NumpyOnePickler(handle, protocol=4).dump(pickled)
    manifest = asdict(fs)
    manifest["path"] = "."
    atomic_write_json(fs.path / MANIFEST_FILE, manifest)
    return fs


def read_feature_set(folder: Path, *, trust_pickles: bool = False) -> FeatureSet:
    """The feature set stored in `folder` (ours), or from its `features.pkl` when trusted.

    Raises:
        InputError: the folder holds no complete feature set, or only a pickle not trusted.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file() and (folder / FEATURES_FILE).is_file():
        try:
            data = read_json(manifest_path)
            data["path"] = folder
            fs = FeatureSet(**data)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{manifest_path}: malformed feature manifest: {exc}") from exc
        if not isinstance(fs.name, str) or safe_name(fs.name) != fs.name:
            # the name becomes the target's output folder: never a path from a file
            raise InputError(f"{manifest_path}: target name {fs.name!r} is not a safe folder "
                             "name (letters, digits, '.', '_' and '-')")
        return fs
    if (folder / PICKLE_FILE).is_file():
        if not trust_pickles:
            raise InputError(
                f"{folder / PICKLE_FILE}: a pickle runs code when loaded; pass --trust-pickles "
                "to load features.pkl files from elsewhere"
            )
        feats = load_features(folder, trust_pickles=True)
        sequence, depth, templates = _check_feature_dict(folder.name, feats)
        return FeatureSet(name=safe_name(folder.name), target_id=folder.name, sequence=sequence,
                          path=folder, msa_depth=depth, num_templates=templates, from_pickle=True)
    raise InputError(f"{folder}: no {MANIFEST_FILE} + {FEATURES_FILE} (or {PICKLE_FILE}) here")


def load_features(folder: Path, *, trust_pickles: bool = False) -> dict[str, np.ndarray]:
    folder = Path(folder)
    if (folder / FEATURES_FILE).is_file():
        return load_arrays(folder / FEATURES_FILE)
    if trust_pickles and (folder / PICKLE_FILE).is_file():
        try:
            with open(folder / PICKLE_FILE, "rb") as handle:
                data = pickle.load(handle)
        except Exception as exc:  # cut short, or naming a module this machine lacks
            raise InputError(f"{folder / PICKLE_FILE}: unreadable pickle: {exc!r}") from exc
        if not isinstance(data, dict):
            raise InputError(f"{folder / PICKLE_FILE}: holds a {type(data).__name__}, not "
                             "AlphaFold's feature dict")
        return data
    raise InputError(f"{folder}: no readable features")


def find_feature_sets(root: Path, *, trust_pickles: bool = False) -> tuple[list[FeatureSet], list[str]]:
    """Feature sets in `root` itself or in its immediate subfolders, and problems found.

    Raises:
        InputError: `root` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise InputError(f"{root}: {what}; expected a folder of feature sets")
    candidates = [root] if (root / MANIFEST_FILE).exists() or (root / PICKLE_FILE).exists() else [
        p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
    ]
    sets: list[FeatureSet] = []
    problems: list[str] = []
    for folder in candidates:
        if not ((folder / MANIFEST_FILE).exists() or (folder / PICKLE_FILE).exists()):
            continue
        try:
            sets.append(read_feature_set(folder, trust_pickles=trust_pickles))
        except (InputError, FeatureError) as exc:
            problems.append(str(exc))
    return sets, problems


def collect_feature_sets(roots: Iterable[Path], *,
                         trust_pickles: bool = False) -> tuple[list[FeatureSet], list[str]]:
    """`find_feature_sets` of every root, each set with an output name unique among them all.

    Two roots may hold folders of one name (`rootA/prot1`, `rootB/prot1`) or manifests naming
    the same target: the later set is renamed `prot1_2` (`_3`, ...) the way `read_targets` makes
    target names unique, with a warning naming both folders, so no two write to one OUT/<name>.
    The order (roots as given, folders sorted) makes the names the same on a rerun.

    Raises:
        InputError: a root does not exist or is not a folder.
    """
    sets: list[FeatureSet] = []
    problems: list[str] = []
    used = UniqueNames()
    holders: dict[str, Path] = {}  # lowercase name -> the folder of the set that has it
    for root in roots:
        found, issues = find_feature_sets(root, trust_pickles=trust_pickles)
        problems.extend(issues)
        for fs in found:
            name = used.add(fs.name)
            if name != fs.name:
                logger.warning("%s and %s are both named %r; writing the second to %r",
                               holders[fs.name.lower()], fs.path, fs.name, name)
                fs = replace(fs, name=name)
            holders[name.lower()] = fs.path
            sets.append(fs)
    return sets, problems
