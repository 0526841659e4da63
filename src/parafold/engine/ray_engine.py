"""A Ray cluster: searches as tasks sized in CPUs, fold workers as actors holding one GPU each.

The actors run the same `FoldSlot` code as the local engine's fold processes, so results do
not depend on the engine. `address=None` starts a private Ray on this machine; `auto` or
`HOST:PORT` joins a running cluster (see docs/cluster.md). Every node must see OUT, the
databases and the weights at the same paths (a shared file system), and have parafold installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from parafold.engine.base import Executor, FoldWorkerHandle, FoldWorkerSpec, JobHandle, Resources
from parafold.engine.jobs import FoldSlot
from parafold.errors import SchedulerError

__all__ = ["RayExecutor"]

logger = logging.getLogger(__name__)
R = TypeVar("R")
_CONNECT_TIMEOUT_S = 10.0  # a head that answers at all answers faster


def _use_token_if_present() -> None:
    """Join a cluster that uses Ray's token authentication (the default of `ray start` since
    Ray 2.5x) when a token is at hand: drivers that join do not switch it on by themselves.
    An explicit RAY_AUTH_MODE is respected."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """`ray.init` installs its own SIGTERM handler (`sys.exit(15)`), which replaced ours: a
    time limit or `scancel` then ended the run with exit 15 and no message, and the ledger
    recorded exit 2. Ours (`lifecycle.stop_on_sigterm`: exit 143, work kept) is put back."""
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and saved is not None:
            signal.signal(signal.SIGTERM, saved)


def _unreachable(address: str) -> str | None:
    """Why nothing answers at `address` (HOST:PORT, or `auto` found as Ray finds it), or None.

    Ray retries a cluster that is gone for minutes before it gives up; a closed or silent port
    is told here in seconds. Anything this cannot judge (a `ray://` client address, Ray's own
    lookup changed) is left to `ray.init`.
    """
    import socket

    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address("auto") or ""
        except ConnectionError as exc:
            return str(exc)
        except Exception:  # Ray's internals moved: leave it to ray.init
            return None
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or "://" in host:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc}); is the cluster up?"


class _FoldActorImpl:
    """The body of a fold actor: one FoldSlot for the actor's life."""

    def __init__(self, params_dir: Path, settings: Any, kind: str) -> None:
        self._slot = FoldSlot(params_dir, settings, kind)

    def warm(self) -> str:
        return self._slot.warm()

    def fold(self, feature_sets: Sequence[Any], out_root: Path) -> Any:
        return self._slot.fold(feature_sets, out_root)


class _RayFoldWorker(FoldWorkerHandle):
    def __init__(self, spec: FoldWorkerSpec, kind: str, options: dict[str, Any]) -> None:
        import ray

        self.name = kind
        self.platform = "cpu" if kind == "cpu" else "gpu"
        self._spec = spec
        self._cls = ray.remote(_FoldActorImpl).options(**options)
        self._actor = self._new_actor()

    def _new_actor(self) -> Any:
        return self._cls.remote(self._spec.params_dir, self._spec.settings, self.name)

    def warm(self) -> JobHandle[Any]:
        return JobHandle(self._actor.warm.remote().future(), label=self.name)

    def fold(self, feature_sets: Sequence[Any], out_root: Path) -> JobHandle[Any]:
        ref = self._actor.fold.remote(list(feature_sets), out_root)
        return JobHandle(ref.future(), label=self.name)

    def restart(self) -> None:
        import ray

        logger.warning("fold actor %s died; starting a new one", self.name)
        ray.kill(self._actor, no_restart=True)
        self._actor = self._new_actor()

    def release(self) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        import ray

        ray.kill(self._actor, no_restart=True)


class RayExecutor(Executor):
    """Work on a Ray cluster (or a private local Ray when `address` is None).

    Raises:
        SchedulerError: Ray cannot be reached at `address`.
    """

    name = "ray"

    def __init__(self, *, address: str | None = None, cpus: int | None = None,
                 gpus: tuple[str, ...] | None = None) -> None:
        if address:  # Ray reads its authentication mode when imported: set it first
            _use_token_if_present()
        import ray

        self._owns_ray = False
        self._requested_gpus = gpus
        self._workers: list[_RayFoldWorker] = []
        self._remote_fns: dict[tuple[Any, ...], Any] = {}
        try:
            if not ray.is_initialized():
                with _keeping_sigterm_handler():
                    self._init_ray(ray, address, cpus)
                self._owns_ray = True
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SchedulerError(f"cannot reach a Ray cluster at {address!r}: {exc}") from exc
        resources = ray.cluster_resources()
        self._cluster_cpus = int(resources.get("CPU", 0))
        self._cluster_gpus = int(resources.get("GPU", 0))
        self._cpu_limit = cpus

    @staticmethod
    def _init_ray(ray: Any, address: str | None, cpus: int | None) -> None:
        if address:
            why = _unreachable(address)
            if why is not None:
                raise ConnectionError(why)
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:  # "local": a new Ray of our own, even where RAY_ADDRESS is set or an earlier
            # `ray start` left its address in /tmp/ray (Ray joins those)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=True)

    def _n_fold_workers(self) -> int:
        if self._requested_gpus == ():
            return 0
        if self._requested_gpus is None:
            return self._cluster_gpus
        return min(len(self._requested_gpus), self._cluster_gpus)

    def submit(self, fn: Callable[..., R], *args: Any, resources: Resources) -> JobHandle[R]:
        import ray

        key = (fn, resources.cpus, resources.gpus, resources.memory_gb)
        remote = self._remote_fns.get(key)
        if remote is None:
            options: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": resources.gpus,
                                       "max_retries": 1}
            if resources.memory_gb:
                options["memory"] = int(resources.memory_gb * 2**30)
            remote = ray.remote(fn).options(**options)
            self._remote_fns[key] = remote
        return JobHandle(remote.remote(*args).future(), label=getattr(fn, "__name__", "job"))

    def cpu_capacity(self) -> int:
        """Cluster CPUs less the one each fold actor holds (capped by `--cpus` if given)."""
        cpus = self._cluster_cpus - max(1, self._n_fold_workers())
        if self._cpu_limit:
            cpus = min(cpus, self._cpu_limit)
        return max(1, cpus)

    def max_job_cpus(self) -> int:
        """One task runs on one node: the largest node's CPUs, less one a fold actor may hold
        there (asking for more than a node has would wait forever)."""
        import ray

        nodes = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        return max(1, min(self.cpu_capacity(), max(nodes, default=1) - 1))

    def start_fold_workers(self, spec: FoldWorkerSpec) -> list[FoldWorkerHandle]:
        n = self._n_fold_workers()
        if n == 0:
            self._workers.append(_RayFoldWorker(spec, "cpu", {
                "num_cpus": 1, "num_gpus": 0,
                "runtime_env": {"env_vars": {"JAX_PLATFORMS": "cpu"}}}))
        for i in range(n):
            self._workers.append(_RayFoldWorker(spec, f"gpu{i}", {"num_cpus": 1, "num_gpus": 1}))
        return list(self._workers)

    def describe(self) -> str:
        gpus = self._n_fold_workers()
        where = f"{gpus} GPU actors" if gpus else "one CPU fold actor (no GPU in the cluster)"
        return f"ray engine: {self._cluster_cpus} CPUs in the cluster, {where}"

    def shutdown(self) -> None:
        import ray

        for worker in self._workers:
            try:
                worker.shutdown()
            except Exception as exc:  # best effort at teardown; the cluster may be gone
                logger.debug("could not stop %s: %s", worker.name, exc)
        self._workers.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
