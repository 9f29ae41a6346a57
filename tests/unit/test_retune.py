"""Settings changed in a live run (PBT's mutation, an edited job): the engine's `retune`, and a run restored
from a checkpoint under a job whose scaler settings differ."""

import pytest
import torch
import torch.nn.functional as F

from ampray.actors.checkpoint import save_checkpoint
from ampray.actors.worker import _restore_from, live_setting_changes
from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.data.parquet import ShardedBatches
from ampray.job import JobConfig
from tests.unit.helpers import GradPoison, batches, tiny_mlp


def fp16_engine(**kw) -> MixedPrecisionTrainer:
    return MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp16", **kw), device="cpu")


def run(engine, model, opt, data):
    for x, y in data:
        engine.train_step(model, opt, F.cross_entropy, x, y)


def test_retune_keeps_scale_and_growth_tracker_and_records_the_change():
    engine, model = fp16_engine(init_scale=1024.0, growth_interval=100), tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run(engine, model, opt, batches(7))
    before = engine.scaler.read()
    assert before.growth_tracker == 7
    diff = engine.retune({"growth_interval": 10, "backoff_factor": 0.25, "adaptation": {"window": 7}},
                         reason="test")
    assert diff == {"growth_interval": (100, 10), "backoff_factor": (0.5, 0.25), "adaptation.window": (100, 7)}
    after = engine.scaler.read()
    assert (after.scale, after.growth_tracker) == (before.scale, before.growth_tracker)
    assert engine.config.growth_interval == 10 and engine.config.adaptation.window == 7
    assert engine.events[-1] == {"kind": "retune", "optimizer_step": 7, "reason": "test",
                                 "changes": {"growth_interval": [100, 10], "backoff_factor": [0.5, 0.25],
                                             "adaptation.window": [100, 7]}}
    run(engine, model, opt, batches(3, seed=5))  # 10 clean steps in all: the new interval grows now
    assert engine.scaler.read().scale == 2048.0
    # The new backoff applies at the next overflow.
    poison = GradPoison(next(model.parameters()), always=True)
    run(engine, model, opt, batches(1, seed=6))
    poison.remove()
    assert engine.scaler.read().scale == 512.0


def test_retune_refuses_what_a_live_run_cannot_change_and_bad_values():
    engine = fp16_engine()
    with pytest.raises(ConfigError, match=r"\['dtype', 'init_scale'\] cannot change in a live run"):
        engine.retune({"dtype": "bf16", "init_scale": 2.0})
    with pytest.raises(ConfigError, match="backoff_factor"):
        engine.retune({"backoff_factor": 1.5})
    with pytest.raises(ConfigError, match="overflow_rate_high"):
        engine.retune({"adaptation": {"overflow_rate_high": 2.0}})
    assert engine.retune({"growth_interval": engine.config.growth_interval}) == {}
    assert engine.events == []


def test_restore_under_changed_job_applies_only_the_changed_settings(tmp_path):
    """A checkpoint written with growth_interval=100 is restored by a job that asks for 10 (a PBT clone):
    the scale and growth tracker come from the checkpoint, the new interval from the job; a setting the
    run had adapted and the job did not change keeps its adapted value."""
    job_a = JobConfig.load(None, {"precision.dtype": "fp16", "precision.init_scale": 1024.0,
                                  "precision.growth_interval": 100})
    engine, model = MixedPrecisionTrainer(job_a.precision, device="cpu"), tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x_all, y_all = torch.randn(64, 8), torch.randint(0, 4, (64,))
    data = ShardedBatches(x_all, y_all, 8, 0, 1, 0)
    for _ in range(5):
        engine.train_step(model, opt, F.cross_entropy, *data.next_batch())
    engine.update_scaler_settings(growth_factor=1.5)  # as adaptation would
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=None, engine=engine, step=5,
                    data_state=data.state_dict(), job=job_a.to_dict())
    saved = engine.scaler.read()

    job_b = JobConfig.load(None, {"precision.dtype": "fp16", "precision.init_scale": 1024.0,
                                  "precision.growth_interval": 10})
    assert live_setting_changes(job_a.to_dict()["precision"], job_b.to_dict()["precision"]) == {"growth_interval": 10}
    fresh, model2 = fp16_engine(), tiny_mlp(seed=3)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    data2 = ShardedBatches(x_all, y_all, 8, 0, 1, 0)
    step = _restore_from(tmp_path, 0, job_b, model=model2, optimizer=opt2, scheduler=None,
                         engine=fresh, batches=data2)
    assert step == 5 and data2.state_dict() == data.state_dict()
    got = fresh.scaler.read()
    assert (got.scale, got.growth_tracker) == (saved.scale, saved.growth_tracker) == (1024.0, 5)
    assert fresh.scaler.growth_interval == 10 and fresh.scaler.growth_factor == 1.5
    assert fresh.events[-1]["changes"] == {"growth_interval": [100, 10]}
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_the_live_settings_are_defined_once_and_asked_everywhere():
    from ampray.amp import settings
    from ampray.orchestrator.preflight import _may_change

    assert settings.is_live("precision.growth_factor") and settings.is_live("adaptation.window")
    assert not settings.is_live("precision.init_scale") and not settings.is_live("adaptation.nope")
    assert _may_change("precision.hysteresis") and not _may_change("precision.dtype")
    with pytest.raises(ConfigError, match=r"adaptation.nope.*adaptation\.\{window"):
        MixedPrecisionTrainer(MixedPrecisionConfig(), "cpu").retune({"adaptation": {"nope": 1}})
