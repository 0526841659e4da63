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
