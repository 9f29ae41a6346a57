"""The device-side skip (optimizers that take `found_inf`, e.g. fused Adam): same behaviour as the
synchronising path, with the host bookkeeping one step later."""

import copy

import torch
import torch.nn.functional as F

from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from tests.unit.helpers import GradPoison, batches, tiny_mlp


def engine(**kw):
    return MixedPrecisionTrainer(MixedPrecisionConfig(**kw), device="cpu")


def fused_adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)


def test_fused_skip_is_on_the_device_and_leaves_state_bitwise_unchanged():
    model, eng = tiny_mlp(), engine(init_scale=1024.0)
    opt = fused_adam(model)
    data = batches(4)
    for x, y in data[:2]:
        eng.train_step(model, opt, F.cross_entropy, x, y)
    before_p = [p.detach().clone() for p in model.parameters()]
    before_o = copy.deepcopy(opt.state_dict())
    poison = GradPoison(model[0].weight, always=True)
    out = eng.train_step(model, opt, F.cross_entropy, *data[2])
    poison.remove()
    assert torch.is_tensor(out["skipped"]) and bool(out["skipped"]) and not bool(out["optimizer_stepped"])
    for p, q in zip(model.parameters(), before_p):
        assert torch.equal(p, q)
    for pid, st in before_o["state"].items():
        for key, value in st.items():
            assert torch.equal(value, opt.state_dict()["state"][pid][key])
    summary = eng.get_performance_summary()
    assert summary["performance"]["skipped_steps"] == 1 and summary["scaler_info"]["current_scale"] == 512.0
    assert summary["scaler_info"]["top_overflow_params"] == [("0.weight", 1)]


def _trajectory(make_opt, poison_steps, **cfg):
    model, eng = tiny_mlp(), engine(**cfg)
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    poison = GradPoison(model[2].weight, steps=set(poison_steps))
    scales = [float(eng.train_step(model, opt, F.cross_entropy, x, y, scheduler=sched)["scale"])
              for x, y in batches(16)]
    poison.remove()
    summary = eng.get_performance_summary()
    return scales, summary, sched.last_epoch, model


def test_device_side_and_synchronising_paths_agree():
    poison = {2, 3, 7, 11, 12}
    cfg = dict(init_scale=2.0**8, growth_interval=2, hysteresis=2, max_grad_norm=5.0)
    s_fused, sum_fused, ep_fused, m_fused = _trajectory(fused_adam, poison, **cfg)
    s_sync, sum_sync, ep_sync, m_sync = _trajectory(
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, foreach=False), poison, **cfg)
    assert s_fused == s_sync
    assert ep_fused == ep_sync == 16 - len(poison)  # the scheduler skipped the same steps
    for key in ("skipped_steps", "optimizer_steps", "overflow_rate"):
        assert sum_fused["performance"][key] == sum_sync["performance"][key]
    for key in ("scale", "growth_tracker", "backoffs", "growths", "top_overflow_params", "scale_history"):
        assert sum_fused["scaler_info"][key] == sum_sync["scaler_info"][key]
    for p, q in zip(m_fused.parameters(), m_sync.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_matches_torch_clip_grad_norm_in_fp32():
    x, y = batches(1, batch=32)[0]
    ref = tiny_mlp()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt_ref.step()
    model, eng = tiny_mlp(), engine(dtype="fp32", max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_pending_step_is_settled_into_the_saved_state(tmp_path):
    model, eng = tiny_mlp(), engine(init_scale=64.0)
    opt = fused_adam(model)
    poison = GradPoison(model[0].bias, steps={0})
    eng.train_step(model, opt, F.cross_entropy, *batches(1)[0])
    poison.remove()
    state = eng.state_dict()  # the overflow was still pending on the device: it must be in the state
    assert state["counters"]["skipped_steps"] == 1 and state["offenders"] == {"0.bias": 1}
    assert state["scaler"]["scale"] == 32.0


def _weights_after(policy: str, fused: bool, steps: int = 3, **cfg):
    torch.manual_seed(0)
    model, eng = tiny_mlp(), engine(init_scale=1024.0, nonfinite_loss_policy=policy, **cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
    for x, y in batches(steps):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    return [p.detach().clone() for p in model.parameters()], eng


def test_a_fused_optimizer_under_the_raise_policy_steps_on_unscaled_gradients():
    # "raise" reads the flags on the host before stepping: the fused kernel then gets no grad_scale, so
    # the engine must unscale itself (a 1024x step otherwise)
    ref, _ = _weights_after("skip", fused=False)
    for policy in ("skip", "raise"):
        got, _ = _weights_after(policy, fused=True)
        for p, q in zip(got, ref):
            torch.testing.assert_close(p, q)


def test_the_bf16_fallback_applies_from_the_next_window_on_the_device_side_path():
    # At min_scale 64 a step whose gradients were scaled by 64 but not unscaled would move 64x too far.
    def run(fused):
        torch.manual_seed(0)
        model = tiny_mlp()
        eng = engine(init_scale=256.0, min_scale=64.0, collapse_patience=2, collapse_policy="fallback_bf16")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
        poison = GradPoison(model[0].bias, steps={0, 1, 2, 3})
        moves = []
        for x, y in batches(10):
            before = [p.detach().clone() for p in model.parameters()]
            eng.train_step(model, opt, F.cross_entropy, x, y)
            moves.append(max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before)))
        poison.remove()
        eng.stepper.settle()
        return moves, eng

    (sync_moves, sync_eng), (fused_moves, fused_eng) = run(False), run(True)
    assert sync_eng.events[0]["action"] == fused_eng.events[0]["action"] == "fallback_bf16"
    assert max(fused_moves) < 2 * max(sync_moves)  # no step on gradients still scaled by 64
    assert max(sync_moves) < 0.5


def test_a_caught_collapse_error_leaves_the_engine_able_to_step():
    from ampray.amp.trainer import ScaleCollapseError

    model, eng = tiny_mlp(), engine(init_scale=1.0, min_scale=1.0, collapse_patience=2)
    opt = fused_adam(model)
    poison = GradPoison(model[0].bias, always=True)
    caught = 0
    for x, y in batches(12):
        try:
            eng.train_step(model, opt, F.cross_entropy, x, y)
        except ScaleCollapseError:
            caught += 1
    poison.remove()
    assert caught >= 1 and eng.counters.micro_in_window == 0
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(6, seed=5):
        try:
            eng.train_step(model, opt, F.cross_entropy, x, y)
        except ScaleCollapseError:
            pass  # the booking of the poisoned steps still pending
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
