"""Runs that make no progress fail loudly: the stall policy (skipped optimizer steps in a row, at any scale),
the bf16 fallback that gives up, state loads that check everything before changing anything, scale
settings beyond float32, and the remedy a rollback applies."""

import math

import pytest
import torch
import torch.nn.functional as F

from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.trainer import EngineStateError, MixedPrecisionTrainer, TrainingStalledError
from ampray.job import JobConfig
from tests.unit.helpers import GradPoison, batches, tiny_mlp


def engine(**kw) -> MixedPrecisionTrainer:
    return MixedPrecisionTrainer(MixedPrecisionConfig(**kw), device="cpu")


def nan_loss(output, target):
    return F.cross_entropy(output, target) * math.nan


def run(eng, model, opt, data, criterion=F.cross_entropy):
    """One train_step per batch of `data` (an engine error propagates)."""
    for x, y in data:
        eng.train_step(model, opt, criterion, x, y)


def test_all_nan_loss_stalls_and_raises_at_exactly_stall_patience():
    model, eng = tiny_mlp(), engine(stall_patience=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(20)
    for i in range(4):
        assert bool(eng.train_step(model, opt, nan_loss, *data[i]).skipped)
    with pytest.raises(TrainingStalledError) as err:
        eng.train_step(model, opt, nan_loss, *data[4])
    msg = str(err.value)
    assert "5 optimizer steps in a row were skipped (optimizer steps 1 to 5" in msg
    assert "the loss was not finite in every one of them" in msg
    assert "loss scale 4096" in msg  # 2**16 backed off four times, the fifth step's own backoff not yet seen
    assert "stall_patience=5" in msg
    assert isinstance(err.value, FloatingPointError)
    assert eng.counters.optimizer_steps == 5 and eng.counters.skipped_steps == 5
    event = eng.events[-1]
    assert event["kind"] == "stall" and event["action"] == "raise" and event["optimizer_step"] == 5
    assert event["skipped_in_a_row"] == 5 and event["nonfinite_loss_steps"] == 5


def test_overflow_stall_names_the_reason_and_the_offending_parameter():
    # Overflows far above the floor never collapse, but they stall: every step is skipped.
    model, eng = tiny_mlp(), engine(init_scale=2.0**10, min_scale=1.0, backoff_factor=0.99, stall_patience=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = GradPoison(model[0].bias, always=True)
    with pytest.raises(TrainingStalledError) as err:
        run(eng, model, opt, batches(10))
    poison.remove()
    msg = str(err.value)
    assert "the gradients overflowed (inf/NaN) in every one of them" in msg
    assert "offending parameters: ['0.bias']" in msg
    assert eng.counters.optimizer_steps == 6


def test_a_clean_step_resets_the_stall_count():
    model, eng = tiny_mlp(), engine(stall_patience=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = iter(batches(30))
    pattern = [nan_loss] * 4 + [F.cross_entropy] + [nan_loss] * 4 + [F.cross_entropy]
    for criterion in pattern:  # never 5 in a row: no stall however long it runs
        eng.train_step(model, opt, criterion, *next(data))
    assert eng.counters.skipped_steps == 8 and eng.counters.skipped_in_a_row == 0
    with pytest.raises(TrainingStalledError, match="optimizer steps 11 to 15"):
        for _ in range(5):
            eng.train_step(model, opt, nan_loss, *next(data))


def test_a_dropped_or_unchecked_window_is_no_stall():
    # nonfinite_loss_policy="ignore" never skips a step: nothing to count.
    model, eng = tiny_mlp(), engine(dtype="fp32", nonfinite_loss_policy="ignore", stall_patience=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    run(eng, model, opt, batches(5), nan_loss)
    assert eng.counters.skipped_in_a_row == 0 and not eng.events


def test_stall_falls_back_to_bf16_once_then_gives_up():
    model, eng = tiny_mlp(), engine(stall_patience=3, stall_policy="fallback_bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = iter(batches(20))
    for _ in range(3):
        eng.train_step(model, opt, nan_loss, *next(data))
    assert eng.events[-1]["kind"] == "stall" and eng.events[-1]["action"] == "fallback_bf16"
    assert eng.fell_back and eng.counters.skipped_in_a_row == 0
    eng.train_step(model, opt, nan_loss, *next(data))  # the fallback applies at the next window
    assert eng.amp_dtype == torch.bfloat16 and not eng.scaler.enabled
    eng.train_step(model, opt, nan_loss, *next(data))
    with pytest.raises(TrainingStalledError) as err:  # three skipped bf16 steps: bf16 fails too
        eng.train_step(model, opt, nan_loss, *next(data))
    msg = str(err.value)
    assert "optimizer steps 4 to 6" in msg and "dtype bfloat16" in msg and "loss scale none (unscaled)" in msg
    assert "already fell back to bf16, and bf16 fails too: the model diverged" in msg
    assert [e["action"] for e in eng.events] == ["fallback_bf16", "raise"]


def test_collapse_fallback_then_a_bf16_stall_gives_up():
    model = tiny_mlp()
    eng = engine(init_scale=1.0, min_scale=1.0, collapse_patience=2, collapse_policy="fallback_bf16",
                 stall_patience=4, stall_policy="fallback_bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = GradPoison(model[0].bias, always=True)
    with pytest.raises(TrainingStalledError, match="already fell back to bf16"):
        run(eng, model, opt, batches(20))
    poison.remove()
    assert [(e["kind"], e["action"]) for e in eng.events] == [("scale_collapse", "fallback_bf16"),
                                                              ("stall", "raise")]
    # 2 steps to the collapse, then 4 bf16 steps skipped (the poison makes bf16 gradients inf too)
    assert eng.counters.optimizer_steps == 6


def test_resume_mid_count_continues_the_count(tmp_path):
    data = batches(12)
    model, eng = tiny_mlp(), engine(stall_patience=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data[:3]:
        eng.train_step(model, opt, nan_loss, x, y)
    eng.save_scaler_state(tmp_path / "engine.pt")
    resumed = engine(stall_patience=5)
    resumed.load_scaler_state(tmp_path / "engine.pt")
    assert resumed.counters.skipped_in_a_row == 3 and resumed.counters.nonfinite_in_a_row == 3
    messages = []
    for e in (resumed, eng):  # skipped steps change no weight: both see the same model
        e.train_step(model, opt, nan_loss, *data[3])
        with pytest.raises(TrainingStalledError) as err:
            e.train_step(model, opt, nan_loss, *data[4])
        messages.append(str(err.value))
    assert "optimizer steps 1 to 5" in messages[0]
    assert messages[0] == messages[1]  # the resumed engine stalls where the uninterrupted one does


def test_the_fallback_survives_a_resume():
    model, eng = tiny_mlp(), engine(stall_patience=2, stall_policy="fallback_bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run(eng, model, opt, batches(3), nan_loss)
    resumed = engine(stall_patience=2, stall_policy="fallback_bf16")
    resumed.load_state_dict(eng.state_dict())
    assert resumed.fell_back and resumed.amp_dtype == torch.bfloat16
    with pytest.raises(TrainingStalledError, match="already fell back"):
        run(resumed, model, opt, batches(3), nan_loss)


# -- loading state: checked first, nothing changed on failure -------------------------------------------
def _trained(**kw):
    model, eng = tiny_mlp(), engine(init_scale=8.0, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run(eng, model, opt, batches(3))
    return eng


def _fingerprint(eng):
    return (eng.scaler.read(), eng.counters.read()["optimizer_steps"], eng.config.to_dict(), list(eng.events),
            eng.last_scale, eng.amp_dtype, eng.scaler.settings())


@pytest.mark.parametrize("field,value,expected", [
    ("scale", math.nan, "engine state scaler.scale=nan is not allowed: expected a finite number"),
    ("scale", -4.0, "engine state scaler.scale=-4.0 is not allowed: expected a number in (0, 3.4028235e+38]"),
    ("scale", 0.0, "engine state scaler.scale=0.0 is not allowed"),
    ("scale", 2.0**30, "engine state scaler.scale=1073741824.0 is not allowed: expected min_scale=1 <= scale <= "
                       "max_scale=1.67772e+07"),
    ("scale", 1e39, "engine state scaler.scale=1e+39 is not allowed: expected a number in (0, 3.4028235e+38]"),
    ("growth_tracker", -1, "engine state scaler.growth_tracker=-1 is not allowed: expected an integer >= 0"),
    ("max_scale", math.inf, "engine state scaler.max_scale=inf is not allowed: expected a finite number"),
    ("dynamic", "yes", "engine state scaler.dynamic='yes' is not allowed: expected a boolean"),
])
def test_a_bad_scaler_state_is_refused_and_changes_nothing(field, value, expected):
    source, target = _trained(), _trained(growth_interval=7)
    state = source.state_dict()
    state["scaler"][field] = value
    before = _fingerprint(target)
    with pytest.raises(EngineStateError) as err:
        target.load_state_dict(state)
    assert expected in str(err.value)
    assert _fingerprint(target) == before


def test_a_state_missing_a_field_is_refused_before_the_scale_changes(tmp_path):
    # The reported failure: KeyError: 'counters' after the scale had already become the file's.
    source = _trained()
    state = source.state_dict()
    state["scaler"]["scale"] = 8.0
    del state["counters"]
    torch.save(state, tmp_path / "partial.pt")
    target = engine(init_scale=2.0**10)
    before = _fingerprint(target)
    with pytest.raises(EngineStateError, match=r"required field\(s\) \['counters'\] missing"):
        target.load_scaler_state(tmp_path / "partial.pt")
    assert _fingerprint(target) == before and target.scaler.read().scale == 2.0**10


@pytest.mark.parametrize("where,key,value,expected", [
    ("counters", "loss_count", -3, "engine state counters.loss_count=-3 is not allowed: expected an integer >= 0"),
    ("counters", "host_time_s", "soon", "engine state counters.host_time_s='soon' is not allowed"),
    ("counters", "loss_sum", None, "counters: the required field 'loss_sum' is missing"),
    ("", "last_scale", math.nan, "engine state.last_scale=nan is not allowed"),
    ("", "amp_dtype", "fp8", "engine state.amp_dtype='fp8' is not allowed"),
])
def test_other_bad_fields_are_named(where, key, value, expected):
    state = _trained().state_dict()
    part = state[where] if where else state
    if value is None:
        del part[key]
    else:
        part[key] = value
    target = _trained(growth_interval=9)
    before = _fingerprint(target)
    with pytest.raises(EngineStateError) as err:
        target.load_state_dict(state)
    assert expected in str(err.value)
    assert _fingerprint(target) == before


def test_a_bad_config_in_a_state_is_refused():
    state = _trained().state_dict()
    state["config"]["max_scale"] = 1e39
    target = _trained()
    before = _fingerprint(target)
    with pytest.raises(EngineStateError, match=r"MixedPrecisionConfig.max_scale=1e\+39 is not allowed"):
        target.load_state_dict(state)
    assert _fingerprint(target) == before


def test_a_bad_adaptation_state_changes_nothing_either():
    model = tiny_mlp()
    source = AdaptiveMixedPrecisionTrainer(MixedPrecisionConfig(init_scale=8.0), device="cpu")
    run(source, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3))
    state = source.state_dict()
    del state["adaptation"]["history"]
    target = AdaptiveMixedPrecisionTrainer(MixedPrecisionConfig(init_scale=64.0), device="cpu")
    before = _fingerprint(target)
    with pytest.raises(EngineStateError, match="adaptation.history=None is not allowed: expected a list"):
        target.load_state_dict(state)
    assert _fingerprint(target) == before


def test_a_good_state_still_round_trips_and_a_legacy_one_without_the_new_counters_loads():
    source = _trained()
    state = source.state_dict()
    for name in ("skipped_in_a_row", "nonfinite_in_a_row"):
        del state["counters"][name]  # written before the stall policy existed
    del state["fell_back"]
    target = engine()
    target.load_state_dict(state)
    assert target.scaler.read() == source.scaler.read() and target.counters.skipped_in_a_row == 0
    assert not target.fell_back


def test_a_lowered_ceiling_applies_to_the_current_scale_so_saved_states_stay_loadable():
    eng = _trained()
    eng.retune({"max_scale": 2.0})
    assert eng.scaler.read().scale == 2.0
    engine().load_state_dict(eng.state_dict())


# -- scale settings beyond float32 -------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("max_scale", 1e39), ("init_scale", 1e39), ("min_scale", math.nan),
                                         ("max_scale", math.inf), ("min_scale", -1.0)])
def test_config_refuses_scales_beyond_float32(field, value):
    kw = {field: value}
    if field == "init_scale":
        kw["max_scale"] = 3e38
    with pytest.raises(ConfigError) as err:
        MixedPrecisionConfig(**kw)
    msg = str(err.value)
    assert msg.startswith(f"MixedPrecisionConfig.{field}=")
    assert any(rule in msg for rule in ("float32's finite range", "a finite number", "a number > 0"))


def test_the_largest_float32_is_allowed_and_the_job_names_the_precision_field():
    assert MixedPrecisionConfig(max_scale=float(torch.finfo(torch.float32).max)).max_scale > 3.4e38
    with pytest.raises(ConfigError, match=r"precision.max_scale=1e\+39 is not allowed: expected a number in "
                                          r"\(0, 3.4028235e\+38\] \(float32's finite range\)"):
        JobConfig.load(None, {"precision.max_scale": 1e39})


@pytest.mark.parametrize("overrides,expected", [
    ({"precision.stall_patience": 0}, "precision.stall_patience=0 is not allowed: expected an integer >= 1"),
    ({"precision.stall_policy": "skip"}, "precision.stall_policy='skip' is not allowed: expected one of "
                                         "['raise', 'fallback_bf16']"),
    ({"run.on_divergence": "retry"}, "run.on_divergence='retry' is not allowed: expected one of ['stop', "
                                     "'rollback']"),
    ({"run.max_rollbacks": -1}, "run.max_rollbacks=-1 is not allowed: expected an integer >= 0"),
    ({"run.max_rollbacks": "two"}, "run.max_rollbacks='two' is not allowed: expected an integer"),
])
def test_the_job_refuses_bad_values_of_the_new_fields(overrides, expected):
    with pytest.raises(ConfigError) as err:
        JobConfig.load(None, overrides)
    assert expected in str(err.value)


# -- the remedy of a rollback --------------------------------------------------------------------------
def test_ease_after_rollback_switches_fp16_to_bf16_at_once():
    eng = _trained()
    assert eng.ease_after_rollback() == "fp16 -> bf16 without loss scaling"
    assert eng.amp_dtype == torch.bfloat16 and not eng.scaler.enabled and eng.fell_back and not eng.fallback_due


def test_ease_after_rollback_makes_bf16_scaling_gentler():
    eng = _trained(dtype="bf16", bf16_grad_scaling=True, growth_interval=10, hysteresis=2)
    scale = eng.last_scale
    text = eng.ease_after_rollback()
    assert text == (f"gentler loss scaling: scale {scale:g} -> {max(1.0, scale / 16):g}, growth_interval 10 -> 20, "
                    "hysteresis 2 -> 3")
    assert eng.scaler.read().scale == max(1.0, scale / 16) and eng.scaler.read().growth_tracker == 0
    assert eng.config.growth_interval == 20 and eng.events[-1]["kind"] == "retune"
    assert eng.ease_after_rollback().startswith("gentler loss scaling")  # a second rollback eases again


def test_ease_after_rollback_of_an_unscaled_run_only_skips_data():
    eng = _trained(dtype="bf16")
    assert eng.ease_after_rollback() == "none (bfloat16 without loss scaling: only the batches are skipped)"


# -- under DDP: a NaN loss on one rank stalls both, at the same step ----------------------------------
def _stall_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import json
    import os
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    model = torch.nn.parallel.DistributedDataParallel(tiny_mlp())
    eng = engine(stall_patience=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nan_loss if rank == 1 else F.cross_entropy
    result = {"error": None}
    try:
        run(eng, model, opt, batches(10, seed=rank + 1), criterion)
    except TrainingStalledError as err:
        result = {"error": str(err), "steps": eng.counters.optimizer_steps}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_stalls_every_rank_at_the_same_step(tmp_path):
    import json

    from tests.unit.helpers import spawn_ranks
    from tests.unit.helpers import free_port

    port = free_port()
    codes, hung = spawn_ranks(_stall_rank, lambda r: (r, 2, port, str(tmp_path)), 2, 120)
    assert not hung and codes == [0, 0], (codes, hung)
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert a["steps"] == b["steps"] == 3
    assert "the loss was not finite in every one of them" in b["error"]
    # The clean rank saw the other's NaN as non-finite gradients (DDP's all-reduce carried it), and says so.
    assert ("the gradients overflowed (inf/NaN) in every one of them (on this rank; a non-finite loss on "
            "another rank reaches it as non-finite gradients)") in a["error"]
    assert a["error"].split(":")[:2] == b["error"].split(":")[:2]  # the same steps and scale
