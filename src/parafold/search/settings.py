"""Search settings: AlphaFold's hit limits and e-values, plus how the tools are run.

Only the fields that change results go into the cache key (`cache_fields`); threads, timeouts,
retries and binary paths change how a search runs, not what it finds.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from parafold.errors import InputError

__all__ = ["SearchSettings", "PRESETS", "MSA_MODES", "DEFAULT_MAX_TEMPLATE_DATE"]

PRESETS = ("full_dbs", "reduced_dbs")
# classic: AlphaFold's jackhmmer/hhblits/hhsearch; mmseqs: ColabFold-style MMseqs2 batch search;
# precomputed: the user's own MSA files; single_sequence: no search at all.
MSA_MODES = ("classic", "mmseqs", "precomputed", "single_sequence")
# No cutoff unless asked: a date that moves with the calendar would change every cache key daily.
DEFAULT_MAX_TEMPLATE_DATE = "9999-12-31"


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """How the CPU stage searches, with AlphaFold's monomer defaults."""

    preset: str = "full_dbs"
    uniref_max_hits: int = 10_000
    mgnify_max_hits: int = 501
    max_template_hits: int = 20
    max_template_date: str = DEFAULT_MAX_TEMPLATE_DATE
    jackhmmer_n_iter: int = 1
    jackhmmer_e_value: float = 0.0001
    jackhmmer_filters: tuple[float, float, float] = (0.0005, 0.00005, 0.0000005)
    hhblits_n_iter: int = 3
    hhblits_e_value: float = 0.001
    hhblits_maxseq: int = 1_000_000
    hhblits_realign_max: int = 100_000
    hhblits_maxfilt: int = 100_000
    hhblits_min_prefilter_hits: int = 1000
    hhsearch_maxseq: int = 1_000_000
    msa_mode: str = "classic"
    # False: no template search and no template features (ColabFold's default; AlphaFold
    # always searches). The databases read then change, and with them the cache key
    # (`DatabaseSet.for_search`), so it is not in `cache_fields`.
    use_templates: bool = True
    # MMseqs2 (msa_mode "mmseqs"): ColabFold's search parameters. No sensitivity means
    # colabfold_search's current default, the k-mer score thresholds `--k-score seq:96,prof:80`
    # (its server uses them too); a number is `-s` (older ColabFold releases used -s 8).
    mmseqs_num_iterations: int = 3
    mmseqs_sensitivity: float | None = None
    mmseqs_e_value: float = 0.1
    mmseqs_max_seqs: int = 10_000
    # ColabFold realigns expanded cluster members with -e 10 (keeping weak rows that its
    # filterresult then thins); 0.1 (the search's own cutoff) keeps random rows out as well.
    mmseqs_align_e_value: float = 0.1
    mmseqs_template_sensitivity: float = 7.5
    # Precomputed MSAs (msa_mode "precomputed"): the folder of <id>.a3m / <id>.sto files. Not
    # in the key itself: the content of each target's file is (see runner.cache_key).
    msa_dir: str = ""
    # How tools run (not part of the cache key).
    timeout_s: float = 86_400.0
    retries: int = 1
    threads_per_search: int = 0  # 0: chosen from the CPU budget and the number of proteins
    jackhmmer_binary: str = "jackhmmer"
    hhblits_binary: str = "hhblits"
    hhsearch_binary: str = "hhsearch"
    kalign_binary: str = "kalign"
    mmseqs_binary: str = "mmseqs"
    # Where MMseqs2 indexes go when a database folder is read-only ("": next to the database).
    mmseqs_index_dir: str = ""

    def __post_init__(self) -> None:
        if self.msa_mode not in MSA_MODES:
            raise InputError(f"unknown MSA mode {self.msa_mode!r}; use one of {MSA_MODES}")
        if self.msa_mode == "precomputed" and not self.msa_dir:
            raise InputError("MSA mode 'precomputed' needs a folder of MSAs (--msa-dir)")
        if self.mmseqs_num_iterations < 1 or self.mmseqs_max_seqs < 1:
            raise InputError("mmseqs iterations and max seqs must be >= 1")
        if self.mmseqs_sensitivity is not None and self.mmseqs_sensitivity <= 0:
            raise InputError(f"mmseqs sensitivity must be > 0, not {self.mmseqs_sensitivity}")
        if self.preset not in PRESETS:
            raise InputError(f"unknown database preset {self.preset!r}; use one of {PRESETS}")
        try:
            datetime.date.fromisoformat(self.max_template_date)
        except ValueError as exc:
            raise InputError(
                f"max template date {self.max_template_date!r} is not YYYY-MM-DD"
            ) from exc
        if min(self.uniref_max_hits, self.mgnify_max_hits, self.max_template_hits) < 1:
            raise InputError("hit limits must be >= 1")
        if self.timeout_s <= 0 or self.retries < 0 or self.threads_per_search < 0:
            raise InputError("timeout must be > 0; retries and threads must be >= 0")

    def cache_fields(self) -> dict[str, Any]:
        """The settings that decide the features (for the content key), per MSA mode."""
        if self.msa_mode == "mmseqs":
            return {"msa_mode": self.msa_mode, "max_template_hits": self.max_template_hits,
                    "max_template_date": self.max_template_date,
                    "mmseqs": [self.mmseqs_num_iterations, self.mmseqs_sensitivity,
                               self.mmseqs_e_value, self.mmseqs_max_seqs,
                               self.mmseqs_align_e_value,
                               self.mmseqs_template_sensitivity],
                    "format": 1}
        if self.msa_mode in ("precomputed", "single_sequence"):
            return {"msa_mode": self.msa_mode, "format": 1}
        return {
            "msa_mode": self.msa_mode,
            "preset": self.preset,
            "uniref_max_hits": self.uniref_max_hits,
            "mgnify_max_hits": self.mgnify_max_hits,
            "max_template_hits": self.max_template_hits,
            "max_template_date": self.max_template_date,
            "jackhmmer": [self.jackhmmer_n_iter, self.jackhmmer_e_value,
                          list(self.jackhmmer_filters)],
            "hhblits": [self.hhblits_n_iter, self.hhblits_e_value, self.hhblits_maxseq,
                        self.hhblits_realign_max, self.hhblits_maxfilt,
                        self.hhblits_min_prefilter_hits],
            "hhsearch": [self.hhsearch_maxseq],
            "format": 1,
        }

    @property
    def use_small_bfd(self) -> bool:
        return self.preset == "reduced_dbs"
