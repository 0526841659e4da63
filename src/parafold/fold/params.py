"""AlphaFold parameters on disk: loading with clear errors, and random weights for tests.

The layout is AlphaFold's: `P/params/params_model_N[_ptm].npz`, flat keys `scope//name`, the
triangle multiplications split into left/right projections as DeepMind ships them. Loading
checks every key and shape against the architecture the config builds, so a file for another
model or config size fails with its name rather than deep inside a trace.

`write_random_params` draws every tensor at random (no zero-initialised layer, no constant
gate), so a random network still maps different inputs to different, non-degenerate outputs.
"""

from __future__ import annotations

import functools
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parafold.errors import ParamsError
from parafold.fold.config import family_of
from parafold.fold.settings import ModelSettings
from parafold.store import atomic_write_json, atomic_writer, read_json

__all__ = ["params_path", "check_params_files", "load_params", "expected_shapes", "write_random_params",
           "read_params_info", "without_template_stack", "PARAMS_INFO_FILE"]

log = logging.getLogger(__name__)

PARAMS_INFO_FILE = "parafold_params.json"
_STACKED_SCOPES = ("evoformer_iteration", "extra_msa_stack", "__layer_stack_no_state")
# AlphaFold's own init for parameters it starts constant: we draw around these values.
_CONSTANT_BASE = {"scale": 1.0, "gating_b": 1.0, "trainable_point_weights": 0.5413}
_SMALL_STD = 0.1
# Drawn smaller than the rest: the outer product mean's output bias is added to every pair
# in every block, and at N(0, 0.1) it grew into a component common to all pairs ~100x the
# rest, which saturated the PAE head on one bin (a constant PAE, pTM ~0) for any input.
_SCALED_STD = {("outer_product_mean", "output_b"): 0.001}
# Scopes of models 1-2 that models 3-5 lack: the template stack and its MSA-row embedding.
_TEMPLATE_STACK = ("/template_embedding", "/template_single_embedding", "/template_projection")

Shapes = dict[str, dict[str, tuple[int, ...]]]


def params_path(params_dir: Path, model_name: str) -> Path:
    return Path(params_dir) / "params" / f"params_{model_name}.npz"


def check_params_files(params_dir: Path, model_names: Sequence[str]) -> None:
    """Fail fast on params files that are missing or not npz archives, before a run spends
    hours on searches whose structures could then not be predicted. Cheap (no array is read):
    `load_params` still checks every tensor when a worker loads them.

    Raises:
        ParamsError: naming every file at fault.
    """
    problems = []
    for name in model_names:
        path = params_path(params_dir, name)
        if not path.is_file():
            problems.append(f"{path}: missing{_missing_hint(params_dir, name)}")
        elif not zipfile.is_zipfile(path):
            problems.append(f"{path}: not an npz archive")
    if problems:
        raise ParamsError("; ".join(problems) + " (expected AlphaFold's "
                          "params/params_<model>.npz layout; --models picks the models)")


def _missing_hint(params_dir: Path, model_name: str) -> str:
    """What the usual mix-ups look like, said where a params file is missing: --params-dir
    given the params/ folder itself, or params of the other preset (with or without pTM)."""
    params_dir = Path(params_dir)
    if (params_dir / f"params_{model_name}.npz").is_file():
        return (f" (it is in {params_dir} itself: give --params-dir the folder that holds "
                "params/)")
    other = model_name.removesuffix("_ptm") if model_name.endswith("_ptm") else f"{model_name}_ptm"
    if params_path(params_dir, other).is_file():
        preset = "monomer" if model_name.endswith("_ptm") else "monomer_ptm"
        return f" (params_{other}.npz is there: --model-preset {preset} uses it)"
    return ""


def read_params_info(params_dir: Path) -> dict[str, Any] | None:
    """What `params random` recorded (config size, seed), or None for other params."""
    path = Path(params_dir) / "params" / PARAMS_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path)
    except ValueError as exc:
        raise ParamsError(f"{path}: malformed: {exc}") from exc
    if not isinstance(info, dict):
        raise ParamsError(f"{path}: malformed: expected a JSON object")
    return info


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(model_name: str, settings: ModelSettings) -> Shapes:
    import jax

    from parafold.fold.runner import forward_transform, probe_batch

    transform, _ = forward_transform(model_name, settings, low_memory=False)
    batch = probe_batch(model_name, settings)
    tree = jax.eval_shape(transform.init, jax.random.PRNGKey(0), batch)
    return {scope: {name: tuple(int(d) for d in leaf.shape) for name, leaf in leaves.items()}
            for scope, leaves in tree.items()}


def expected_shapes(model_name: str, settings: ModelSettings) -> Shapes:
    """Every parameter's shape for this model's architecture (traced, never computed)."""
    # Only the architecture matters: drop fields that cannot change it so the cache is shared.
    from dataclasses import replace

    arch = replace(ModelSettings(), model_preset=settings.model_preset,
                   config_size=settings.config_size, compile_cache_dir=None)
    return _expected_shapes_cached(model_name, arch)


def _check(path: Path, params: dict[str, dict[str, np.ndarray]], want: Shapes) -> None:
    problems: list[str] = []
    for scope, leaves in want.items():
        for name, shape in leaves.items():
            got = params.get(scope, {}).get(name)
            if got is None:
                problems.append(f"missing {scope}//{name}")
            elif tuple(got.shape) != shape:
                problems.append(f"{scope}//{name} has shape {tuple(got.shape)}, expected {shape}")
    for scope, leaves in params.items():
        problems.extend(f"unexpected {scope}//{name}" for name in leaves
                        if name not in want.get(scope, {}))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        hint = (" (params of another model size? weights from `parafold params random "
                "--preset tiny` need --config tiny)" if any("has shape" in p for p in problems)
                else "")
        raise ParamsError(f"{path}: does not fit this model's architecture: {shown}{hint}")


def load_params(params_dir: Path, model_name: str, settings: ModelSettings
                ) -> dict[str, dict[str, np.ndarray]]:
    """The haiku params of one model, checked against its architecture.

    Raises:
        ParamsError: the file is missing, unreadable, or its keys or shapes do not fit.
    """
    from alphafold.model import utils

    path = params_path(params_dir, model_name)
    if not path.is_file():
        raise ParamsError(f"{path}: missing{_missing_hint(params_dir, model_name)} (expected "
                          "AlphaFold's params/params_<model>.npz layout)")
    try:
        with np.load(path, allow_pickle=False) as data:
            flat = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ParamsError(f"{path}: malformed params file: {exc}") from exc
    bad = [key for key in flat if key.count("//") != 1]
    if bad or not flat:
        raise ParamsError(f"{path}: malformed params file: keys must be 'scope//name', got "
                          f"{bad[:3] if bad else 'no arrays'}")
    try:  # fusing joins each triangle multiplication's left and right halves
        params = utils.flat_params_to_haiku(flat, fuse=True, to_jnp=False)
    except (KeyError, ValueError) as exc:
        raise ParamsError(f"{path}: does not fit this model's architecture: a triangle "
                          f"multiplication's arrays are missing or mismatched ({exc!r})") from exc
    _check(path, params, expected_shapes(model_name, settings))
    return {scope: {name: np.asarray(v, np.float32) for name, v in leaves.items()}
            for scope, leaves in params.items()}


def without_template_stack(params: dict[str, Any]) -> dict[str, Any]:
    """A template model's params without the template stack, as models 3-5 have them: what it
    runs a target without templates with (`config.family_of`), so its params fit the same
    compiled function. The arrays are shared, not copied."""
    return {scope: leaves for scope, leaves in params.items()
            if not any(part in scope for part in _TEMPLATE_STACK)}


def _draw(scope: str, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    stacked = any(part in scope for part in _STACKED_SCOPES)
    inner = shape[1:] if stacked and len(shape) > 1 else shape
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    if len(inner) >= 2:
        fan_in = int(np.prod(inner[:-1])) if name == "output_w" else int(inner[0])
        return noise * np.float32(1.0 / np.sqrt(max(fan_in, 1)))
    base = _CONSTANT_BASE.get(name, 0.0)
    std = next((v for (part, leaf), v in _SCALED_STD.items() if part in scope and leaf == name),
               _SMALL_STD)
    return np.float32(base) + noise * np.float32(std)


def _to_release_layout(params: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Haiku params (fused triangle projections) -> DeepMind's flat npz keys (split ones)."""
    from alphafold.model import utils

    flat = {f"{scope}//{name}": v for scope, leaves in params.items() for name, v in leaves.items()}
    split = utils.flat_params_to_haiku(flat, fuse=False, to_jnp=False)
    return {f"{scope}//{name}": np.asarray(v) for scope, leaves in split.items()
            for name, v in leaves.items()}


def write_random_params(params_dir: Path, settings: ModelSettings, *, seed: int = 0) -> list[Path]:
    """Random weights of the real architecture for each of `settings.model_names`.

    Shapes come from tracing the model (no compile); values are drawn with numpy: weights
    N(0, 1/fan_in), biases and offsets N(0, 0.1) (the outer product mean's output bias
    N(0, 0.001): `_SCALED_STD`), scales and gates N(AlphaFold's init, 0.1).
    Records the config size in `params/parafold_params.json` so `predict` can check it.
    """
    if seed < 0:
        raise ParamsError(f"--seed must be >= 0, got {seed}")
    params_dir = Path(params_dir)
    written: list[Path] = []
    for index, model_name in enumerate(settings.model_names):
        rng = np.random.default_rng([seed, index])
        shapes = expected_shapes(model_name, settings)
        params = {scope: {name: _draw(scope, name, shape, rng) for name, shape in leaves.items()}
                  for scope, leaves in shapes.items()}
        path = params_path(params_dir, model_name)
        with atomic_writer(path, "wb") as handle:
            np.savez(handle, **_to_release_layout(params))
        log.info("wrote random %s params for %s (%s family) to %s", settings.config_size,
                 model_name, family_of(model_name), path)
        written.append(path)
    info_path = params_dir / "params" / PARAMS_INFO_FILE
    info = read_params_info(params_dir) or {}
    info.update({"config": settings.config_size, "random": True, "seed": seed})
    info.setdefault("models", [])
    info["models"] = sorted(set(info["models"]) | set(settings.model_names))
    atomic_write_json(info_path, info)
    return written
