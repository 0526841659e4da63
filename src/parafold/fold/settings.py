"""What the GPU stage is asked to do, as one typed, immutable value.

Kept free of jax so the command line and the scheduler can build and compare settings
without starting an accelerator runtime.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from parafold.errors import InputError
from parafold.relax import RELAX_CHOICES

__all__ = ["ModelSettings", "MODEL_PRESETS", "CONFIG_SIZES", "default_compile_cache_dir",
           "parse_model_numbers"]

MODEL_PRESETS = ("monomer", "monomer_ptm")
CONFIG_SIZES = ("full", "tiny")


def default_compile_cache_dir() -> Path:
    """The user's cache folder for JAX executables (`$XDG_CACHE_HOME/parafold/jax`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "parafold" / "jax"


def parse_model_numbers(text: str) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3); each number in 1..5, no repeats.

    Raises:
        InputError: a number outside 1..5, a repeat, or text that is not a list of numbers.
    """
    try:
        numbers = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as exc:
        raise InputError(f"--models {text!r}: expected numbers like 1,2,3,4,5") from exc
    if not numbers or any(n < 1 or n > 5 for n in numbers) or len(set(numbers)) != len(numbers):
        raise InputError(f"--models {text!r}: expected distinct numbers from 1 to 5")
    return numbers


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Model, recycling, seeds, numerics and compilation choices for `predict`.

    `use_pallas=None` means auto: fused kernels on a GPU that runs them, off on the CPU.
    `compile_cache_dir=None` turns JAX's persistent compilation cache off; `executable_cache`
    (opt-in, experimental: not yet run on a GPU) also keeps serialized executables there (`<dir>/executables`), so a warm process skips
    tracing and lowering (see `parafold.fold.exec_cache`).
    Bucket ladders are the padded sizes a target may be put in; see `parafold.fold.buckets`.
    `max_batch` caps proteins per forward pass (the memory model may choose fewer); the CPU
    runs one at a time unless `force_batch` (it gains nothing from batching). `host_workers`
    processes features and `write_workers` write files in background processes (None: auto,
    0: inline in the calling thread; auto on a GPU gives feature processing the
    `helper_cores` a worker may use, all of its process's if None); `device_memory_bytes`
    overrides the device's reported memory for the batch-size model. `compile_ahead` threads compile the executables a `fold`
    call will need, in the order it needs them, while earlier shapes run (a full-model compile
    takes ~25-29 s per shape on a GPU, which would otherwise leave the device idle); 0 compiles
    each shape when the loop reaches it; more than one thread slows each compile on a GPU
    (measured on an H100: 6 threads made each compile 52-160 s instead of 25-30 s). A
    group of targets runs in a bigger shape that runs anyway instead of compiling its own when
    the extra device time costs less than a compile, `compile_cost_s` seconds (None: the
    measured figure for the platform, `costs.ShapeCosts`; 0: never): a deeper MSA-depth
    bucket of its length, or a longer bucket while its shortest target wastes at most
    `merge_max_waste` on padding (`buckets.merge_groups`). `models_to_relax` ("none", "best",
    "all") relaxes predictions with Amber after their files are written, in the file writers
    (`parafold.relax`; CPU work, more writers on a GPU). `prediction_cache_dir` holds the
    index of finished predictions (`parafold.fold.reuse`): a target predicted before with
    these settings, in any OUT sharing the folder, is copied, not predicted (None: off).
    """

    model_preset: str = "monomer_ptm"
    models: tuple[int, ...] = (1, 2, 3, 4, 5)
    num_recycle: int = 3
    recycle_early_stop_tolerance: float = 0.0
    num_seeds: int = 1
    random_seed: int = 0
    config_size: str = "full"
    use_pallas: bool | None = None
    float32: bool = False
    compile_cache_dir: Path | None = field(default_factory=default_compile_cache_dir)
    # a fold worker that finds more in the folder removes the least recently used first
    # (`fold.cache_budget`); None: no bound
    compile_cache_max_bytes: int | None = 20 * 10**9
    max_length_waste: float = 0.15
    min_length_bucket: int = 32
    length_multiple: int = 8
    msa_depth_buckets: bool = True
    save_raw: bool = False
    max_batch: int = 32
    force_batch: bool = False
    host_workers: int | None = None
    write_workers: int | None = None
    helper_cores: int | None = None
    device_memory_bytes: int | None = None
    executable_cache: bool = False  # experimental until checked on a GPU (fused-kernel calls)
    compile_ahead: int = 1
    compile_cost_s: float | None = None
    merge_max_waste: float = 0.5
    models_to_relax: str = "none"
    prediction_cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.model_preset not in MODEL_PRESETS:
            raise InputError(f"model preset {self.model_preset!r}: expected one of {MODEL_PRESETS}")
        if self.config_size not in CONFIG_SIZES:
            raise InputError(f"model config {self.config_size!r}: expected one of {CONFIG_SIZES}")
        if not self.models or any(n < 1 or n > 5 for n in self.models):
            raise InputError(f"models {self.models!r}: expected numbers from 1 to 5")
        if len(set(self.models)) != len(self.models):
            raise InputError(f"models {self.models!r}: a model is named twice")
        if self.num_recycle < 0:
            raise InputError(f"--num-recycle must be >= 0, got {self.num_recycle}")
        if self.num_seeds < 1:
            raise InputError(f"--num-seeds must be >= 1, got {self.num_seeds}")
        if not math.isfinite(self.recycle_early_stop_tolerance) or \
                self.recycle_early_stop_tolerance < 0:
            raise InputError("--recycle-early-stop-tolerance must be >= 0")
        if not 0.0 < self.max_length_waste < 1.0:
            raise InputError(f"max length waste must be in (0, 1), got {self.max_length_waste}")
        if self.min_length_bucket < 1 or self.length_multiple < 1:
            raise InputError("length buckets need a positive minimum and multiple")
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {self.max_batch}")
        for name in ("host_workers", "write_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"{name} must be >= 0, got {value}")
        if self.helper_cores is not None and self.helper_cores < 1:
            raise InputError(f"helper_cores must be >= 1, got {self.helper_cores}")
        if self.compile_ahead < 0:
            raise InputError(f"compile_ahead must be >= 0, got {self.compile_ahead}")
        if self.compile_cost_s is not None and self.compile_cost_s < 0:
            raise InputError(f"--compile-cost must be >= 0, got {self.compile_cost_s}")
        if not 0.0 <= self.merge_max_waste < 1.0:
            raise InputError(f"--merge-max-waste must be in [0, 1), got {self.merge_max_waste}")
        if self.models_to_relax not in RELAX_CHOICES:
            raise InputError(f"--models-to-relax {self.models_to_relax!r}: expected "
                             f"{', '.join(RELAX_CHOICES[:-1])} or {RELAX_CHOICES[-1]}")
        if self.compile_cache_max_bytes is not None and self.compile_cache_max_bytes <= 0:
            raise InputError("the compilation cache bound must be positive (None: no bound)")
        if self.device_memory_bytes is not None and self.device_memory_bytes <= 0:
            raise InputError("device memory must be positive")

    @property
    def model_names(self) -> tuple[str, ...]:
        """AlphaFold's names for the chosen models, e.g. ('model_1_ptm', 'model_2_ptm')."""
        suffix = "_ptm" if self.model_preset == "monomer_ptm" else ""
        return tuple(f"model_{n}{suffix}" for n in self.models)

    @property
    def num_iterations(self) -> int:
        return self.num_recycle + 1
