"""Where work runs: in-process (tests), local processes (default) or a Ray cluster.

Every engine runs the same job functions (`parafold.engine.jobs`), so a result does not depend
on where it was computed. Importing this package imports neither jax nor ray.
"""

from parafold.engine.base import Executor, FoldWorkerHandle, FoldWorkerSpec, JobHandle, Resources

__all__ = ["Executor", "FoldWorkerHandle", "FoldWorkerSpec", "JobHandle", "Resources",
           "make_executor"]


def make_executor(engine: str, *, cpus: int = 0, gpus: tuple[str, ...] | None = None,
                  address: str | None = None) -> Executor:
    """The executor named by `--engine` (inline, local or ray); `cpus=0`: all there are.

    Raises:
        InputError: an unknown engine name.
    """
    from parafold.errors import InputError

    if engine == "inline":
        from parafold.engine.inline import InlineExecutor

        return InlineExecutor()
    if engine == "local":
        from parafold.engine.local import LocalExecutor
        from parafold.search.budget import default_cpus

        return LocalExecutor(cpus=cpus or default_cpus(), gpus=gpus)
    if engine == "ray":
        from parafold.engine.ray_engine import RayExecutor

        return RayExecutor(address=address, cpus=cpus or None, gpus=gpus)
    raise InputError(f"unknown engine {engine!r}: use local, ray or inline")
