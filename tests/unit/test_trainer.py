"""MixedPrecisionTrainer.train_step: accumulation, skipping, scheduling, clipping, policies, state."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer, NonFiniteLossError, OutOfMemoryError, ScaleCollapseError
from tests.unit.helpers import GradPoison, OOMAbove, batches, tiny_mlp


def engine(**kw) -> MixedPrecisionTrainer:
    return MixedPrecisionTrainer(MixedPrecisionConfig(**kw), device="cpu")


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_accumulation_equals_one_large_batch_fp32():
    k = 4
    micro = batches(3 * k, batch=8)
    a, b = tiny_mlp(), tiny_mlp()
    ea, eb = engine(dtype="fp32", gradient_accumulation_steps=k), engine(dtype="fp32")
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    stepped = [bool(ea.train_step(a, oa, F.cross_entropy, x, y).optimizer_stepped) for x, y in micro]
    assert stepped == [False, False, False, True] * 3
    for i in range(3):
        group = micro[i * k:(i + 1) * k]
        x = torch.cat([g[0] for g in group])
        y = torch.cat([g[1] for g in group])
        eb.train_step(b, ob, F.cross_entropy, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    perf = ea.get_performance_summary()["performance"]
    assert (perf["training_steps"], perf["optimizer_steps"]) == (12, 3)


def test_overflowing_step_leaves_params_and_optimizer_state_bitwise_unchanged():
    model = tiny_mlp()
    eng = engine(init_scale=1024.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(4)
    for x, y in data[:2]:
        eng.train_step(model, opt, F.cross_entropy, x, y)
    before_p, before_o = params_of(model), copy.deepcopy(opt.state_dict())
    poison = GradPoison(model[0].weight, always=True)
    out = eng.train_step(model, opt, F.cross_entropy, *data[2])
    poison.remove()
    assert bool(out.skipped) and not bool(out.optimizer_stepped)
    assert out.scale_used.item() == 1024.0 and out.scale.item() == 512.0  # the scale after the update
    assert_bitwise(params_of(model), before_p)
    after_o = opt.state_dict()
    for pid, st in before_o["state"].items():
        for key, value in st.items():
            assert torch.equal(value, after_o["state"][pid][key])
    assert eng.scaler.read().scale == 512.0
    assert not eng.train_step(model, opt, F.cross_entropy, *data[3]).skipped


def test_scheduler_does_not_advance_on_skipped_steps():
    model = tiny_mlp()
    eng = engine(init_scale=256.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    poison = GradPoison(model[2].bias, steps={1, 2})
    for x, y in batches(5):
        eng.train_step(model, opt, F.cross_entropy, x, y, scheduler=sched)
    poison.remove()
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == 0.125


def test_clipping_sees_unscaled_gradients():
    x, y = batches(1, batch=16)[0]
    ref = tiny_mlp()
    F.cross_entropy(ref(x), y).backward()
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    model = tiny_mlp()
    eng = engine(dtype="bf16", bf16_grad_scaling=True, init_scale=2.0**12, max_grad_norm=true_norm / 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = eng.train_step(model, opt, F.cross_entropy, x, y)
    assert out["grad_norm"].item() == pytest.approx(true_norm, rel=0.05)  # not true_norm * 4096


def test_nonfinite_loss_skip_and_raise():
    def nan_loss(out, target):
        return F.cross_entropy(out, target) * float("nan")

    model = tiny_mlp()
    eng = engine(init_scale=64.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = params_of(model)
    out = eng.train_step(model, opt, nan_loss, *batches(1)[0])
    assert bool(out.skipped)
    assert_bitwise(params_of(model), before)
    perf, scaler = eng.get_performance_summary()["performance"], eng.scaler.read()
    assert perf["nonfinite_losses"] == 1 and perf["skipped_steps"] == 1
    # The NaN loss made the gradients NaN (so that DDP would carry the skip to every rank): the scaler
    # sees an overflow, as torch's GradScaler does; no parameter is named for an all-NaN step.
    assert scaler.scale == 32.0 and scaler.overflows == 1 and not eng.offenders
    eng_raise = engine(nonfinite_loss_policy="raise")
    with pytest.raises(NonFiniteLossError, match="training step 1"):
        eng_raise.train_step(model, opt, nan_loss, *batches(1)[0])


@pytest.mark.parametrize("phase,limit,events,pieces", [("forward", 5, 2, 4), ("backward", 8, 1, 2)])
def test_oom_split_retries_halves_and_matches_the_whole_batch(phase, limit, events, pieces):
    x, y = batches(1, batch=16)[0]
    ref, model = tiny_mlp(), nn.Sequential(OOMAbove(limit=limit, phase=phase), tiny_mlp())
    eref, eng = engine(dtype="fp32"), engine(dtype="fp32", oom_policy="split")
    oref, opt = torch.optim.SGD(ref.parameters(), lr=0.5), torch.optim.SGD(model.parameters(), lr=0.5)
    lref = eref.train_step(ref, oref, F.cross_entropy, x, y).loss
    out = eng.train_step(model, opt, F.cross_entropy, x, y)
    torch.testing.assert_close(out.loss, lref)
    for p, q in zip(model[1].parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    perf = eng.get_performance_summary()["performance"]
    assert perf["oom_events"] == events and perf["oom_split_retries"] == events and perf["oom_pieces"] == pieces
    raised = model[0].raised
    eng.train_step(model, opt, F.cross_entropy, x, y)  # later batches start split: no new OOM
    assert model[0].raised == raised


def test_oom_in_backward_after_accumulated_grads_drops_the_window():
    # The first micro-batch (4 rows) has accumulated gradients; the second (16 rows) fails in backward,
    # after its partial sums were added: they cannot be told apart, so the window is dropped.
    model = nn.Sequential(OOMAbove(limit=5, phase="backward"), tiny_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = params_of(model)
    eng = engine(dtype="fp32", oom_policy="split", gradient_accumulation_steps=2)
    (x1, y1), (x2, y2) = batches(1, batch=4)[0], batches(1, batch=16)[0]
    assert not eng.train_step(model, opt, F.cross_entropy, x1, y1).optimizer_stepped
    out = eng.train_step(model, opt, F.cross_entropy, x2, y2)
    assert bool(out.skipped)
    assert_bitwise(params_of(model), before)
    assert eng.get_performance_summary()["performance"]["oom_skipped_batches"] == 1


def test_oom_skip_and_raise():
    model = nn.Sequential(OOMAbove(limit=4), tiny_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = params_of(model)
    eng = engine(oom_policy="skip")
    out = eng.train_step(model, opt, F.cross_entropy, *batches(1)[0])
    assert bool(out.skipped) and torch.isnan(out.loss)
    assert_bitwise(params_of(model), before)
    perf = eng.get_performance_summary()["performance"]
    assert perf["oom_skipped_batches"] == 1 and perf["nonfinite_losses"] == 0
    with pytest.raises(OutOfMemoryError):
        engine(oom_policy="raise").train_step(model, opt, F.cross_entropy, *batches(1)[0])


def test_overflow_attribution_names_the_offender():
    model = tiny_mlp()
    eng = engine(init_scale=2.0**10, growth_interval=10**6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = GradPoison(model[2].weight, steps={0, 2, 3})
    for x, y in batches(5):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    poison.remove()
    info = eng.get_performance_summary()["scaler_info"]
    assert info["top_overflow_params"][0] == ("2.weight", 3)
    assert info["overflows"] == 3 and info["backoffs"] == 3 and info["current_scale"] == 2.0**7
    assert [h["reason"] for h in info["scale_history"]] == ["backoff"] * 3


def test_scale_collapse_raises_with_step_scale_and_offenders():
    model = tiny_mlp()
    eng = engine(init_scale=4.0, min_scale=1.0, collapse_patience=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = GradPoison(model[0].bias, always=True)
    with pytest.raises(ScaleCollapseError) as err:
        for x, y in batches(10):
            eng.train_step(model, opt, F.cross_entropy, x, y)
    poison.remove()
    msg = str(err.value)
    assert "optimizer step" in msg and "scale 1.0" in msg and "0.bias" in msg
    assert eng.events[-1]["kind"] == "scale_collapse" and eng.events[-1]["action"] == "raise"


def test_scale_collapse_falls_back_to_bf16():
    model = tiny_mlp()
    eng = engine(init_scale=2.0, min_scale=1.0, collapse_patience=2, collapse_policy="fallback_bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = GradPoison(model[0].bias, steps={0, 1, 2, 3})
    outs = [eng.train_step(model, opt, F.cross_entropy, x, y) for x, y in batches(4)]
    poison.remove()
    assert eng.amp_dtype == torch.bfloat16 and not eng.scaler.enabled
    assert eng.events[-1]["action"] == "fallback_bf16"
    before = params_of(model)
    out = eng.train_step(model, opt, F.cross_entropy, *batches(1, seed=9)[0])
    assert not out.skipped and out.scale.item() == 1.0 and [bool(o.skipped) for o in outs] == [True] * 4
    assert not all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


def _run(model, opt, eng, data, poison_steps=()):
    poison = GradPoison(model[0].weight, steps=set(poison_steps))
    scales = [eng.train_step(model, opt, F.cross_entropy, x, y).scale.item() for x, y in data]
    poison.remove()
    return scales


def test_resume_from_a_state_file_continues_exactly(tmp_path):
    cfg = dict(init_scale=2.0**8, growth_interval=2, hysteresis=2, gradient_accumulation_steps=2)
    data = batches(24, batch=4)
    poison = {3, 4, 11, 12, 17}
    full_model, full_eng = tiny_mlp(), engine(**cfg)
    full_opt = torch.optim.Adam(full_model.parameters(), lr=1e-2)
    full = _run(full_model, full_opt, full_eng, data, poison)

    m1, e1 = tiny_mlp(), engine(**cfg)
    o1 = torch.optim.Adam(m1.parameters(), lr=1e-2)
    first = _run(m1, o1, e1, data[:10], {p for p in poison if p < 10})
    e1.save_scaler_state(tmp_path / "engine.pt")
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, tmp_path / "rest.pt")

    m2, e2 = tiny_mlp(seed=123), engine()
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    rest = torch.load(tmp_path / "rest.pt", weights_only=True)
    m2.load_state_dict(rest["model"])
    o2.load_state_dict(rest["opt"])
    e2.load_scaler_state(tmp_path / "engine.pt")
    # hooks count backward calls; the poisoned indices continue from the 10 batches already seen
    second = _run(m2, o2, e2, data[10:], {p - 10 for p in poison if p >= 10})
    assert first + second == full
    assert_bitwise(params_of(m2), params_of(full_model))
    assert e2.scaler.read() == full_eng.scaler.read()
    assert e2.get_performance_summary()["performance"]["skipped_steps"] == full_eng.counters.skipped_steps


def test_state_file_loads_with_weights_only(tmp_path):
    eng = engine()
    eng.train_step(tiny_mlp(), torch.optim.SGD(tiny_mlp().parameters(), lr=0.1), F.cross_entropy, *batches(1)[0])
    eng.save_scaler_state(tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**16 and state["counters"]["training_steps"] == 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def _dtypes(model, eng, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.dtype))
             for n, m in model.named_children()]
    with eng.autocast(), eng._islands.guard():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_fp32_modules_run_in_fp32_inside_autocast():
    x = torch.randn(2, 8)
    eng = engine(dtype="bf16", fp32_modules=("head",))
    model = eng.prepare_model(Net())
    seen = _dtypes(model, eng, x)
    assert (seen["body"], seen["head"]) == (torch.bfloat16, torch.float32)
    plain = engine(dtype="bf16")
    assert _dtypes(plain.prepare_model(Net()), plain, x)["head"] == torch.bfloat16
    by_type = engine(dtype="bf16", fp32_modules=("Linear",))
    seen = _dtypes(by_type.prepare_model(Net()), by_type, x)
    assert seen["body"] == torch.float32 and seen["head"] == torch.float32
    with pytest.raises(ValueError, match="matched no module"):
        engine(fp32_modules=("nothing*",)).prepare_model(Net())


def test_disabled_is_plain_fp32_with_the_same_api():
    x, y = batches(1)[0]
    a, b = tiny_mlp(), tiny_mlp()
    eng = engine(enabled=False)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    out = eng.train_step(a, oa, F.cross_entropy, x, y)
    loss = F.cross_entropy(b(x), y)
    loss.backward()
    ob.step()
    assert out.scale.item() == 1.0 and out.loss.item() == loss.item()
    assert_bitwise(params_of(a), params_of(b))


def test_a_clean_step_resets_the_collapse_count():
    # Overflows every other step at the floor are not "in a row": no collapse however long it runs.
    model = tiny_mlp()
    eng = engine(init_scale=1.0, min_scale=1.0, collapse_patience=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    poison = GradPoison(model[0].bias, steps=set(range(0, 20, 2)))
    for x, y in batches(20):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    poison.remove()
    assert eng.scaler.read().overflows == 10 and not eng.events
    poison = GradPoison(model[0].bias, always=True)
    with pytest.raises(ScaleCollapseError, match="2 overflowing steps in a row"):
        for x, y in batches(2):
            eng.train_step(model, opt, F.cross_entropy, x, y)
    poison.remove()


def test_step_result_fields_have_the_same_types_whatever_the_optimizer():
    x, y = batches(1)[0]
    kinds = []
    for fused in (False, True):
        model, eng = tiny_mlp(), engine(init_scale=8.0, max_grad_norm=1.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        out = eng.train_step(model, opt, F.cross_entropy, x, y)
        kinds.append({name: type(getattr(out, name)) for name in ("loss", "skipped", "optimizer_stepped",
                                                                  "scale", "scale_used", "grad_norm")})
        assert out.skipped.dtype == torch.bool and out.scale.item() == 8.0 and out.to_dict()["skipped"] is False
    assert kinds[0] == kinds[1] and set(kinds[0].values()) == {torch.Tensor}


def test_two_optimizers_share_one_skip_decision_and_one_scale():
    model = tiny_mlp()
    eng = engine(init_scale=2.0**8)
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.Adam(model[2].parameters(), lr=0.1)
    ref = copy.deepcopy(model)
    r1, r2 = torch.optim.SGD(ref[0].parameters(), lr=0.1), torch.optim.Adam(ref[2].parameters(), lr=0.1)
    poison, ref_poison = GradPoison(model[2].weight, steps={1}), GradPoison(ref[2].weight, steps={1})
    scale = 2.0**8
    for x, y in batches(4):
        out = eng.train_step(model, [first, second], F.cross_entropy, x, y)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref(x), y)
        (loss.float() * scale).backward()
        grads = [p.grad for p in ref.parameters()]
        torch._foreach_div_(grads, scale)
        if all(torch.isfinite(g).all() for g in grads):
            r1.step(), r2.step()
        else:
            scale /= 2
        r1.zero_grad(set_to_none=True), r2.zero_grad(set_to_none=True)
        assert out.scale.item() == scale
    poison.remove(), ref_poison.remove()
    # the overflow in the second optimizer's parameters skipped the first optimizer's step too, and the
    # second optimizer's gradients were unscaled as well (no step on x-scale gradients)
    assert eng.counters.skipped_steps == 1
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _sparse_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(8 * 3, 4))


def _sparse_batches(n):
    g = torch.Generator().manual_seed(3)
    # repeated indices within a batch: autograd makes uncoalesced sparse gradients
    return [(torch.randint(0, 50, (16, 3), generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def test_sparse_embedding_gradients_train_like_grad_scaler():
    model, ref = _sparse_model(), _sparse_model()
    eng = engine(init_scale=2.0**8)
    opt, ropt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for x, y in _sparse_batches(4):
        eng.train_step(model, opt, F.cross_entropy, x, y)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(ref(x), y)
        scaler.scale(loss.float()).backward()
        scaler.step(ropt)
        scaler.update()
        ropt.zero_grad(set_to_none=True)
    assert eng.counters.skipped_steps == 0
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_with_a_sparse_gradient_uses_its_true_norm():
    model, ref = _sparse_model(), _sparse_model()
    x, y = _sparse_batches(1)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        F.cross_entropy(ref(x), y).float().backward()
    true = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.to_dense()) for p in ref.parameters()]))
    eng = engine(init_scale=2.0**8, max_grad_norm=true.item() / 2)
    out = eng.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), F.cross_entropy, x, y)
    assert out.grad_norm.item() == pytest.approx(true.item(), rel=1e-3)


def test_interval_time_counts_the_steps_not_what_happened_between_them():
    """A report interval's time starts at the first step after begin_interval(): a pause between two steps
    (a report, an evaluation, a checkpoint) is in the wall time but not in the interval's."""
    import time

    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp32"), "cpu")
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = batches(1)
    assert eng.counters.interval_time_s() == 0.0
    for _ in range(2):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    first = eng.counters.interval_time_s()
    assert 0.0 < first < eng.counters.wall_time_s() + 1e-9
    time.sleep(0.3)  # the report
    eng.counters.begin_interval()
    assert eng.counters.interval_time_s() == 0.0  # no step of the new interval yet
    for _ in range(2):
        eng.train_step(model, opt, F.cross_entropy, x, y)
    assert 0.0 < eng.counters.interval_time_s() < 0.25
    assert eng.counters.wall_time_s() > 0.3
