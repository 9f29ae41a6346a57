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
