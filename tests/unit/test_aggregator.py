"""TensorBoardAggregator on fabricated per-rank reports: no Ray cluster, files read back with TensorBoard."""

import logging
import math
import pickle

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("ray")

from ampray.actors.aggregator import (  # noqa: E402
    TensorBoardAggregator,
    aggregate,
    read_hparams,
    read_scalars,
    read_text,
)

HPARAMS = {"model": "mlp", "lr": 0.001, "batch_size": 32, "bf16": False}


def report(step, rank, world_size=2, scale=65536.0, final=False, **extra):
    m = {
        "step": step, "rank": rank, "world_size": world_size, "final": final,
        "loss": 1.0 + rank, "scaler/scale": scale, "scaler/growth_tracker": step,
        "scaler/overflows": rank, "perf/skipped_steps": rank + 1, "perf/samples_per_s": 100.0 * (rank + 1),
        "memory/allocated_bytes": 100 * (rank + 1), "memory/peak_allocated_bytes": 1000 * (rank + 1),
        "memory/peak_rss_bytes": 5 << 20, "memory/device": "cpu",
    }
    m.update(extra)
    return m


def reports(step, scales=(65536.0, 65536.0), final=False):
    rounds = [report(step, r, len(scales), s, final) for r, s in enumerate(scales)]
    if final:
        rounds[0]["hparams"] = HPARAMS
    return rounds


def test_aggregate_cross_rank_stats():
    agg = aggregate(reports(10, scales=(65536.0, 32768.0)))
    assert agg["loss/min"] == 1.0 and agg["loss/max"] == 2.0 and agg["loss/mean"] == 1.5
    assert agg["scaler/scale/min"] == 32768.0 and agg["scaler/scale/max"] == 65536.0
    assert agg["scaler/scale_disagreement"] == 1.0
    assert agg["perf/skipped_steps/total"] == 3.0
    assert agg["perf/samples_per_s/total"] == 300.0
    assert agg["memory/peak_allocated_bytes/max"] == 2000.0
    # Bookkeeping, flags and strings are not measurements.
    assert not any(k.split("/")[0] in {"step", "rank", "world_size", "final"} for k in agg)
    assert not any(k.startswith("memory/device") for k in agg)
    assert aggregate(reports(10))["scaler/scale_disagreement"] == 0.0


def test_aggregate_only_keys_on_every_rank_and_nan_propagates():
    a, b = reports(5)
    b.pop("scaler/overflows")
    a["loss"] = math.nan
    agg = aggregate([a, b])
    assert "scaler/overflows/mean" not in agg
    assert all(math.isnan(agg[f"loss/{s}"]) for s in ("min", "max", "mean"))
    assert aggregate([]) == {}


def test_event_files_hold_every_rank_and_the_aggregates(tmp_path):
    cb = TensorBoardAggregator(str(tmp_path))
    for step in (10, 20, 30):
        cb.after_report(None, reports(step), None)
    scalars = read_scalars(str(tmp_path))
    for rank in (0, 1):
        for key in ("scaler/scale", "scaler/overflows", "memory/allocated_bytes", "memory/peak_rss_bytes"):
            assert [s for s, _ in scalars[f"rank{rank}/{key}"]] == [10, 20, 30]
    assert "rank0/memory/device" not in scalars and "rank0/step" not in scalars
    assert scalars["all/perf/samples_per_s/total"][-1] == (30, 300.0)
    assert scalars["all/memory/peak_allocated_bytes/max"][-1] == (30, 2000.0)
    assert cb.last_aggregate["loss/mean"] == 1.5


def test_each_report_is_filed_under_the_rank_it_names(tmp_path):
    cb = TensorBoardAggregator(str(tmp_path))
    cb.after_report(None, list(reversed(reports(10))), None)
    scalars = read_scalars(str(tmp_path))
    assert scalars["rank0/loss"] == [(10, 1.0)] and scalars["rank1/loss"] == [(10, 2.0)]


def test_disagreement_counter_and_warning(tmp_path, caplog):
    cb = TensorBoardAggregator(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ampray.actors.aggregator"):
        cb.after_report(None, reports(1), None)
        cb.after_report(None, reports(2, scales=(65536.0, 32768.0)), None)
        cb.after_report(None, reports(3, scales=(16.0, 8.0)), None)
    counts = read_scalars(str(tmp_path))["all/scaler/scale_disagreements"]
    assert counts == [(1, 0.0), (2, 1.0), (3, 2.0)]
    warnings = [r.getMessage() for r in caplog.records if "disagree" in r.getMessage()]
    assert len(warnings) == 2
    assert "step 2" in warnings[0] and "65536.0" in warnings[0] and "32768.0" in warnings[0]


def test_rerun_never_writes_a_step_twice(tmp_path):
    first = TensorBoardAggregator(str(tmp_path))
    for step in (10, 20, 30):
        first.after_report(None, reports(step, scales=(8.0, 4.0)), None)
    # A killed driver is rerun: a new callback, workers restored from the step-20 checkpoint.
    second = TensorBoardAggregator(str(tmp_path))
    for step in (20, 30, 40, 50):
        second.after_report(None, reports(step, scales=(8.0, 4.0)), None)
    # Within one controller, a worker restart re-reports old steps too.
    for step in (40, 60):
        second.after_report(None, reports(step), None)
    scalars = read_scalars(str(tmp_path))
    for tag, points in scalars.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), tag
    assert [s for s, _ in scalars["all/loss/mean"]] == [10, 20, 30, 40, 50, 60]
    assert [s for s, _ in scalars["rank1/loss"]] == [10, 20, 30, 40, 50, 60]
    # The counter carries over from the first driver instead of restarting at zero.
    assert [v for _, v in scalars["all/scaler/scale_disagreements"]] == [1, 2, 3, 4, 5, 5]


def test_final_report_writes_summary_and_hparams(tmp_path):
    cb = TensorBoardAggregator(str(tmp_path), flush_every=100)
    cb.after_report(None, reports(10), None)
    cb.after_report(None, reports(20, final=True), None)
    (table,) = read_text(str(tmp_path), "summary")
    assert "| rank |" in table and table.count("\n") == 3  # header, rule, two ranks
    assert "| 1 | 2 | 65536 | 2 |" in table
    hp = read_hparams(str(tmp_path))
    assert hp["model"] == "mlp" and hp["lr"] == pytest.approx(0.001) and hp["batch_size"] == 32


def test_pickles_before_and_after_use(tmp_path):
    cb = TensorBoardAggregator(str(tmp_path))
    clone = pickle.loads(pickle.dumps(cb))
    clone.after_report(None, reports(1), None)
    again = pickle.loads(pickle.dumps(clone))
    again.after_report(None, reports(1), None)  # remembers step 1 without rescanning
    again.after_report(None, reports(2), None)
    assert [s for s, _ in read_scalars(str(tmp_path))["all/loss/mean"]] == [1, 2]


def test_after_exception_logs_ranks_and_types(tmp_path, caplog):
    cb = TensorBoardAggregator(str(tmp_path))
    cb.after_report(None, reports(1), None)
    with caplog.at_level(logging.WARNING, logger="ampray.actors.aggregator"):
        cb.after_exception(None, {1: RuntimeError("boom"), 0: MemoryError()})
    assert "rank 0: MemoryError, rank 1: RuntimeError" in caplog.text


def test_rejects_bad_flush_every(tmp_path):
    with pytest.raises(ValueError, match="flush_every=0"):
        TensorBoardAggregator(str(tmp_path), flush_every=0)
