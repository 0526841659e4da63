"""The engine contract: submit a function with the resources it needs, get a handle back.

Backends implement `submit` (CPU work) and `start_fold_workers` (long-lived GPU workers that
keep compiled functions and parameters warm for the whole run). Handles wrap
`concurrent.futures.Future`, so the pipeline waits on work from any engine in one call.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from parafold.errors import InputError

__all__ = ["Resources", "JobHandle", "Executor", "FoldWorkerSpec", "FoldWorkerHandle",
           "detect_gpus", "parse_gpus"]

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Resources:
    """What one job needs; engines that can reserve resources (Ray) do, others respect cpus.
    (No time limit here: each search tool call has its own timeout, `SearchSettings.timeout_s`.)"""

    cpus: int = 1
    gpus: int = 0
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise InputError("resources must be >= 0")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise InputError("memory_gb must be > 0")


class JobHandle(Generic[R]):
    """A submitted job: `result()` returns its value or raises what it raised."""

    def __init__(self, future: cf.Future[R], *, label: str = "") -> None:
        self.future = future
        self.label = label

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> R:
        return self.future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self.future.exception(timeout)

    def cancel(self) -> bool:
        return self.future.cancel()


@dataclass(frozen=True, slots=True)
class FoldWorkerSpec:
    """How to build the GPU stage's worker: the weights, the model settings (a ModelSettings)
    and whether it may load foreign features.pkl files (`predict --trust-pickles`)."""

    params_dir: Path
    settings: Any
    trust_pickles: bool = False


class FoldWorkerHandle(abc.ABC):
    """One long-lived GPU (or CPU) worker; it runs one batch at a time, in order. `platform`
    ("gpu" or "cpu") prices its compiles against its padding (`costs.shape_costs`)."""

    name: str
    platform: str = "cpu"

    @abc.abstractmethod
    def fold(self, feature_sets: Sequence[Any], out_root: Path) -> JobHandle[Any]:
        """Predict a group of feature sets; the handle yields a `jobs.FoldBatchResult`."""

    @abc.abstractmethod
    def warm(self) -> JobHandle[Any]:
        """Build the worker (imports, weights) ahead of the first batch."""

    def restart(self) -> None:
        """Replace a worker that died (its process or actor is gone); default: nothing to do."""
        return None

    def release(self) -> None:
        """Stop its process or actor without waiting: it is out of rotation for the rest of
        the run. Default: nothing held."""
        return None


class Executor(abc.ABC):
    """Where the pipeline's work runs. Use as a context manager so workers are shut down."""

    name = "base"

    @abc.abstractmethod
    def submit(self, fn: Callable[..., R], *args: Any, resources: Resources) -> JobHandle[R]:
        """Run `fn(*args)` (a top-level, picklable function) somewhere with `resources`."""

    @abc.abstractmethod
    def cpu_capacity(self) -> int:
        """CPUs that CPU jobs may use at once (the pipeline admits jobs up to this)."""

    def max_job_cpus(self) -> int:
        """The most CPUs one job can get (a batch search asks for this); default: all of them."""
        return self.cpu_capacity()

    @abc.abstractmethod
    def start_fold_workers(self, spec: FoldWorkerSpec) -> list[FoldWorkerHandle]:
        """One worker per GPU, or one CPU worker when there is no GPU."""

    def describe(self) -> str:
        return self.name

    def shutdown(self) -> None:
        """Stop workers and release resources; idempotent. Default: nothing held."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def parse_gpus(text: str | None) -> tuple[str, ...] | None:
    """`--gpus`: None/'all' -> detect; 'none' or '' -> no GPU; '0,1' -> those devices."""
    if text is None or text.strip().lower() in ("all", "auto"):
        return None
    if text.strip().lower() in ("", "none", "cpu"):
        return ()
    ids = tuple(p.strip() for p in text.split(",") if p.strip())
    if len(set(ids)) != len(ids):
        raise InputError(f"--gpus {text!r}: a device is named twice")
    return ids


def detect_gpus() -> tuple[str, ...]:
    """Visible NVIDIA GPUs without importing jax: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = tuple(p.strip() for p in env.split(",") if p.strip())
        return () if not ids or ids[0] == "-1" else ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode != 0:
        return ()
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return tuple(str(i) for i in range(count))
