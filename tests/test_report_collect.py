"""Run statistics in the report: a batch's shared event must not count its GPU time twice."""

from __future__ import annotations

from pathlib import Path

from parafold.inputs import Target
from parafold.ledger import Ledger
from parafold.report.collect import COLUMNS, _union_seconds, collect_run


def test_union_of_overlapping_intervals() -> None:
    assert _union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == 4.0
    assert _union_seconds([(0.0, 2.0), (0.0, 2.0), (0.5, 1.0)]) == 2.0
    assert _union_seconds([]) == 0.0


def test_batched_predict_events_give_busy_at_most_one(tmp_path: Path) -> None:
    targets = [Target(f"t{i}", f"t{i}", "MKTAYIAKQR") for i in range(4)]
    with Ledger(tmp_path) as ledger:
        run_id = ledger.begin_run({})
        ledger.register(targets)
        for t in targets:
            ledger.start_search(t.name)
            ledger.add_event(run_id=run_id, worker="cpu-0", kind="search", target=t.name,
                             start=100.0, end=101.0, ok=True)
            ledger.features_ready(t.name, {})
        ledger.start_predict([t.name for t in targets])
        for t in targets:  # one batch of four: the same span for every member
            ledger.add_event(run_id=run_id, worker="gpu-0", kind="predict", target=t.name,
                             start=101.0, end=109.0, ok=True, batch=1)
            ledger.done(t.name, {"predict_model_1": 2.0})
        ledger.end_run(run_id, 0)
    data = collect_run(tmp_path)
    busy = data["summary"]["gpu_busy"]
    assert busy is not None and 0.0 < busy <= 1.0
    predict_col = COLUMNS.index("predict_s")
    # each member's own share from the GPU stage, not the batch's whole 8 s span
    assert [row[predict_col] for row in data["rows"]] == [2.0] * 4


def test_retired_fold_workers_are_in_the_summary(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        run_id = ledger.begin_run({})
        ledger.register([Target("t0", "t0", "MKTAYIAKQR")])
        ledger.add_worker_event(run_id=run_id, worker="gpu1", kind="retired",
                                reason="failed to start: RuntimeError: no device")
        ledger.end_run(run_id, 0)
    summary = collect_run(tmp_path)["summary"]
    assert summary["workers_retired"] == [["gpu1", "failed to start: RuntimeError: no device"]]


def test_wall_time_sums_each_runs_own_span_across_a_resume(tmp_path: Path) -> None:
    """Killed after 1 h (never ended), resumed 23 h later for another hour: the summary counts
    the 2 h the runs ran, not the day between, as `parafold status` does."""
    names = [f"t{i}" for i in range(20)]
    with Ledger(tmp_path) as ledger:
        for start, batch in ((1000.0, names[:10]), (1000.0 + 24 * 3600, names[10:])):
            run_id = ledger.begin_run({})
            ledger.register([Target(n, n, "MKTAYIAKQR") for n in names], run_id=run_id)
            for j, name in enumerate(batch):  # one GPU busy the whole hour
                ledger.start_search(name)
                ledger.features_ready(name, {})
                ledger.start_predict([name])
                ledger.add_event(run_id=run_id, worker="gpu-0", kind="predict", target=name,
                                 start=start + j * 360, end=start + (j + 1) * 360, ok=True)
                ledger.done(name, {})
        ledger.end_run(run_id, 0)  # the second run only: the first was SIGKILLed
    summary = collect_run(tmp_path)["summary"]
    assert summary["wall_s"] == 7200.0
    assert summary["proteins_per_hour"] == 10.0 and summary["gpu_busy"] == 1.0
