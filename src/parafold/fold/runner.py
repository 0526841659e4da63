"""The compiled-model cache: one executable per input shape, shared by a family's models.

Params are an argument of the compiled function, not a constant baked into it, so swapping
model_1 for model_2 (or model_3 for model_5, or, for a target without templates, any model for
any other: `config.family_of`) reuses the executable. Each recycling iteration
is one call of the executable, as in the fork (`AlphaFold_noE` with `batch['prev']`), so the
number of recycles never changes a shape. Executables are built ahead of time
(`jit(...).lower(...).compile()`) into a dict keyed by `ShapeKey`: that dict is the compile
counter the tests read, and compile time is measured apart from prediction time.

Two cache levels sit under that dict: serialized executables (`fold.exec_cache`, no tracing
or lowering on a hit) and then JAX's persistent compilation cache (tracing and lowering,
no XLA compile on a hit).

The cache is thread-safe so the worker can compile upcoming shapes in background threads
while the device runs the current one (`ModelSettings.compile_ahead`); `input_shapes` gives
those threads a shape's inputs before any target of it is processed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from parafold.errors import GpuOutOfMemoryError, InferenceError
from parafold.fold.buckets import ShapeKey, shape_key
from parafold.fold.config import model_config, resolve_pallas
from parafold.fold.exec_cache import ExecutableCache
from parafold.fold.settings import ModelSettings

if TYPE_CHECKING:
    import haiku as hk
    import ml_collections

__all__ = ["ModelRunner", "RunnerStats", "enable_persistent_cache", "forward_transform",
           "probe_batch", "input_shapes", "is_out_of_memory", "Launched", "LaunchedBatch"]

log = logging.getLogger(__name__)

# Outputs we keep from each iteration; the MSA logits and structure trajectory are dropped.
_KEEP_STRUCTURE = ("final_atom_positions", "final_atom_mask")
_DROP = ("masked_msa", "representations")
_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM when allocating")


class _CacheEvents:
    """Counts JAX's persistent-cache events (process-wide; listeners cannot be removed).

    Hits are also counted per thread: JAX reports them in the thread that compiles, and with
    several compiling at once only that count tells whose compile the cache served.
    """

    def __init__(self) -> None:
        self.hits = 0
        self.writes = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def __call__(self, event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            with self._lock:
                self.hits += 1
            self._local.hits = self.thread_hits() + 1
        elif event == "/jax/compilation_cache/cache_misses":
            with self._lock:
                self.writes += 1

    def thread_hits(self) -> int:
        """Hits seen by the calling thread."""
        return int(getattr(self._local, "hits", 0))


_EVENTS: _CacheEvents | None = None
_MIN_COMPILE_S_STORED = 1.0  # JAX's own default
_CACHE_DIR: Path | None = None


def _events() -> _CacheEvents:
    global _EVENTS
    if _EVENTS is None:
        import jax

        _EVENTS = _CacheEvents()
        jax.monitoring.register_event_listener(_EVENTS)
    return _EVENTS


def enable_persistent_cache(cache_dir: Path | None, max_bytes: int | None = None) -> None:
    """Point JAX's persistent compilation cache at `cache_dir` (None: leave it off), first
    holding the folder to `max_bytes` (`fold.cache_budget`; None: no bound).

    Only compiles of a second or more are stored: the model's (seconds, also the tiny config
    of CPU tests; 25-30 s on a GPU), not the small jits of AlphaFold's feature pipeline (tens
    of milliseconds, about three files a protein, one per raw shape, where features are
    processed in this process: on the CPU, millions of files in one folder at proteome scale).
    """
    global _CACHE_DIR
    import jax

    from parafold.fold.cache_budget import prune_compile_cache

    _events()
    if cache_dir is None or Path(cache_dir) == _CACHE_DIR:
        return
    prune_compile_cache(cache_dir, max_bytes)  # before this process adds to it
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home on compute nodes, another user's folder: the
        # cache only saves work, so compile without it (as JAX does with a folder it cannot use)
        log.warning("compilation cache %s cannot be used (%s); compiling without it",
                    cache_dir, exc)
        return
    if _CACHE_DIR is not None:
        try:
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except (ImportError, AttributeError):  # private API; a new dir then needs a new process
            log.warning("could not switch the compilation cache to %s", cache_dir)
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_S_STORED)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _CACHE_DIR = Path(cache_dir)
    log.info("persistent compilation cache: %s", cache_dir)


@contextlib.contextmanager
def _oom_as_error(key: ShapeKey, doing: str) -> Iterator[None]:
    """XLA's out-of-memory inside the block becomes `GpuOutOfMemoryError` naming the shape;
    anything else passes unchanged."""
    try:
        yield
    except GpuOutOfMemoryError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise GpuOutOfMemoryError(f"out of memory {doing} {key.describe()}") from exc
        raise


def is_out_of_memory(exc: BaseException) -> bool:
    """True only when XLA said it ran out of device memory."""
    return any(marker in str(exc) for marker in _OOM_MARKERS)


def forward_transform(model_name: str, settings: ModelSettings, *, low_memory: bool,
                      key: ShapeKey | None = None, pallas: dict[str, Any] | None = None
                      ) -> tuple[hk.Transformed, ml_collections.ConfigDict]:
    """haiku transform of one recycling iteration (the fork's `AlphaFold_noE`) and its config."""
    import haiku as hk
    from alphafold.model import modules

    key = key or shape_key(16, 4, model_name, settings)
    cfg = model_config(model_name, settings, clusters=key.clusters, extra=key.extra,
                       templates=key.templates, pallas=pallas or {"use_pallas": False},
                       low_memory=low_memory)

    def forward(batch: dict[str, Any]) -> dict[str, Any]:
        return modules.AlphaFold_noE(cfg.model)(batch, is_training=False)

    return hk.transform(forward), cfg


def probe_batch(model_name: str, settings: ModelSettings, *, templates: bool = True
                ) -> dict[str, Any]:
    """A small processed batch for tracing (parameter shapes do not depend on its size);
    `templates` false: as a target without templates is processed."""
    from parafold.fold.processing import process_features
    from parafold.fold.synthetic import make_features

    key = shape_key(16, 4, model_name, settings, templates=templates)
    _, cfg = forward_transform(model_name, settings, low_memory=False, key=key)
    raw = make_features("ACDEFGHIKLMNPQRS", 4, num_templates=1 if key.templates else 0)
    feats = process_features(raw, cfg, key, seed=0)
    return {k: v[0] for k, v in feats.items()}


def input_shapes(model_name: str, settings: ModelSettings, key: ShapeKey) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct`s of one iteration of `process_features`' output at `key`, with
    the member axis when `key.batch > 1` (dtypes then as `jax.device_put` makes them), so an
    executable can be compiled before any target of that shape is processed.

    Padding fixes every shape: each axis AlphaFold's schema (`data.eval.feat`) names is padded
    to the key's size, the others come from a small probe target. The probe runs AlphaFold's
    numpy TF backend, whose random state is global: call this from the thread that processes
    features, never from a compile thread.
    """
    import jax
    from alphafold.model.tf import shape_placeholders as sp

    sizes = {sp.NUM_RES: key.length, sp.NUM_MSA_SEQ: key.clusters, sp.NUM_EXTRA_SEQ: key.extra,
             sp.NUM_TEMPLATES: key.templates}
    lead = (key.batch,) if key.batch > 1 else ()
    out = {}
    for name, (axes, dtype) in _feature_schema(model_name, settings, key.templates > 0).items():
        # as AlphaFold's make_fixed_size: an axis padded to size 0 keeps the data's size
        shape = tuple(sizes.get(axis, 0) or probed for axis, probed in axes)
        out[name] = jax.ShapeDtypeStruct(
            lead + shape, jax.dtypes.canonicalize_dtype(dtype) if lead else dtype)
    return out


@functools.lru_cache(maxsize=16)
def _feature_schema(model_name: str, settings: ModelSettings, templates: bool
                    ) -> dict[str, tuple[tuple[tuple[str, int], ...], np.dtype]]:
    """Per processed feature: each axis as (padding placeholder, or "" where not padded, and
    the probe's size), and the dtype."""
    schema = forward_transform(model_name, settings, low_memory=False)[1].data.eval.feat
    out = {}
    for name, value in probe_batch(model_name, settings, templates=templates).items():
        named = [axis or "" for axis in schema[name]] if name in schema else []
        if len(named) != value.ndim:
            named = [""] * value.ndim
        out[name] = (tuple(zip(named, value.shape, strict=True)), value.dtype)
    return out


@dataclass(slots=True)
class RunnerStats:
    """Counters of the runner.

    `compiles` counts executables made ready in this process by any route: `executable_hits`
    were loaded from serialized executables (no tracing), `persistent_hits` were traced and
    lowered but JAX's persistent cache gave the binary, `xla_compiles` the rest.
    `compiled_ahead` of them (`compile_ahead_s` seconds) were made by compile-ahead threads;
    `compile_spans` holds
    (shape, requested, ready) `time.perf_counter` times of each, so a benchmark can see how
    compiles overlapped the device's work.
    """

    compiles: int = 0
    persistent_hits: int = 0
    executable_hits: int = 0
    compile_s: float = 0.0
    predict_s: float = 0.0
    predictions: int = 0
    launches: int = 0
    batched_members: int = 0
    padded_slots: int = 0
    compile_keys: list[str] = field(default_factory=list)
    compiled_ahead: int = 0
    compile_ahead_s: float = 0.0
    compile_spans: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def traced(self) -> int:
        """Executables this process traced and lowered (not loaded ready-made)."""
        return self.compiles - self.executable_hits

    @property
    def xla_compiles(self) -> int:
        return self.traced - self.persistent_hits

    def as_dict(self) -> dict[str, Any]:
        return {"compiles": self.compiles, "persistent_hits": self.persistent_hits,
                "executable_hits": self.executable_hits, "traced": self.traced,
                "xla_compiles": self.xla_compiles, "compile_s": round(self.compile_s, 3),
                "predict_s": round(self.predict_s, 3), "predictions": self.predictions,
                "launches": self.launches, "batched_members": self.batched_members,
                "padded_slots": self.padded_slots, "compiled_ahead": self.compiled_ahead,
                "compile_ahead_s": round(self.compile_ahead_s, 3),
                "compile_spans": [[k, round(a, 4), round(b, 4)]
                                  for k, a, b in self.compile_spans]}


@dataclass(frozen=True, slots=True)
class _Entry:
    compiled: Any
    fingerprint: str
    disk_key: str = ""  # set when loaded from the executable cache
    seconds: float = 0.0  # loading or compiling it


@dataclass(slots=True)
class Launched:
    """A prediction dispatched to the device; `fetch()` waits for it and brings it home."""

    key: ShapeKey
    outputs: Any
    iterations: int
    started: float


def _step_fn(transform: hk.Transformed) -> Any:
    import jax.numpy as jnp

    def step(params: Any, rng: Any, batch: dict[str, Any], prev: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        out = transform.apply(params, rng, {**batch, "prev": prev})
        new_prev = {k: v.astype(jnp.float32) for k, v in out.pop("prev").items()}
        for name in _DROP:
            out.pop(name, None)
        out["structure_module"] = {k: out["structure_module"][k] for k in _KEEP_STRUCTURE}
        return out, new_prev

    return step


@dataclass(slots=True)
class LaunchedBatch:
    """A batch dispatched to the device: `count` real members, iterations run per member."""

    key: ShapeKey
    outputs: Any
    iterations: list[int]
    count: int
    started: float


def _batched_step_fn(transform: hk.Transformed) -> Any:
    """vmap of one iteration over members: params shared, features/prev/PRNG key per member."""
    import jax

    return jax.vmap(_step_fn(transform), in_axes=(None, 0, 0, 0))


def _kept(outputs: dict[str, Any], keep: Collection[str] | None) -> dict[str, Any]:
    """The outputs to copy to the host: all, or only the `keep` ones. The distogram and the
    aligned-error probabilities are ~98% of a result's bytes and no output file needs them
    (only `--save-raw`), so leaving them on the device saves that transfer and host memory."""
    if keep is None:
        return outputs
    return {k: v for k, v in outputs.items() if k in keep}


def _member_keys(seeds: list[int], iterations: int) -> list[Any]:
    """Per-iteration PRNG keys [B, 2], each member's sequence exactly as a lone run draws it."""
    import jax
    import jax.numpy as jnp

    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    subs = []
    for _ in range(iterations):
        pairs = jax.vmap(jax.random.split)(keys)
        keys, sub = pairs[:, 0], pairs[:, 1]
        subs.append(sub)
    return subs


class ModelRunner:
    """Compiled executables by shape key, and the recycling loop that calls them."""

    def __init__(self, settings: ModelSettings) -> None:
        import jax

        self.settings = settings
        enable_persistent_cache(settings.compile_cache_dir, settings.compile_cache_max_bytes)
        self.pallas = resolve_pallas(settings)
        if self.pallas.get("use_pallas"):
            import ml_collections
            from colabfold_kernels.fused_ops import register_ffi_targets
            register_ffi_targets(ml_collections.ConfigDict(self.pallas))
        self.platform = jax.default_backend()
        self.stats = RunnerStats()
        self._cache: dict[ShapeKey, _Entry] = {}
        # Guards the cache, the builds in flight and the compile counters: compile-ahead
        # threads and the worker's loop ask for executables at the same time.
        self._lock = threading.Lock()
        self._building: dict[ShapeKey, cf.Future[_Entry]] = {}
        self._unclaimed: dict[ShapeKey, float] = {}
        self._disk: ExecutableCache | None = None
        if settings.compile_cache_dir is not None and settings.executable_cache:
            self._disk = ExecutableCache(Path(settings.compile_cache_dir) / "executables")

    @property
    def compiled_keys(self) -> list[ShapeKey]:
        with self._lock:
            return sorted(self._cache)

    def has(self, key: ShapeKey) -> bool:
        """True when `key` is compiled in this process already."""
        with self._lock:
            return key in self._cache

    def take_compile_s(self, key: ShapeKey) -> float:
        """Seconds `key`'s executable took to make ready, once (then 0): the first unit that
        runs it is charged, whichever thread compiled it."""
        with self._lock:
            return self._unclaimed.pop(key, 0.0)

    def config(self, model_name: str, key: ShapeKey) -> ml_collections.ConfigDict:
        return forward_transform(model_name, self.settings, low_memory=key.low_memory, key=key,
                                 pallas=self.pallas)[1]

    @staticmethod
    def _prev(length: int, batch: int = 1) -> dict[str, np.ndarray]:
        lead = (batch,) if batch > 1 else ()
        return {"prev_msa_first_row": np.zeros(lead + (length, 256), np.float32),
                "prev_pair": np.zeros(lead + (length, length, 128), np.float32),
                "prev_pos": np.zeros(lead + (length, 37, 3), np.float32)}

    def executable(self, model_name: str, key: ShapeKey, params: Any, batch: dict[str, Any],
                   *, ahead: bool = False) -> Any:
        """The executable for `key`, made ready on first use: loaded from the executable cache,
        else traced and compiled (from the persistent cache if there) and then stored.

        `key.batch > 1` compiles the vmapped iteration; `batch` then has a leading member axis.
        Only the shapes and dtypes of `params` and `batch` are read (`jax.ShapeDtypeStruct`s
        will do). Safe from several threads: the first caller for a key builds it and the
        others wait for that build and share its result or error, so each key compiles once.
        `ahead` marks a build for a later unit (`RunnerStats.compiled_ahead`).
        """
        requested = time.perf_counter()
        transform, cfg = forward_transform(model_name, self.settings, low_memory=key.low_memory,
                                           key=key, pallas=self.pallas)
        fingerprint = cfg.model.to_json()
        with self._lock:
            entry = self._cache.get(key)
            building = self._building.get(key)
            owner = entry is None and building is None
            if owner:
                building = self._building[key] = cf.Future()
        if entry is None:
            assert building is not None
            entry = (self._build(building, key, params, batch, transform, fingerprint,
                                 requested=requested, ahead=ahead)
                     if owner else building.result())
        if entry.fingerprint != fingerprint:
            raise InferenceError(f"{model_name}: model config differs from the one compiled "
                                 f"for {key.describe()}")
        return entry.compiled

    def _build(self, building: cf.Future[_Entry], key: ShapeKey, params: Any,
               batch: dict[str, Any], transform: hk.Transformed, fingerprint: str, *,
               requested: float, ahead: bool) -> _Entry:
        """Make `key`'s executable (`building` is this thread's registered build) and publish
        it, or its error, to the threads waiting for it."""
        try:
            entry, source = self._make(key, params, batch, transform, fingerprint)
        except BaseException as exc:
            with self._lock:
                del self._building[key]
            building.set_exception(exc)
            raise
        ready = time.perf_counter()
        with self._lock:
            self._cache[key] = entry
            del self._building[key]
            self._unclaimed[key] = entry.seconds
            stats = self.stats
            stats.compiles += 1
            stats.executable_hits += int(source == "executable cache")
            stats.persistent_hits += int(source == "persistent cache")
            stats.compiled_ahead += int(ahead)
            stats.compile_ahead_s += entry.seconds if ahead else 0.0
            stats.compile_s += entry.seconds
            stats.compile_keys.append(key.describe())
            stats.compile_spans.append((key.describe(), requested, ready))
        building.set_result(entry)
        return entry

    def _make(self, key: ShapeKey, params: Any, batch: dict[str, Any],
              transform: hk.Transformed, fingerprint: str) -> tuple[_Entry, str]:
        """Load or compile the executable for `key`; also says where it came from."""
        import jax

        rng = jax.random.PRNGKey(0)
        if key.batch > 1:
            rng = np.zeros((key.batch,) + tuple(rng.shape), rng.dtype)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          (params, rng, batch, self._prev(key.length, key.batch)))
        disk_key = ""
        if self._disk is not None:
            started = time.perf_counter()
            disk_key = self._disk.key(key, fingerprint, abstract)
            loaded = self._disk.load(disk_key, jax.tree_util.tree_structure((abstract, {})))
            if loaded is not None:
                seconds = time.perf_counter() - started
                log.info("loaded %s in %.2f s (executable cache)", key.describe(), seconds)
                return (_Entry(compiled=loaded, fingerprint=fingerprint, disk_key=disk_key,
                               seconds=seconds), "executable cache")
        step = _batched_step_fn(transform) if key.batch > 1 else _step_fn(transform)
        events = _events()
        hits_before = events.thread_hits()
        started = time.perf_counter()
        with _oom_as_error(key, "compiling"):
            compiled = jax.jit(step).lower(*abstract).compile()
        seconds = time.perf_counter() - started
        hit = events.thread_hits() > hits_before
        log.info("compiled %s in %.1f s%s", key.describe(), seconds,
                 " (persistent cache)" if hit else "")
        # An executable JAX's persistent cache gave back re-serializes broken on XLA:CPU (it
        # loads, then fails at dispatch: "Function ..._fusion not found"): store fresh ones only.
        if self._disk is not None and not hit:
            self._disk.store(disk_key, compiled, key.describe())
        return (_Entry(compiled=compiled, fingerprint=fingerprint, seconds=seconds),
                "persistent cache" if hit else "compiled")

    def put_batch(self, key: ShapeKey, inputs: Any) -> Any:
        """A batch's inputs sent to the device (asynchronously). Out of memory here is the
        shape's, as at launch: the worker halves the batch instead of failing its members.

        Raises:
            GpuOutOfMemoryError: XLA reported the device out of memory.
        """
        import jax

        with _oom_as_error(key, "sending the inputs of"):
            return jax.device_put(inputs)

    def launch(self, model_name: str, key: ShapeKey, params: Any, feats: dict[str, np.ndarray],
               seed: int) -> Launched:
        """Dispatch all recycling iterations; returns before the device is done (unless early
        stopping needs to read the tolerance).

        Raises:
            GpuOutOfMemoryError: XLA reported the device out of memory.
        """
        import jax

        iterations = int(feats["aatype"].shape[0])
        tolerance = self.settings.recycle_early_stop_tolerance
        first = {k: v[0] for k, v in feats.items()}
        compiled = self.executable(model_name, key, params, first)
        started = time.perf_counter()
        with self._running(key):
            rng = jax.random.PRNGKey(seed)
            prev: Any = self._prev(key.length)
            outputs: Any = None
            done = 0
            for r in range(iterations):
                rng, sub = jax.random.split(rng)
                batch = first if r == 0 else {k: v[r] for k, v in feats.items()}
                outputs, prev = compiled(params, sub, batch, prev)
                done = r + 1
                if tolerance > 0 and r > 0 and float(outputs["tol"]) < tolerance:
                    break
        self.stats.launches += 1
        return Launched(key=key, outputs=outputs, iterations=done, started=started)

    def fetch(self, launched: Launched, keep: Collection[str] | None = None
              ) -> tuple[dict[str, Any], float]:
        """Wait for a launched prediction; its outputs as numpy and seconds since launch.
        With `keep`, only those outputs leave the device (see `_kept`)."""
        import jax

        with self._running(launched.key):  # async dispatch reports failures at the first wait
            result = jax.device_get(_kept(launched.outputs, keep))
        seconds = time.perf_counter() - launched.started
        self.stats.predict_s += seconds
        self.stats.predictions += 1
        result["num_recycles"] = np.int32(launched.iterations - 1)
        return result, seconds

    def launch_batch(self, model_name: str, key: ShapeKey, params: Any,
                     inputs: list[dict[str, Any]], seeds: list[int]) -> LaunchedBatch:
        """Dispatch every iteration of a batch (`stack_members` output, maybe on the device).

        With an early-stop tolerance, each iteration reads the members' `tol`: a member below
        it is done, and from then on its outputs and recycling state are frozen (masked with
        `done`); the loop ends when every real member is done. Without one, nothing syncs.

        Raises:
            GpuOutOfMemoryError: XLA reported the device out of memory.
        """
        import jax.numpy as jnp

        from parafold.fold.batching import freeze_done

        count, iterations = len(seeds), len(inputs)
        if not 1 <= count <= key.batch:
            raise ValueError(f"{count} members for {key.describe()}")
        tolerance = self.settings.recycle_early_stop_tolerance
        compiled = self.executable(model_name, key, params, inputs[0])
        started = time.perf_counter()
        done = np.zeros(key.batch, bool)
        done[count:] = True  # dummy slots: never waited for
        ran = [iterations] * count
        with self._running(key):
            subs = _member_keys(list(seeds) + [seeds[0]] * (key.batch - count), iterations)
            # zeros made on the device: no host->device copy of B pair-sized arrays per launch
            prev: Any = {k: jnp.zeros(v.shape, v.dtype)
                         for k, v in self._prev(key.length, key.batch).items()}
            outputs: Any = None
            for r in range(iterations):
                new_out, new_prev = compiled(params, subs[r], inputs[r], prev)
                if r > 0 and done[:count].any():
                    new_out = freeze_done(done, new_out, outputs)
                    new_prev = freeze_done(done, new_prev, prev)
                outputs, prev = new_out, new_prev
                if tolerance > 0 and r > 0:
                    stopped = ~done & (np.asarray(outputs["tol"]) < tolerance)
                    for m in np.flatnonzero(stopped[:count]):
                        ran[int(m)] = r + 1
                    done |= stopped
                    if done[:count].all():
                        break
        self.stats.launches += 1
        self.stats.batched_members += count
        self.stats.padded_slots += key.batch - count
        return LaunchedBatch(key=key, outputs=outputs, iterations=ran, count=count,
                             started=started)

    def fetch_batch(self, launched: LaunchedBatch, keep: Collection[str] | None = None
                    ) -> tuple[list[dict[str, Any]], float]:
        """Wait for a batch; one numpy result per real member and seconds since launch.
        With `keep`, only those outputs leave the device (see `_kept`)."""
        import jax

        from parafold.fold.batching import split_members

        with self._running(launched.key):
            host = jax.device_get(_kept(launched.outputs, keep))
        seconds = time.perf_counter() - launched.started
        self.stats.predict_s += seconds
        self.stats.predictions += launched.count
        results = split_members(host, launched.count)
        for result, ran in zip(results, launched.iterations, strict=True):
            result["num_recycles"] = np.int32(ran - 1)
        return results, seconds

    @contextlib.contextmanager
    def _running(self, key: ShapeKey) -> Iterator[None]:
        """Device work with the executable for `key`: out of memory is reported as such; any
        other failure also evicts an executable that came from the executable cache."""
        try:
            with _oom_as_error(key, "predicting"):
                yield
        except GpuOutOfMemoryError:
            raise
        except Exception as exc:
            self._run_failed(key, exc)
            raise

    def _run_failed(self, key: ShapeKey, exc: BaseException) -> None:
        """A loaded executable that fails to run (not out of memory) is deleted from the
        executable cache, so the next process compiles it; this call still raises."""
        with self._lock:
            entry = self._cache.get(key)
            if entry is None or not entry.disk_key or self._disk is None:
                return
            del self._cache[key]
        log.warning("executable for %s from the executable cache failed (%s); removing it",
                    key.describe(), exc)
        self._disk.discard(entry.disk_key)

    def low_memory_key(self, key: ShapeKey) -> ShapeKey:
        return replace(key, low_memory=True)
