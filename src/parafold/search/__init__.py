"""The CPU stage: concurrent MSA and template searches, then AlphaFold's feature dict.

MSA modes (`SearchSettings.msa_mode`): classic (jackhmmer/hhblits/hhsearch per protein), mmseqs
(one ColabFold-style MMseqs2 batch for all proteins, `mmseqs.py`), precomputed (the user's
A3M/Stockholm files, `precomputed.py`) and single_sequence (no search).

Public entry points: `featurize_target` (one target; picklable for process pools and Ray),
`featurize_many` (many targets under one CPU budget), `find_databases`, `SearchSettings`.
Heavy imports (alphafold.data) happen when these are first used, not at `import parafold`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parafold.search.databases import DatabaseSet, find_databases
    from parafold.search.runner import featurize_target
    from parafold.search.scheduler import TargetOutcome, featurize_many
    from parafold.search.settings import SearchSettings

__all__ = ["DatabaseSet", "SearchSettings", "TargetOutcome", "featurize_many", "featurize_target",
           "find_databases"]

_WHERE = {
    "DatabaseSet": "databases", "find_databases": "databases", "SearchSettings": "settings",
    "featurize_target": "runner", "featurize_many": "scheduler", "TargetOutcome": "scheduler",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"parafold.search.{_WHERE[name]}"), name)
    raise AttributeError(name)
