"""`predict` on several devices of one machine (`engine.devices`): a fold process per device,
each taking neighbouring runs of the shape order, idle ones stealing the busiest one's last run;
a process that dies gives its run to another device, twice in a row retires it. The scheduling
tests use in-process fake workers; one test runs two real fold processes (on the CPU here)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from parafold.cli import app  # noqa: E402
from parafold.engine.base import FoldWorkerHandle, JobHandle  # noqa: E402
from parafold.engine.devices import fold_on_devices  # noqa: E402
from parafold.engine.jobs import FoldBatchResult  # noqa: E402
from parafold.errors import FeatureError  # noqa: E402
from parafold.featureset import FeatureSet, write_feature_set  # noqa: E402
from parafold.fold.settings import ModelSettings  # noqa: E402
from parafold.fold.worker import FoldOutcome  # noqa: E402

SETTINGS = ModelSettings(config_size="full", models=(1,), compile_cache_dir=None)
CHEAP_COMPILES = ModelSettings(config_size="full", models=(1,), compile_cache_dir=None,
                               compile_cost_s=0.01)


def _sets(lengths: list[int]) -> list[FeatureSet]:
    return [FeatureSet(name=f"t{i:02d}", target_id=f"t{i}", sequence="A" * length,
                       path=Path("/nonexistent"), msa_depth=100, num_templates=0)
            for i, length in enumerate(lengths)]


class FakeWorker(FoldWorkerHandle):
    """Folds instantly (or after `delay` seconds); `fail` lists what its next runs raise; a run
    holding `poison` kills it every time."""

    platform = "gpu"

    def __init__(self, name: str, delay: float = 0.0, fail: list[BaseException] | None = None,
                 poison: str = ""):
        self.name = name
        self.delay = delay
        self.fail = list(fail or [])
        self.poison = poison
        self.warm_error: BaseException | None = None
        self.runs: list[list[str]] = []
        self.restarts = self.releases = 0

    def fold(self, feature_sets: Any, out_root: Path) -> JobHandle[Any]:
        names = [fs.name for fs in feature_sets]
        future: cf.Future[Any] = cf.Future()
        if self.fail or self.poison in names:
            future.set_exception(self.fail.pop(0) if self.fail else RuntimeError("segfault"))
            return JobHandle(future)
        self.runs.append(names)
        result = FoldBatchResult(tuple(FoldOutcome(name=n, ok=True) for n in names), self.name,
                                 0.0, 0.0, {"compiles": len(self.runs)})
        if self.delay:
            threading.Timer(self.delay, future.set_result, (result,)).start()
        else:
            future.set_result(result)
        return JobHandle(future)

    def warm(self) -> JobHandle[Any]:
        future: cf.Future[Any] = cf.Future()
        if self.warm_error is not None:
            future.set_exception(self.warm_error)
        else:
            future.set_result(self.name)
        return JobHandle(future)

    def restart(self) -> None:
        self.restarts += 1

    def release(self) -> None:
        self.releases += 1


def _order(sets: list[FeatureSet]) -> list[str]:
    return [fs.name for fs in sorted(sets, key=lambda fs: (fs.length, fs.name))]


def test_each_device_takes_neighbouring_runs_and_an_idle_one_steals_the_last():
    sets = _sets([50 + 7 * i for i in range(40)])
    fast, slow = FakeWorker("gpu0"), FakeWorker("gpu1", delay=0.05)
    result = fold_on_devices(sets, Path("/out"), [fast, slow], CHEAP_COMPILES)
    assert [o.name for o in result.outcomes] == [fs.name for fs in sets]
    assert all(o.ok for o in result.outcomes)
    order = _order(sets)
    ran = [n for run in fast.runs + slow.runs for n in run]
    assert sorted(ran) == sorted(order)  # each target exactly once
    for run in fast.runs + slow.runs:  # every run is a stretch of the shape order
        start = order.index(run[0])
        assert order[start:start + len(run)] == run
    # the fast device did its own runs, then took the slow one's last runs
    own = [n for run in fast.runs[:4] for n in run]
    assert own == order[:len(own)] and slow.runs[0][0] == order[len(own)]  # neighbours
    assert len(fast.runs) > 4 and order[-1] in fast.runs[4]  # its 4 runs, then the last run
    assert set(result.stats) == {"gpu0", "gpu1"}


def test_no_run_is_taken_when_its_compiles_cost_more_than_the_work_queued_before_it():
    sets = _sets([50 + 7 * i for i in range(40)])  # ~19 s of modelled work, 27 s a compile
    fast, slow = FakeWorker("gpu0"), FakeWorker("gpu1", delay=0.02)
    fold_on_devices(sets, Path("/out"), [fast, slow], SETTINGS)
    assert len(fast.runs) == len(slow.runs) == 4


def test_a_dead_process_gives_its_run_to_another_device_and_dies_twice_to_retire():
    sets = _sets([50 + 11 * i for i in range(24)])
    flaky = FakeWorker("gpu0", fail=[RuntimeError("process died")])
    doomed = FakeWorker("gpu1", fail=[RuntimeError("lost device")] * 2)
    healthy = FakeWorker("gpu2")
    result = fold_on_devices(sets, Path("/out"), [flaky, doomed, healthy], SETTINGS)
    assert all(o.ok for o in result.outcomes), [o.error for o in result.outcomes if not o.ok]
    assert flaky.restarts == 1 and doomed.restarts == 1 and doomed.releases == 1
    assert not doomed.runs  # retired: its queue went to the others
    ran = [n for w in (flaky, healthy) for run in w.runs for n in run]
    assert sorted(ran) == sorted(fs.name for fs in sets)


def test_a_run_whose_device_died_goes_to_another_device_even_when_that_one_is_busy():
    """gpu0's device is lost (its process dies on every run): its restarted process must not
    take back the run it died on while gpu1, busy, can take it when free; so nothing fails,
    and gpu0 retires after its second death (on its own second run)."""
    sets = _sets([60, 61, 62, 200, 201, 202])
    lost = FakeWorker("gpu0", fail=[RuntimeError("CUDA error: device lost")] * 10)
    slow = FakeWorker("gpu1", delay=0.2)
    result = fold_on_devices(sets, Path("/out"), [lost, slow], SETTINGS, runs_per_device=1)
    assert all(o.ok for o in result.outcomes), [o.error for o in result.outcomes if not o.ok]
    assert sorted(n for run in slow.runs for n in run) == sorted(fs.name for fs in sets)


def test_a_run_that_kills_every_process_fails_its_targets_and_the_rest_go_on():
    sets = _sets([60, 61, 62, 200, 201, 202])
    a, b = FakeWorker("gpu0", poison="t04"), FakeWorker("gpu1", poison="t04")
    result = fold_on_devices(sets, Path("/out"), [a, b], SETTINGS, runs_per_device=1)
    by_name = {o.name: o for o in result.outcomes}
    failed = sorted(n for n, o in by_name.items() if not o.ok)
    assert "t04" in failed and len(failed) < len(sets) and by_name["t00"].ok
    assert all("its run failed 2 time(s): RuntimeError: segfault" in by_name[n].error
               for n in failed)
    assert a.restarts + b.restarts == 2 and not a.releases and not b.releases


def test_a_target_error_fails_the_run_without_restarting_its_device():
    sets = _sets([60, 61, 200, 201])
    a = FakeWorker("gpu0", fail=[FeatureError("t00: features.npz is truncated")])
    result = fold_on_devices(sets, Path("/out"), [a], SETTINGS, runs_per_device=2)
    assert a.restarts == 0
    failed = [o for o in result.outcomes if not o.ok]
    assert failed and all("truncated" in o.error for o in failed)
    assert any(o.ok for o in result.outcomes)


def test_every_device_dead_fails_what_is_left_with_the_reason():
    sets = _sets([60, 200])
    dead = [FakeWorker(f"gpu{i}", fail=[RuntimeError("no CUDA")] * 4) for i in range(2)]
    result = fold_on_devices(sets, Path("/out"), dead, SETTINGS)
    assert not any(o.ok for o in result.outcomes)
    assert all(w.releases == 1 for w in dead)


def test_a_device_that_cannot_start_is_left_out_and_bad_params_stop_the_run():
    from parafold.engine.devices import _started
    from parafold.errors import ParamsError, PipelineError

    good, broken = FakeWorker("gpu0"), FakeWorker("gpu1")
    broken.warm_error = RuntimeError("CUDA_ERROR_NO_DEVICE")
    assert _started([good, broken]) == [good] and broken.releases == 1
    with pytest.raises(PipelineError, match="no device could start.*CUDA_ERROR_NO_DEVICE"):
        _started([broken])
    good.warm_error = ParamsError("params_model_1_ptm.npz: not a zip file")
    with pytest.raises(ParamsError, match="not a zip"):
        _started([good, FakeWorker("gpu2")])


def test_predict_on_two_fold_processes_each_compiles_only_its_shapes(tmp_path, tmp_path_factory):
    """Two real fold processes (GPU ids given; this machine has none, so jax runs them on the
    CPU): every target folded once into one OUT, each process compiling one of the two shapes."""
    from parafold.fold.synthetic import make_features

    runner = CliRunner()
    res = runner.invoke(app, ["params", "random", str(tmp_path / "w"), "--preset", "tiny",
                              "--models", "3"])
    assert res.exit_code == 0, res.output
    # 20 and 44 residues: two length buckets whose device work is within 2x, so the cut by
    # work into two equal halves falls between them
    for i, seq in enumerate(["MKTAYIAKQRQISFVKSHFS", "MKTAYIAKQRQISFVKSHFA",
                             "MKTAYIAKQRQISFVKSHFSRQ" * 2, "MKTAYIAKQRQISFVKSHFARQ" * 2]):
        write_feature_set(tmp_path / "feats" / f"p{i}", name=f"p{i}", target_id=f"p{i}",
                          features=make_features(seq, 12), write_pickle=i == 3)
    for ours in ("features.json", "features.npz"):  # AlphaFold's features.pkl only
        (tmp_path / "feats" / "p3" / ours).unlink()
    res = runner.invoke(app, [
        "predict", str(tmp_path / "feats"), "-o", str(tmp_path / "out"), "--params-dir",
        str(tmp_path / "w"), "--models", "3", "--num-recycle", "0", "--float32",
        "--compile-cache", str(tmp_path_factory.getbasetemp() / "jax-cache"), "--gpus", "0,1",
        "--trust-pickles",  # reaches the fold processes too
        "--host-workers", "1"])  # helper processes, as on a GPU: each fold process must exit
    assert res.exit_code == 0, res.output
    assert "4/4 targets ok" in res.output
    compiles = {line.split(")")[0]: line for line in res.output.splitlines()
                if line.startswith("stats (")}
    assert set(compiles) == {"stats (gpu0", "stats (gpu1"}, res.output
    assert all("'compiles': 1," in line for line in compiles.values()), res.output
    for i in range(4):
        assert (tmp_path / "out" / f"p{i}" / "ranked_0.pdb").is_file()


@pytest.mark.parametrize("gpus", ["0,0", "1,,1"])
def test_predict_refuses_a_device_named_twice(tmp_path, gpus):
    res = CliRunner().invoke(app, ["predict", str(tmp_path), "-o", str(tmp_path / "o"),
                                   "--params-dir", str(tmp_path), "--gpus", gpus])
    assert res.exit_code == 2 and "named twice" in res.output


def test_a_full_disk_on_one_device_starts_no_run_more_on_any() -> None:
    """A run whose files met a full disk: the runs still queued on every device are not
    started (each would spend its GPU time and fail writing); their targets come back as
    stopped by the disk, not failed, so `predict` exits 75 and a rerun does them."""

    class FullDisk(FakeWorker):
        def fold(self, feature_sets: Any, out_root: Path) -> JobHandle[Any]:
            self.runs.append([fs.name for fs in feature_sets])
            future: cf.Future[Any] = cf.Future()
            future.set_result(FoldBatchResult(tuple(
                FoldOutcome(name=fs.name, ok=False, stopped_early=True,
                            error="writing outputs failed: [Errno 28] No space left on device")
                for fs in feature_sets), self.name, 0.0, 0.0))
            return JobHandle(future)

    sets = _sets([60 + 40 * (i % 8) for i in range(32)])
    full, slow = FullDisk("gpu0"), FakeWorker("gpu1", delay=0.3)
    result = fold_on_devices(sets, Path("/out"), [full, slow], SETTINGS)
    assert len(full.runs) == 1 and len(slow.runs) == 1  # the runs in flight, no more
    by_name = {o.name: o for o in result.outcomes}
    ran = {n for run in full.runs + slow.runs for n in run}
    stopped = [o for o in result.outcomes if o.name not in ran]
    assert stopped and all(o.stopped_early and "not predicted" in (o.error or "")
                           for o in stopped), stopped
    assert all(by_name[n].ok for n in slow.runs[0])


def test_a_drain_starts_no_run_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR1 reached `predict` (its fold processes never see it): the runs under way
    finish, no device starts another, and the targets left say they were stopped early."""
    from parafold import lifecycle

    monkeypatch.setattr(lifecycle, "_drain", ["SIGUSR1: asked to drain"])
    sets = _sets([60 + 40 * (i % 8) for i in range(32)])
    workers = [FakeWorker("gpu0"), FakeWorker("gpu1")]
    result = fold_on_devices(sets, Path("/out"), workers, SETTINGS)
    assert [len(w.runs) for w in workers] == [1, 1]
    ran = {n for w in workers for run in w.runs for n in run}
    left = [o for o in result.outcomes if o.name not in ran]
    assert left and all(o.stopped_early and "not predicted: SIGUSR1" in (o.error or "")
                        for o in left), left
    assert all(o.ok for o in result.outcomes if o.name in ran)
