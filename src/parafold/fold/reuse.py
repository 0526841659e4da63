"""Predictions made before, in any OUT that shares the cache folder, found by their content.

Metagenome samples run one after another, or the proteomes of related strains, repeat many
proteins. With one `--cache-dir` for all of them the searches are shared already (their cache
is keyed by content); this index does the same for predictions. When a target's prediction is
complete, its writer records where it lies under a key of everything that decides the files
(the features' content key and sequence, the model settings that change results or files, the
params files); a later target with that key, in this OUT or another, gets a copy of those files
(`fold.twins.copy_prediction`) instead of a GPU pass.

The index holds paths, never the files: nothing is stored twice. An entry is used only while
the folder still holds that very prediction (its done marker has the recorded size,
modification time and inode; a prediction made again, or another target in that folder,
rewrites the marker) relaxed as it was (the relaxation marker too: `parafold relax` or a rerun
asking for relaxation rewrites it but not the done marker, and a run without relaxation must
not be given relaxed files); anything else is a miss, and the target is predicted as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from parafold.featureset import FeatureSet
from parafold.fold.outputs import DONE_FILE
from parafold.fold.params import params_path
from parafold.fold.settings import ModelSettings
from parafold.relax import RELAX_METRICS_FILE
from parafold.store import atomic_write_json, content_key, fingerprint_files, read_json

__all__ = ["PredictionIndex", "INDEX_FOLDER", "prediction_fingerprint"]

log = logging.getLogger(__name__)

INDEX_FOLDER = "predictions"
# The settings that change a prediction's numbers or its files; the rest (padding, batching,
# compilation, helper counts) only change how it is computed.
_RESULT_SETTINGS = ("model_preset", "models", "num_recycle", "recycle_early_stop_tolerance",
                    "num_seeds", "random_seed", "config_size", "use_pallas", "float32",
                    "save_raw", "models_to_relax")


def prediction_fingerprint(settings: ModelSettings, params_dir: Path, *,
                           relaxation: bool = True) -> str:
    """A key of everything that decides a prediction's files: the result settings and the
    params (each file's size and sampled bytes, so params copied to each job's local disk
    keep it); without `relaxation`, the prediction's alone (relaxation is checked apart)."""
    params = {}
    for name in settings.model_names:
        try:
            params[name] = fingerprint_files([params_path(params_dir, name)])
        except OSError:
            params[name] = None  # the worker names the missing file; nothing matches it
    chosen = [n for n in _RESULT_SETTINGS if relaxation or n != "models_to_relax"]
    return content_key(settings={name: getattr(settings, name) for name in chosen},
                       params=params)


def done_stamp(folder: Path) -> list[int | None]:
    """The done marker's size, modification time and inode, then the relaxation marker's
    (None for each while the folder holds no relaxation)."""
    st = (folder / DONE_FILE).stat()
    try:
        relaxed = (folder / RELAX_METRICS_FILE).stat()
    except FileNotFoundError:
        return [st.st_size, st.st_mtime_ns, st.st_ino, None, None, None]
    return [st.st_size, st.st_mtime_ns, st.st_ino,
            relaxed.st_size, relaxed.st_mtime_ns, relaxed.st_ino]


@dataclass(frozen=True, slots=True)
class PredictionIndex:
    """`root`: the index folder; `fingerprint`: the model settings and params it is for."""

    root: Path
    fingerprint: str

    @classmethod
    def for_settings(cls, cache_dir: Path, settings: ModelSettings,
                     params_dir: Path) -> PredictionIndex:
        """The index in `cache_dir` for predictions made with `settings` and these params
        (a params file's size and sampled bytes stand for its content, as a database's do for
        the search cache, so params copied to each job's local disk keep their index)."""
        return cls(Path(cache_dir) / INDEX_FOLDER, prediction_fingerprint(settings, params_dir))

    def _entry(self, key: str | None) -> Path | None:
        if key is None:
            return None
        digest = content_key(features=key, settings=self.fingerprint)
        return self.root / digest[:2] / f"{digest}.json"

    def record(self, fs: FeatureSet, folder: Path) -> None:
        """Note that `folder` holds the complete prediction of `fs`. Never raises: the index
        only saves work, and a target whose entry is lost is predicted again."""
        entry = self._entry(fs.twin_key)
        if entry is None:
            return
        try:
            folder = Path(folder).resolve()
            atomic_write_json(entry, {"folder": str(folder), "done": done_stamp(folder),
                                      "name": fs.name})
        except OSError as exc:
            log.warning("%s: not recorded in the prediction index %s: %s", fs.name, self.root,
                        exc)

    def find(self, fs: FeatureSet, *, not_in: Path | None = None) -> Path | None:
        """The folder holding a prediction of `fs` made before with these settings, if one
        was recorded and still holds it (and is not `not_in`, the target's own folder)."""
        return self.find_key(fs.twin_key, not_in=not_in)

    def find_key(self, twin_key: str | None, *, not_in: Path | None = None) -> Path | None:
        """`find` by the features' `twin_key` alone (before the features are made)."""
        found = self.find_stamped(twin_key, not_in=not_in)
        return found[0] if found is not None else None

    def find_stamped(self, twin_key: str | None, *, not_in: Path | None = None
                     ) -> tuple[Path, list[int | None]] | None:
        """`find_key`, with the folder's `done_stamp` as recorded: a copy made later checks
        the folder still has it (re-predicted or relaxed since, it is no longer this one)."""
        entry = self._entry(twin_key)
        if entry is None:
            return None
        try:
            recorded = read_json(entry)
            folder = Path(recorded["folder"])
            stamp = list(recorded["done"])
            if done_stamp(folder) != stamp:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not_in is not None and folder == Path(not_in).resolve():
            return None
        return folder, stamp
