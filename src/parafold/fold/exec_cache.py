"""Serialized compiled executables on disk: a warm process skips tracing and lowering.

JAX's persistent compilation cache is keyed by the lowered HLO, so a hit still pays for
tracing the AlphaFold model in Python and lowering it (7-10 s per shape on an H100). This
cache sits in front of it: `<compile_cache_dir>/executables/<key>.bin` holds the executable
as `jax.experimental.serialize_executable.serialize` wrote it, keyed by everything that
determines it (shape key, model config, input signature, library versions, backend and
device, XLA flags, the step function's source). A hit calls `deserialize_and_load` only.

File format: a magic line, one JSON header line (key, output tree, payload size and SHA-256),
then the payload. The trees are not pickled: the input tree comes from the caller's own
arguments and the output tree from the JSON header. The payload itself is JAX's pickle of
its executable metadata; before JAX loads it, a dry run with an unpickler that allows only a
short list of JAX classes (and never loads the machine code) refuses anything else. The
payload holds machine code either way, so whoever can write this folder can run code, the
same trust as JAX's own cache beside it: keep it in the user's private cache folder.

Every failure (unserializable custom calls, a new JAX, a truncated file) returns None or
False with a debug log; the caller then compiles as usual. Only freshly compiled executables
are stored: one that JAX's persistent cache returned re-serializes broken on XLA:CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
from importlib import metadata
from pathlib import Path
from typing import Any

from parafold.fold.buckets import ShapeKey
from parafold.store import atomic_writer

__all__ = ["ExecutableCache", "encode_tree", "decode_tree"]

log = logging.getLogger(__name__)

_MAGIC = b"PARAFOLD-EXECUTABLE 1\n"
_FORMAT = 1
# (module, name) pairs JAX's executable pickle may name; anything else is refused.
_ALLOWED = frozenset({
    ("jax", "P"), ("jax.sharding", "PartitionSpec"), ("jax._src.partition_spec", "PartitionSpec"),
    ("jax._src.core", "ShapedArray"), ("jax._src.core", "ManualAxisType"),
    ("jax._src.core", "MemorySpace"), ("jax._src.mesh", "AbstractMesh"),
    ("jax._src.mesh", "AxisType"), ("jax._src.layout", "Layout"),
    ("jax._src.linear_util", "DebugInfo"), ("jax._src.stages", "ArgInfo"),
    ("jax._src.interpreters.pxla", "AllArgsInfo"),
    ("jax._src.interpreters.pxla", "UnloadedMeshExecutable"),
    ("jax._src.named_sharding", "_unpickle_named_sharding"),
    ("jax._src.sharding_impls", "_unpickle_single_device_sharding"),
    ("numpy", "dtype"), ("builtins", "set"), ("builtins", "frozenset"),
})
_ALLOWED_JAXLIB = frozenset({"DeviceList"})  # its module moved between jaxlib releases


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def environment() -> dict[str, Any]:
    """What outside the model decides an executable: libraries, backend, device, flags."""
    import jax
    import jaxlib

    import parafold

    device = jax.devices()[0]
    runner_src = Path(__file__).with_name("runner.py")
    return {
        "format": _FORMAT, "parafold": parafold.__version__, "jax": jax.__version__,
        "jaxlib": jaxlib.__version__, "alphafold": _version("alphafold-colabfold"),
        "kernels": _version("colabfold-kernels"), "haiku": _version("dm-haiku"),
        # the FFI kernels a loaded executable calls by name live in these libraries
        "cuda_kernels": _version("colabfold-cuda-kernels"),
        "legacy_kernels": _version("colabfold-legacy-kernels"), "platform": device.platform,
        "platform_version": device.client.platform_version, "device_kind": device.device_kind,
        "devices": jax.local_device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        # the step function (outputs kept, dropped, vmapped) lives there; edits change it
        "runner_sha256": hashlib.sha256(runner_src.read_bytes()).hexdigest(),
    }


def _signature(abstract: Any) -> list[Any]:
    """Input tree and every leaf's shape and dtype, so a changed argument never hits."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(abstract)
    return [str(tree), [[list(x.shape), str(x.dtype)] for x in leaves]]


def encode_tree(tree: Any) -> Any:
    """A treedef of tuples, lists, str-keyed dicts and None as JSON (ValueError otherwise)."""
    return _encode(tree.unflatten([_LEAF] * tree.num_leaves))


_LEAF = object()


def _encode(node: Any) -> Any:
    if node is _LEAF:
        return "*"
    if node is None:
        return {"none": None}
    if type(node) is tuple:
        return {"tuple": [_encode(x) for x in node]}
    if type(node) is list:
        return {"list": [_encode(x) for x in node]}
    if type(node) is dict and all(isinstance(k, str) for k in node):
        return {"dict": {k: _encode(v) for k, v in node.items()}}
    raise ValueError(f"cannot encode a pytree node of type {type(node).__name__}")


def decode_tree(data: Any) -> Any:
    """The treedef `encode_tree` wrote."""
    import jax

    return jax.tree_util.tree_structure(_decode(data), is_leaf=lambda x: x is _LEAF)


def _decode(data: Any) -> Any:
    if data == "*":
        return _LEAF
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError("malformed tree")
    kind, value = next(iter(data.items()))
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(_decode(x) for x in value)
    if kind == "list":
        return [_decode(x) for x in value]
    if kind == "dict":
        return {str(k): _decode(v) for k, v in value.items()}
    raise ValueError(f"malformed tree node {kind!r}")


def _check_payload(payload: bytes) -> None:
    """Unpickle with only allowed classes and without loading the executable: raises
    `pickle.UnpicklingError` on anything else, so JAX's own unpickler then sees only these."""
    import jax
    from jax.experimental import serialize_executable as se

    class _DryRun(se._JaxPjrtUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            allowed = ((module, name) in _ALLOWED
                       or (module.startswith("jaxlib.") and name in _ALLOWED_JAXLIB))
            if not allowed:
                raise pickle.UnpicklingError(f"refused {module}.{name}")
            return super().find_class(module, name)

        def persistent_load(self, pid: Any) -> Any:
            if isinstance(pid, tuple) and pid and pid[0] == "exec":
                return None  # machine code: left for the real load
            return super().persistent_load(pid)

    _DryRun(io.BytesIO(payload), jax.devices()[0].client).load()


class ExecutableCache:
    """Executables in one folder, by a key that hashes everything that determines them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._env: dict[str, Any] | None = None

    def key(self, shape: ShapeKey, model_fingerprint: str, abstract: Any) -> str:
        """The file key for an executable of `shape` with this model config and inputs."""
        if self._env is None:
            self._env = environment()
        blob = json.dumps({"env": self._env, "shape": shape.describe(),
                           "model": model_fingerprint, "inputs": _signature(abstract)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.bin"

    def discard(self, key: str) -> None:
        """Delete the file of `key` (one that loaded but failed to run)."""
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            log.debug("executable cache: cannot remove %s: %s", self.path(key), exc)

    def load(self, key: str, in_tree: Any) -> Any | None:
        """The executable stored under `key`, loaded without tracing; None when absent or
        unusable (then the file is removed; logged at debug level)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("executable cache: cannot read %s: %s", path, exc)
            return None
        try:
            from jax.experimental.serialize_executable import deserialize_and_load

            if not data.startswith(_MAGIC):
                raise ValueError("not an executable cache file")
            head_end = data.index(b"\n", len(_MAGIC))
            header = json.loads(data[len(_MAGIC):head_end])
            payload = data[head_end + 1:]
            if header.get("key") != key:
                raise ValueError("key mismatch")
            if (len(payload) != header["payload_bytes"]
                    or hashlib.sha256(payload).hexdigest() != header["payload_sha256"]):
                raise ValueError("payload truncated or corrupted")
            out_tree = decode_tree(header["out_tree"])
            _check_payload(payload)
        except Exception as exc:  # any failure: compile as usual
            # the key fixes the content, so this file can never become usable: remove it
            log.debug("executable cache: %s unusable (%s: %s); removed, compiling", path.name,
                      type(exc).__name__, exc)
            self.discard(key)
            return None
        try:
            loaded = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as exc:  # this process's trouble (memory, a busy device), maybe not
            # the file's: it stays for the other processes sharing the cache; compile here
            log.debug("executable cache: %s did not load here (%s: %s); compiling", path.name,
                      type(exc).__name__, exc)
            return None
        with contextlib.suppress(OSError):  # used now: last to go from a bounded folder
            os.utime(path)  # (`fold.cache_budget`)
        return loaded

    def store(self, key: str, compiled: Any, describe: str = "") -> bool:
        """Write `compiled` under `key` atomically; False (debug log) if it cannot be."""
        try:
            from jax.experimental.serialize_executable import serialize

            payload, _, out_tree = serialize(compiled)
            encoded = encode_tree(out_tree)
            if decode_tree(encoded) != out_tree:
                raise ValueError("output tree does not round-trip")
            _check_payload(payload)  # never write what load() would refuse
            header = {"key": key, "describe": describe, "out_tree": encoded,
                      "payload_bytes": len(payload),
                      "payload_sha256": hashlib.sha256(payload).hexdigest()}
            with atomic_writer(self.path(key)) as handle:
                handle.write(_MAGIC)
                handle.write(json.dumps(header, sort_keys=True).encode() + b"\n")
                handle.write(payload)
        except Exception as exc:
            log.debug("executable cache: not storing %s (%s: %s)", describe or key,
                      type(exc).__name__, exc)
            return False
        log.debug("executable cache: stored %s (%d bytes)", describe or key, len(payload))
        return True
