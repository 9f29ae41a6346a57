"""The loss scaler's trajectories: GradScaler parity, hysteresis, floor, ceiling, live settings, state."""

import pytest
import torch

from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.scaler import LossScaler

INF = float("inf")


def drive(scaler: LossScaler, pattern: str) -> list[float]:
    """Feed a pattern of steps ('x' = overflow, '.' = clean); return the scale after each update."""
    scales = []
    for ch in pattern:
        g = torch.tensor([INF if ch == "x" else 1.0])
        scaler.unscale_([g])
        scaler.update()
        scales.append(scaler.read().scale)
    return scales


def test_hysteresis_one_matches_torch_gradscaler():
    pattern = "...x..x.xx....x......" * 2
    ours = LossScaler(MixedPrecisionConfig(growth_interval=3, max_scale=2.0**40), "cpu")
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.0)
    ref_scales, ref_trackers = [], []
    for ch in pattern:
        ref.scale(torch.tensor(1.0))  # GradScaler creates its state lazily here
        p.grad = torch.tensor([INF if ch == "x" else 1.0]) * ref.get_scale()
        ref.unscale_(opt)
        ref.step(opt)
        ref.update()
        ref_scales.append(ref.get_scale())
        ref_trackers.append(ref._get_growth_tracker())
    ours_scales, ours_trackers = [], []
    for ch in pattern:
        drive(ours, ch)
        s = ours.read()
        ours_scales.append(s.scale)
        ours_trackers.append(s.growth_tracker)
    assert ours_scales == ref_scales
    assert ours_trackers == ref_trackers


def test_hysteresis_backs_off_after_n_in_a_row_then_on_every_overflow_until_a_clean_step():
    s = LossScaler(MixedPrecisionConfig(init_scale=1024.0, hysteresis=3, growth_interval=100), "cpu")
    # two overflows, a clean step (refills the budget), three overflows -> the third backs off
    assert drive(s, "xx.xxx") == [1024.0, 1024.0, 1024.0, 1024.0, 1024.0, 512.0]
    # the budget is spent: every further overflow backs off (DeepSpeed's rule), not every third
    assert drive(s, "xxx") == [256.0, 128.0, 64.0]
    st = s.read()
    assert (st.overflows, st.backoffs, st.hysteresis_left) == (8, 4, 0)
    assert drive(s, ".xx") == [64.0, 64.0, 64.0]  # a clean step refilled all three
    assert s.read().hysteresis_left == 1


@pytest.mark.parametrize("refill, expected", [
    ("clean", [1024.0, 512.0, 256.0, 256.0, 256.0, 128.0]),  # the README's example trajectories
    ("growth", [1024.0, 512.0, 256.0, 256.0, 128.0, 64.0]),
])
def test_hysteresis_refill_rules(refill, expected):
    s = LossScaler(MixedPrecisionConfig(init_scale=1024.0, hysteresis=2, hysteresis_refill=refill,
                                        growth_interval=100), "cpu")
    assert drive(s, "xxx.xx") == expected


def test_megatron_rule_refills_on_growth_only():
    s = LossScaler(MixedPrecisionConfig(init_scale=64.0, hysteresis=2, hysteresis_refill="growth",
                                        growth_interval=2), "cpu")
    # spend the budget; one clean step does not refill it; two make the scale grow, which does
    assert drive(s, "xx.x") == [64.0, 32.0, 32.0, 16.0]
    assert drive(s, "..x") == [16.0, 32.0, 32.0]  # grown, refilled: the next overflow is tolerated
    assert s.read().hysteresis_left == 1


def megatron_reference(pattern, scale, hysteresis, interval, growth=2.0, backoff=0.5, floor=1.0):
    """Megatron-LM's DynamicGradScaler rule, written out from its documentation, for comparison."""
    tracker, left, out = 0, hysteresis, []
    for ch in pattern:
        if ch == "x":
            tracker, left = 0, left - 1
            if left <= 0:
                scale = max(scale * backoff, floor)
        else:
            tracker += 1
            if tracker == interval:
                tracker, left, scale = 0, hysteresis, scale * growth
        out.append(scale)
    return out


def deepspeed_reference(pattern, scale, hysteresis, interval, growth=2.0, floor=1.0):
    """DeepSpeed's DynamicLossScaler with consecutive_hysteresis=True, written out for comparison."""
    cur_h, it, last_overflow, out = hysteresis, 0, -1, []
    for ch in pattern:
        if ch == "x":
            if hysteresis == 1 or cur_h == 1:
                scale = max(scale / growth, floor)
            else:
                cur_h -= 1
            last_overflow = it
        else:
            cur_h = hysteresis
            if (it - last_overflow) % interval == 0:
                scale *= growth
        it += 1
        out.append(scale)
    return out


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_trajectories_match_deepspeed_and_megatron_rules(hysteresis):
    pattern = "..xxxx...x.x....xxx.xx..........x" * 2
    ds = LossScaler(MixedPrecisionConfig(init_scale=2.0**10, hysteresis=hysteresis, growth_interval=4), "cpu")
    assert drive(ds, pattern) == deepspeed_reference(pattern, 2.0**10, hysteresis, 4)
    mg = LossScaler(MixedPrecisionConfig(init_scale=2.0**10, hysteresis=hysteresis, hysteresis_refill="growth",
                                         growth_interval=4), "cpu")
    assert drive(mg, pattern) == megatron_reference(pattern, 2.0**10, hysteresis, 4)


def test_floor_and_ceiling_hold():
    s = LossScaler(MixedPrecisionConfig(init_scale=8.0, min_scale=2.0, max_scale=32.0, growth_interval=1), "cpu")
    assert drive(s, "xxxx") == [4.0, 2.0, 2.0, 2.0]
    assert drive(s, "......") == [4.0, 8.0, 16.0, 32.0, 32.0, 32.0]
    st = s.read()
    assert (st.min_scale_seen, st.max_scale_seen) == (2.0, 32.0)


def test_static_scale_counts_overflows_but_never_moves():
    s = LossScaler(MixedPrecisionConfig(init_scale=128.0, use_dynamic_loss_scaling=False, growth_interval=1), "cpu")
    assert drive(s, "x..x..") == [128.0] * 6
    assert s.read().overflows == 2


def test_settings_change_keeps_the_growth_tracker():
    s = LossScaler(MixedPrecisionConfig(init_scale=16.0, growth_interval=10), "cpu")
    drive(s, "......")
    assert s.read().growth_tracker == 6
    diff = s.set(growth_interval=8, growth_factor=4.0)
    assert diff == {"growth_factor": (2.0, 4.0), "growth_interval": (10, 8)}
    assert s.read().growth_tracker == 6
    assert drive(s, "..") == [16.0, 64.0]  # tracker reaches the new interval: grows by the new factor


def test_settings_are_validated():
    s = LossScaler(MixedPrecisionConfig(), "cpu")
    with pytest.raises(ConfigError, match="backoff_factor"):
        s.set(backoff_factor=2.0)
    with pytest.raises(ConfigError, match="unknown setting"):
        s.set(speed=3)


def test_state_dict_round_trip_continues_identically():
    cfg = MixedPrecisionConfig(init_scale=256.0, hysteresis=2, growth_interval=2)
    a = LossScaler(cfg, "cpu")
    drive(a, "..x.x..x")
    b = LossScaler(MixedPrecisionConfig(), "cpu")
    b.load_state_dict(a.state_dict())
    assert b.read() == a.read() and b.settings() == a.settings()
    tail = "xx...x..x"
    assert drive(b, tail) == drive(a, tail)


def test_unscale_divides_and_flags():
    s = LossScaler(MixedPrecisionConfig(init_scale=4.0), "cpu")
    g = torch.tensor([8.0, 4.0])
    found = s.unscale_([g])
    assert g.tolist() == [2.0, 1.0] and found.item() == 0.0
    assert s.unscale_([g]) is found and g.tolist() == [2.0, 1.0]  # idempotent within a step


def test_unscale_for_a_second_optimizer_unscales_its_gradients_and_adds_its_overflow():
    s = LossScaler(MixedPrecisionConfig(init_scale=4.0), "cpu")
    a, b = torch.tensor([8.0]), torch.tensor([INF, 4.0])
    assert s.unscale_([a]).item() == 0.0
    found = s.unscale_([b, a])  # a second optimizer's gradients (and one shared, not divided twice)
    assert a.tolist() == [2.0] and b[1].item() == 1.0 and found.item() == 1.0
    s.update()
    assert s.read().scale == 2.0


def test_unscale_sparse_gradients_in_place_coalesced_or_not():
    s = LossScaler(MixedPrecisionConfig(init_scale=4.0), "cpu")
    idx = torch.tensor([[0, 2, 0]])  # index 0 twice: uncoalesced, as autograd makes embedding gradients
    g = torch.sparse_coo_tensor(idx, torch.tensor([[4.0], [8.0], [12.0]]), (3, 1))
    assert not g.is_coalesced()
    assert s.unscale_([g]).item() == 0.0
    assert g._values().flatten().tolist() == [1.0, 2.0, 3.0]  # the caller's tensor, not a copy
    assert g.to_dense().flatten().tolist() == [4.0, 0.0, 2.0]


def test_the_readme_trajectories():
    growth = LossScaler(MixedPrecisionConfig(init_scale=1024.0, growth_interval=2), "cpu")
    assert drive(growth, "....") == [1024.0, 2048.0, 2048.0, 4096.0]
    floor = LossScaler(MixedPrecisionConfig(init_scale=1024.0, min_scale=512.0), "cpu")
    assert drive(floor, "xx") == [512.0, 512.0]
