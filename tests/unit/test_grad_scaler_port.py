"""ampray.GradScaler as a drop-in for torch.amp.GradScaler.

Part 1 is this project's own port of PyTorch's GradScaler tests (test_torch.py / test_cuda.py, the
test_grad_scaling_* family: scale, unscale with a "perfect storm" of grads, sparse grads, update_scale,
state_dict, autocast with and without pickling, clipping, separate unscale, penalty, accumulation,
multiple models/optimizers, fused optimizers, a scaler passed to custom optimizers, the errors), run on CPU
against both scalers: the same assertions hold for torch's and ours. Multi-GPU cases are not applicable.
Part 2 proves parity bitwise (parameters, optimizer state, scale and tracker after every step of loops
with injected infs and NaNs). Part 3 drives ampray's extras: hysteresis (both refill rules), floor,
ceiling, skip signals, attribution, consensus without a process group, settings, state in both directions
with torch's GradScaler, pickling.
"""

import copy
import pickle
from functools import partial
from itertools import chain

import pytest
import torch
from torch import nn

import ampray
from ampray import ConfigError, GradScaler
from ampray.amp.grad_scaler import CEILING, FLOOR

INF, NAN = float("inf"), float("nan")
SCALERS = pytest.mark.parametrize("Scaler", [torch.amp.GradScaler, GradScaler], ids=["torch", "ampray"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def drive(scaler, pattern, p=None, opt=None, device="cpu"):
    """One optimizer step per character ('x' an inf gradient, 'n' a NaN, '.' clean); the scale after each."""
    p = nn.Parameter(torch.ones(2, device=device)) if p is None else p
    opt = torch.optim.SGD([p], lr=0.0) if opt is None else opt
    scales = []
    for ch in pattern:
        scaler.scale(p.sum()).backward()
        if ch != ".":
            p.grad[0] = INF if ch == "x" else NAN
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    return scales


# ================================================================================================
# Part 1: the port
# ================================================================================================
def models_and_optimizers(optimizer_ctor=torch.optim.SGD, optimizer_kwargs=None):
    """A module+optimizer that will use scaling and a control pair (same weights) that will not."""
    kwargs = {"lr": 1.0, **(optimizer_kwargs or {})}
    control = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    scaling = copy.deepcopy(control)
    return control, scaling, optimizer_ctor(control.parameters(), **kwargs), optimizer_ctor(scaling.parameters(), **kwargs)


def scaling_case(optimizer_ctor=torch.optim.SGD, optimizer_kwargs=None):
    data = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(4)]
    return models_and_optimizers(optimizer_ctor, optimizer_kwargs) + (data, nn.MSELoss(), 2)


def run_scaling_case(Scaler, run, unskipped, skipped, atol=1e-7, optimizer_ctor=torch.optim.SGD,
                     optimizer_kwargs=None):
    """torch's _run_scaling_case: the scaled run matches the control, and the scale moved as counted."""
    for enabled in (True, False):  # scaling can be disabled without changing the loop
        mod_control, mod_scaling, opt_control, opt_scaling, data, loss_fn, skip_iter = scaling_case(
            optimizer_ctor, optimizer_kwargs)
        scaler = Scaler("cpu", init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1)
        run(data, mod_control, opt_control, scaler, loss_fn, skip_iter, False)
        scaler = run(data, mod_scaling, opt_scaling, scaler, loss_fn, skip_iter, True) or scaler
        if enabled:
            assert scaler.get_scale() == 128.0 * scaler.get_growth_factor() ** unskipped * \
                scaler.get_backoff_factor() ** skipped
        else:
            assert scaler.get_scale() == 1.0 and scaler.state_dict() == {}
        for c, s in zip(mod_control.parameters(), mod_scaling.parameters()):
            torch.testing.assert_close(c.grad, s.grad, atol=atol, rtol=1e-5)
            for k in opt_control.state[c]:
                torch.testing.assert_close(opt_control.state[c][k], opt_scaling.state[s][k], atol=atol, rtol=1e-5)
            torch.testing.assert_close(c, s, atol=atol, rtol=1e-5)


def inject(model, scaler, i, skip_iter):
    if i == skip_iter and scaler.is_enabled():
        with torch.no_grad():
            model[1].weight.grad.fill_(INF)


def control_step(optimizer, scaler, i, skip_iter):
    if not scaler.is_enabled() or i != skip_iter:
        optimizer.step()


@SCALERS
def test_scale_nested_outputs(Scaler):
    scaler = Scaler("cpu", init_scale=2.0)
    t0, t1 = torch.full((1,), 4.0), torch.full((1,), 4.0)
    outputs = scaler.scale((t1.clone(), (t0.clone(), t1.clone()), [t0.clone(), (t1.clone(), t0.clone())]))
    flat = [outputs[0], outputs[1][0], outputs[1][1], outputs[2][0], outputs[2][1][0], outputs[2][1][1]]
    assert all(o.item() == 8.0 for o in flat)
    assert isinstance(outputs[1], tuple) and isinstance(outputs[2], list)
    assert scaler._scale.device == t1.device
    with pytest.raises(ValueError, match="outputs must be a Tensor or an iterable"):
        scaler.scale([torch.ones(1), 3.0])


@pytest.mark.parametrize("Scaler", [torch.amp.GradScaler, GradScaler, partial(GradScaler, attribution=True)],
                         ids=["torch", "ampray", "ampray-attribution"])
def test_unscale_perfect_storm(Scaler):
    """Grads of mixed dtypes and layouts are grouped before the foreach check; an inf on any one is found."""
    inv_scale = torch.full((1,), 0.25)
    g = torch.full((20, 20), 4.0)

    def storm(inject_inf):
        grads = [g.clone(), g.clone()[:, :5], g.to(torch.float16), g.to(torch.float16)]
        if inject_inf >= 0:
            grads[inject_inf][2, 2] = INF
        return grads

    scaler = Scaler("cpu")
    params = [torch.empty_like(x) for x in storm(-1)]
    opt = torch.optim.SGD(params, lr=1.0)
    for inject_inf in range(-1, len(params)):
        found_inf = torch.full((1,), 0.0)
        grads = storm(inject_inf)
        for p, grad in zip(params, grads):
            p.grad = grad
        found = scaler._unscale_grads_(opt, inv_scale, found_inf, True)
        if inject_inf < 0:
            assert sum(v.item() for v in found.values()) == 0
            for grad in grads:
                torch.testing.assert_close(grad, torch.ones_like(grad), rtol=1e-5, atol=1e-7)
        else:
            assert sum(v.item() for v in found.values()) == 1
    if getattr(scaler, "attribution", False):  # each parameter's gradient held one inf, once
        assert sorted(scaler.top_offenders()) == [(f"param{i}", 1) for i in range(4)]


@SCALERS
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_unscale_sparse(Scaler):
    scaler = Scaler("cpu")
    inv_scale = torch.full((1,), 0.25)
    found_inf = torch.empty((1,))
    cur = found_inf.device
    i = torch.tensor([[0, 1, 1], [2, 0, 2]], dtype=torch.int64)
    v = torch.tensor([16.0, 32.0, 64.0])
    s = torch.sparse_coo_tensor(i, v, torch.Size([2, 3]))
    p = s.clone()
    assert p.is_sparse
    opt = torch.optim.SGD([p], lr=1.0)

    p.grad = s.clone()
    found_inf.zero_()
    found_inf = scaler._unscale_grads_(opt, inv_scale, found_inf, False)[cur]
    assert found_inf.item() == 0.0
    torch.testing.assert_close(p.grad.to_dense(), (s / 4).to_dense())

    for bad in (INF, NAN):
        p.grad = torch.sparse_coo_tensor(i, torch.tensor([16.0, 32.0, bad]), torch.Size([2, 3]))
        found_inf.zero_()
        found_inf = scaler._unscale_grads_(opt, inv_scale, found_inf, False)[cur]
        assert found_inf.item() == 1.0

    p = s.clone().half()  # fp16 sparse, uncoalesced: coalesced before checking
    assert p.is_sparse
    opt = torch.optim.SGD([p], lr=1.0)
    p.grad = s.clone().half()
    found_inf.zero_()
    found_inf = scaler._unscale_grads_(opt, inv_scale, found_inf, True)[cur]
    assert found_inf.item() == 0.0
    torch.testing.assert_close(p.grad.to_dense(), (s.half() / 4).to_dense())

    # Duplicate indices: 64000 + 64000 fits fp32 but not fp16, so the coalesced grad overflows.
    i = torch.LongTensor([[0, 1, 0], [2, 0, 2]])
    v = torch.tensor([64000.0, 32.0, 64000.0])
    p.grad = torch.sparse_coo_tensor(i, v, torch.Size([2, 3]), dtype=torch.float16)
    found_inf.zero_()
    found_inf = scaler._unscale_grads_(opt, inv_scale, found_inf, True)[cur]
    assert found_inf.item() == 1.0


@SCALERS
def test_update_scale(Scaler):
    """torch's test of _amp_update_scale_ through the scaler: two clean steps grow, an inf backs off."""
    scaler = Scaler("cpu", init_scale=4.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=2)
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.0)
    assert drive(scaler, ".", p, opt) == [4.0] and scaler._get_growth_tracker() == 1
    assert drive(scaler, ".", p, opt) == [8.0] and scaler._get_growth_tracker() == 0
    assert drive(scaler, "x", p, opt) == [2.0] and scaler._get_growth_tracker() == 0


@SCALERS
@pytest.mark.parametrize("lazy_init_scale", [True, False])
def test_state_dict(Scaler, lazy_init_scale):
    s0 = Scaler("cpu", init_scale=3.0, growth_factor=4.0, backoff_factor=0.5, growth_interval=2)
    s1 = Scaler("cpu", init_scale=6.0, growth_factor=7.0, backoff_factor=0.8, growth_interval=1)
    s1._init_growth_tracker = 7  # a value for load_state_dict to overwrite
    if lazy_init_scale:
        s1.scale(torch.full((1,), 4.0))  # creates the scale tensor
        assert s1._scale.dtype == torch.float32
    s1.load_state_dict(s0.state_dict())
    assert s1.get_scale() == 3.0
    assert s1.get_growth_factor() == 4.0
    assert s1.get_backoff_factor() == 0.5
    assert s1.get_growth_interval() == 2
    assert s1._init_growth_tracker == 0
    with pytest.raises(RuntimeError, match="The source state dict is empty"):
        s1.load_state_dict({})


@SCALERS
@pytest.mark.parametrize("try_pickle", [False, True])
def test_autocast(Scaler, try_pickle):
    """No scaling + no autocast against scaling + fp16 autocast; the scaler optionally pickled each step."""
    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        for i, (x, target) in enumerate(data):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=try_scaling_api):
                loss = loss_fn(model(x), target)
            if try_scaling_api:
                scaler.scale(loss).backward()
                inject(model, scaler, i, skip_iter)
                scaler.step(optimizer)
                scaler.update()
                if try_pickle:
                    scaler = pickle.loads(pickle.dumps(scaler))
            else:
                loss.backward()
                control_step(optimizer, scaler, i, skip_iter)
        return scaler

    run_scaling_case(Scaler, run, unskipped=3, skipped=1, atol=1e-3)


@SCALERS
def test_clipping(Scaler):
    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        max_norm = 0.2
        for i, (x, target) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(x), target)
            if try_scaling_api:
                scaler.scale(loss).backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm * scaler.get_scale())
                inject(model, scaler, i, skip_iter)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                control_step(optimizer, scaler, i, skip_iter)

    run_scaling_case(Scaler, run, unskipped=3, skipped=1, atol=1e-5)


@SCALERS
def test_clipping_separate_unscale(Scaler):
    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        max_norm = 0.2
        for i, (x, target) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(x), target)
            if try_scaling_api:
                scaler.scale(loss).backward()
                inject(model, scaler, i, skip_iter)
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_norm, error_if_nonfinite=False)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                control_step(optimizer, scaler, i, skip_iter)

    run_scaling_case(Scaler, run, unskipped=3, skipped=1)


@SCALERS
def test_penalty(Scaler):
    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        for i, (x, target) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_fn(model(x), target)
            if try_scaling_api:
                grads = torch.autograd.grad(scaler.scale(loss), model.parameters(), create_graph=True)
                inv_scale = 1.0 / scaler.get_scale()
                grads = [g * inv_scale for g in grads]
            else:
                grads = torch.autograd.grad(loss, model.parameters(), create_graph=True)
            loss = loss + sum(g.pow(2).sum() for g in grads).sqrt()
            if try_scaling_api:
                scaler.scale(loss).backward()
                inject(model, scaler, i, skip_iter)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                control_step(optimizer, scaler, i, skip_iter)

    run_scaling_case(Scaler, run, unskipped=3, skipped=1)


@SCALERS
def test_accumulation(Scaler):
    def run(data, model, optimizer, scaler, loss_fn, skip_iter, try_scaling_api):
        iters_to_accumulate = 2
        for i, (x, target) in enumerate(data):
            loss = loss_fn(model(x), target) / iters_to_accumulate
            (scaler.scale(loss) if try_scaling_api else loss).backward()
            if (i + 1) % iters_to_accumulate == 0:
                if try_scaling_api:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()

    run_scaling_case(Scaler, run, unskipped=2, skipped=0)


@SCALERS
def test_multiple_models_and_optimizers(Scaler):
    """Two models and two optimizers, both receiving gradients from two losses; one unscaled separately."""
    for enabled in (True, False):
        mod_c0, mod_s0, opt_c0, opt_s0, data, loss_fn, skip_iter = scaling_case()
        mod_c1, mod_s1, opt_c1, opt_s1 = models_and_optimizers()
        scaler = Scaler("cpu", init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1)

        def run(model0, model1, optimizer0, optimizer1, try_scaling_api, scaler=scaler, data=data,
                loss_fn=loss_fn, skip_iter=skip_iter):
            for i, (x, target) in enumerate(data):
                optimizer0.zero_grad()
                optimizer1.zero_grad()
                out0, out1 = model0(x), model1(x)
                loss0 = loss_fn(0.3 * out0 + 0.7 * out1, target)
                loss1 = loss_fn(0.6 * out0 - 0.4 * out1, target)
                if try_scaling_api:
                    scaler.scale(loss0).backward(retain_graph=True)
                    scaler.scale(loss1).backward()
                    inject(model1, scaler, i, skip_iter)
                    scaler.unscale_(optimizer0)
                    scaler.step(optimizer0)
                    scaler.step(optimizer1)
                    scaler.update()
                else:
                    loss0.backward(retain_graph=True)
                    loss1.backward()
                    optimizer0.step()  # its gradients stayed finite: torch skips per optimizer
                    if not scaler.is_enabled() or i != skip_iter:
                        optimizer1.step()

        run(mod_c0, mod_c1, opt_c0, opt_c1, False)
        run(mod_s0, mod_s1, opt_s0, opt_s1, True)
        expected = 128.0 * scaler.get_growth_factor() ** 3 * scaler.get_backoff_factor() if enabled else 1.0
        assert scaler.get_scale() == expected
        for c, s in zip(chain(mod_c0.parameters(), mod_c1.parameters()),
                        chain(mod_s0.parameters(), mod_s1.parameters())):
            torch.testing.assert_close(c, s, rtol=1e-5, atol=1e-7)


@SCALERS
@pytest.mark.parametrize("optimizer_ctor, kwargs", [
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
], ids=["Adam", "AdamW", "SGD"])
def test_fused_optimizers(Scaler, optimizer_ctor, kwargs):
    """A fused optimizer (it unscales and skips inside its kernel) matches the same optimizer unfused,
    under autocast, with an inf injected at one step: the skip happens in both."""
    def train(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        opt = optimizer_ctor(model.parameters(), fused=fused, **kwargs) if fused else \
            optimizer_ctor(model.parameters(), foreach=False, **kwargs)
        assert getattr(opt, "_step_supports_amp_scaling", False) == fused
        scaler = Scaler("cpu", init_scale=2.0**10, growth_interval=2)
        data = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(6)]
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if i == 3:
                model[2].weight.grad[0, 0] = INF
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if i == 3:
                assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        return model, scaler.get_scale()

    fused, fused_scale = train(True)
    plain, plain_scale = train(False)
    assert fused_scale == plain_scale == 2.0**11  # grown after steps 1 and 5, backed off at 3
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@SCALERS
def test_scaler_passed_to_custom_optimizers(Scaler):
    """An optimizer that handles scaling itself: the deprecated grad_scaler keyword (with a FutureWarning),
    or the grad_scale/found_inf tensors set on it for the duration of step()."""
    seen = {}

    class Placeholder(torch.optim.Optimizer):
        _step_supports_amp_scaling = True

        def __init__(self, params):
            super().__init__(params, {})

    class WithKeyword(Placeholder):
        def step(self, closure=None, *, grad_scaler=None):
            seen["keyword"] = grad_scaler
            assert not hasattr(self, "grad_scale") and not hasattr(self, "found_inf")

    class WithTensors(Placeholder):
        def step(self, closure=None):
            seen["tensors"] = (self.grad_scale.item(), self.found_inf.item())

    m = nn.Linear(4, 1)
    o1, o2 = WithKeyword(m.parameters()), WithTensors(m.parameters())
    scaler = Scaler("cpu", init_scale=2.0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = m(torch.randn(4, 4)).mean()
    scaler.scale(loss).backward()
    with pytest.warns(FutureWarning, match="stop passing itself"):
        scaler.step(o1)
    scaler.step(o2)
    scaler.update()
    assert seen["keyword"] is scaler and seen["tensors"] == (2.0, 0.0)
    assert not hasattr(o2, "grad_scale") and not hasattr(o2, "found_inf")


@SCALERS
def test_errors_of_the_per_optimizer_stages(Scaler):
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = Scaler("cpu")
    with pytest.raises(AssertionError, match="Attempted step but _scale is None"):
        scaler.step(opt)
    scaler.scale(p.sum()).backward()
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):
        scaler.step(opt, closure=lambda: p.sum())
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called since the last update\(\)"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(AssertionError, match="No inf checks were recorded prior to update"):
        scaler.update()
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    with pytest.raises(AssertionError, match="only be pickled at the beginning"):
        pickle.dumps(scaler)
    scaler.update()
    half = nn.Parameter(torch.ones(2, dtype=torch.float16))
    half.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.SGD([half], lr=0.1))


@SCALERS
def test_update_with_new_scale(Scaler):
    scaler = Scaler("cpu", init_scale=8.0)
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    drive(scaler, ".", p, opt)
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    scaler.update(3.0)
    assert scaler.get_scale() == 3.0
    scaler.update(torch.tensor(5.0))
    assert scaler.get_scale() == 5.0
    with pytest.raises(AssertionError, match="new_scale should be a float"):
        scaler.update(torch.tensor([1.0, 2.0]))
    assert drive(scaler, "x", p, opt) == [2.5]


# ================================================================================================
# Part 2: parity, bitwise
# ================================================================================================
def train_loop(Scaler, pattern, *, optimizer="adam", fused=False, clip=False, two_optimizers=False, device="cpu",
               **scaler_kw):
    """A small fp16-autocast loop; pattern chars: '.' clean, 'x' inf, 'n' NaN in one gradient.
    Returns (model, optimizers, [(scale, tracker)] after each update, [skipped?] per step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(device)
    groups = [list(model[0].parameters()), list(model[2].parameters())] if two_optimizers else [list(model.parameters())]

    def make(params):
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=1e-2, fused=fused) if fused else torch.optim.Adam(params, lr=1e-2)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    opts = [make(g) for g in groups]
    scaler = Scaler(torch.device(device).type, **{"init_scale": 2.0**12, "growth_interval": 3, **scaler_kw})
    g = torch.Generator().manual_seed(1)
    trace, skipped = [], []
    for ch in pattern:
        x, y = torch.randn(16, 8, generator=g).to(device), torch.randn(16, 4, generator=g).to(device)
        for o in opts:
            o.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if ch != ".":
            model[2].weight.grad[1, 3] = INF if ch == "x" else NAN
        before = [p.detach().clone() for p in model.parameters()]
        if clip:  # each optimizer's gradients unscaled and clipped on their own
            for o, params in zip(opts, groups):
                scaler.unscale_(o)
                nn.utils.clip_grad_norm_(params, 0.5)
        for o in opts:
            scaler.step(o)
        scaler.update()
        trace.append((scaler.get_scale(), scaler._get_growth_tracker()))
        unchanged = [torch.equal(b, p) for b, p in zip(before, model.parameters())]
        skipped.append((all(unchanged[:2]), all(unchanged[2:])))  # (first layer, poisoned layer) kept
    return model, opts, trace, skipped


PATTERN = "..x...n.xx......x.x..." + "." * 8
LOOPS = pytest.mark.parametrize("kw", [
    {}, {"optimizer": "sgd"}, {"fused": True}, {"clip": True}, {"fused": True, "clip": True}, {"two_optimizers": True},
    {"two_optimizers": True, "clip": True, "optimizer": "sgd"},
], ids=["adam", "sgd-momentum", "fused-adam", "unscale-clip", "fused-adam-unscale-clip-nanogpt",
        "two-optimizers", "two-optimizers-clip-sgd"])


@LOOPS
def test_parity_bitwise_with_torch(kw):
    ref_model, ref_opts, ref_trace, ref_skipped = train_loop(torch.amp.GradScaler, PATTERN, **kw)
    model, opts, trace, skipped = train_loop(GradScaler, PATTERN, **kw)
    assert trace == ref_trace
    assert skipped == ref_skipped
    # torch skips per optimizer: a second optimizer whose gradients stayed finite steps
    expected = [(ch != "." and not kw.get("two_optimizers"), ch != ".") for ch in PATTERN]
    assert skipped == expected
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b) and a.isfinite().all()
    for o, ro in zip(opts, ref_opts):
        for pa, pb in zip(o.state.values(), ro.state.values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pb)
    assert len({s for s, _ in ref_trace}) > 2  # the scale did move both ways


@pytest.mark.gpu
@LOOPS
def test_parity_bitwise_with_torch_on_cuda(kw):
    """The same on CUDA, where LossScaler's update replays a captured CUDA graph."""
    test_parity_bitwise_with_torch({**kw, "device": "cuda"})


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_extras_on_cuda(monkeypatch, graphs):
    monkeypatch.setenv("AMPRAY_SCALER_GRAPHS", graphs)
    s = GradScaler("cuda", init_scale=1024.0, growth_interval=100, hysteresis=2, attribution=True)
    assert drive(s, "xxx.xx", device="cuda") == [1024.0, 512.0, 256.0, 256.0, 256.0, 128.0]
    assert s._loss_scaler.use_graphs == (graphs == "1") and s._scale.is_cuda
    assert s._scale is s._loss_scaler.scale_tensor  # the graph writes the tensor that torch's scale() reads
    assert s.last_step_skipped.is_cuda and s.top_offenders() == [("param0", 5)]
    s.load_state_dict(s.state_dict())  # new LossScaler tensors, a new capture; torch's attributes follow
    assert s._scale is s._loss_scaler.scale_tensor and drive(s, "x", device="cuda") == [64.0]  # budget spent
    st = s.stats()
    assert (st.overflows, st.backoffs, st.steps, st.skipped_steps) == (6, 4, 7, 6)


def test_parity_at_float32s_top():
    """Growth stops where torch stops it (the next growth would be inf): 2**127, the default ceiling."""
    ref = drive(torch.amp.GradScaler("cpu", init_scale=2.0**120, growth_interval=1), "." * 10)
    ours = drive(GradScaler("cpu", init_scale=2.0**120, growth_interval=1), "." * 10)
    assert ours == ref and ref[-1] == CEILING


def test_the_one_difference_at_float32s_bottom():
    """torch's scale halves down to 0.0 and stays there; ours stops at the default floor 2**-149."""
    ref = drive(torch.amp.GradScaler("cpu", init_scale=1.0), "x" * 160)
    ours = drive(GradScaler("cpu", init_scale=1.0), "x" * 160)
    assert ours[:148] == ref[:148] and ours[148] == FLOOR
    assert ref[-1] == 0.0 and ours[-1] == FLOOR


def test_parity_with_factors_that_are_not_powers_of_two():
    kw = {"init_scale": 1000.0, "growth_factor": 1.7, "backoff_factor": 0.8, "growth_interval": 1}
    pattern = ".x.x..xx.." * 3
    assert drive(GradScaler("cpu", **kw), pattern) == drive(torch.amp.GradScaler("cpu", **kw), pattern)


def test_is_a_torch_gradscaler_whose_tensors_are_the_loss_scalers():
    s = ampray.GradScaler("cpu")
    assert isinstance(s, torch.amp.GradScaler)
    assert s._scale is None and s.get_scale() == 2.0**16  # lazy, as torch's
    s.scale(torch.ones(()))
    assert s._scale is s._loss_scaler.scale_tensor and s._growth_tracker is s._loss_scaler._growth_tracker
    s.load_state_dict(torch.amp.GradScaler("cpu", init_scale=4.0).state_dict())
    assert s._scale is s._loss_scaler.scale_tensor and s.get_scale() == 4.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_default_device_cuda_without_cuda_disables_like_torch():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        s = GradScaler()
    assert not s.is_enabled() and s.get_scale() == 1.0 and s.state_dict() == {}
    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    loss = s.scale(p.sum())
    loss.backward()
    s.step(opt)
    s.update()
    assert p.item() == 0.0 and s.stats().steps == 0


# ================================================================================================
# Part 3: the extras
# ================================================================================================
@pytest.mark.parametrize("refill, expected", [
    ("clean", [1024.0, 512.0, 256.0, 256.0, 256.0, 128.0]),
    ("growth", [1024.0, 512.0, 256.0, 256.0, 128.0, 64.0]),
])
def test_hysteresis_both_refill_rules(refill, expected):
    s = GradScaler("cpu", init_scale=1024.0, growth_interval=100, hysteresis=2, hysteresis_refill=refill)
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    values, skipped = [], []
    for ch in "xxx.xx":
        before = p.detach().clone()
        values += drive(s, ch, p, opt)
        skipped.append(torch.equal(before, p.detach()))
        assert bool(s.last_step_skipped) == (ch == "x")
    assert values == expected
    assert skipped == [True, True, True, False, True, True]  # a step is skipped within the budget too
    st = s.stats()
    assert (st.overflows, st.steps, st.skipped_steps) == (5, 6, 5)
    assert st.backoffs == (3 if refill == "clean" else 4)
    assert st.hysteresis_left == 0


def test_hysteresis_growth_refill_refills_when_the_scale_grows():
    s = GradScaler("cpu", init_scale=1024.0, growth_interval=2, hysteresis=2, hysteresis_refill="growth")
    assert drive(s, "xx..x") == [1024.0, 512.0, 512.0, 1024.0, 1024.0]
    assert s.stats().hysteresis_left == 1


def test_floor_and_ceiling():
    s = GradScaler("cpu", init_scale=1024.0, min_scale=256.0, max_scale=4096.0, growth_interval=1)
    assert drive(s, "xxxx") == [512.0, 256.0, 256.0, 256.0]
    assert drive(s, "....") == [512.0, 1024.0, 2048.0, 4096.0]
    assert drive(s, "..") == [4096.0, 4096.0]
    st = s.stats()
    # LossScaler counts a backoff each time the rule fires, also when the floor holds the scale
    assert (st.min_scale_seen, st.max_scale_seen, st.backoffs, st.overflows, st.growths) == (256.0, 4096.0, 4, 4, 6)


def test_skip_signals_without_a_sync():
    s = GradScaler("cpu", init_scale=8.0)
    assert s.last_step_skipped.dtype == torch.bool and not s.last_step_skipped
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    drive(s, "x", p, opt)
    flag = s.last_step_skipped
    assert flag.dtype == torch.bool and flag.shape == () and flag.device == s._scale.device and flag.item()
    drive(s, ".", p, opt)
    assert flag is s.last_step_skipped and not flag.item()  # the same tensor, updated in place
    st = s.stats()
    assert (st.steps, st.skipped_steps, st.overflows, st.scale) == (2, 1, 1, 4.0)


def test_attribution_counts_per_named_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    s = GradScaler("cpu", attribution=True).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        opt.zero_grad()
        s.scale(model(torch.randn(3, 4)).sum()).backward()
        if step in (1, 3, 4):
            model[1].weight.grad[0, 0] = INF
        if step == 4:
            model[0].bias.grad[2] = NAN
        s.step(opt)
        s.update()
    assert s.top_offenders() == [("1.weight", 3), ("0.bias", 1)]
    assert s.top_offenders(1) == [("1.weight", 3)]
    assert s.state_dict()["ampray"]["attribution"] == {"0.weight": 0, "0.bias": 1, "1.weight": 3, "1.bias": 0}
    plain = GradScaler("cpu")
    drive(plain, "x")
    assert plain.top_offenders() == [] and plain._counts is None


def test_attribution_unnamed_and_through_a_fused_optimizer():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([a, b], lr=0.1, fused=True)
    s = GradScaler("cpu", attribution=True)
    for step in range(3):
        opt.zero_grad()
        s.scale(a.sum() + b.sum()).backward()
        if step != 1:
            b.grad[1] = INF
        s.step(opt)  # the fused path: torch checks infs without unscaling
        s.update()
    assert s.top_offenders() == [("param1", 2)]
    assert s.stats().skipped_steps == 2


def test_consensus_setting_without_a_process_group():
    s = GradScaler("cpu", process_group="world")  # a single process: nothing to agree with, no collective
    assert drive(s, ".x.") == [2.0**16, 2.0**15, 2.0**15]
    s = GradScaler("cpu", process_group=object())
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        drive(s, ".")
    with pytest.raises(ConfigError, match=r"ampray.GradScaler.process_group='all' is not allowed"):
        GradScaler("cpu", process_group="all")


def test_settings_are_validated_and_keep_the_tracker():
    s = GradScaler("cpu", init_scale=64.0, growth_interval=3)
    drive(s, "..")
    assert s._get_growth_tracker() == 2
    assert s.set(growth_factor=4.0, hysteresis=2) == {"growth_factor": (2.0, 4.0), "hysteresis": (1, 2)}
    s.set_growth_interval(4)
    assert (s.get_growth_factor(), s.get_growth_interval(), s.hysteresis) == (4.0, 4, 2)
    assert s._get_growth_tracker() == 2
    assert drive(s, "..") == [64.0, 256.0]
    with pytest.raises(ConfigError, match=r"ampray.GradScaler.growth_factor=1.0 is not allowed"):
        s.set_growth_factor(1.0)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['scale'\]"):
        s.set(scale=2.0)
    assert s.get_growth_factor() == 4.0


@pytest.mark.parametrize("kw, match", [
    ({"hysteresis": 0}, r"ampray.GradScaler.hysteresis=0 is not allowed: expected an integer >= 1"),
    ({"hysteresis_refill": "never"}, r"ampray.GradScaler.hysteresis_refill='never' is not allowed"),
    ({"min_scale": 2.0**17}, r"ampray.GradScaler.init_scale=65536.0 is not allowed: expected min_scale="),
    ({"max_scale": 2.0**10}, r"ampray.GradScaler.init_scale=65536.0 is not allowed"),
    ({"min_scale": 0.0}, r"ampray.GradScaler.min_scale=0.0 is not allowed: expected a number > 0"),
])
def test_constructor_errors_name_field_value_and_rule(kw, match):
    with pytest.raises(ConfigError, match=match):
        GradScaler("cpu", **kw)


def test_constructor_keeps_torchs_own_checks():
    with pytest.raises(AssertionError, match="growth factor must be > 1.0"):
        GradScaler("cpu", growth_factor=1.0)
    with pytest.raises(TypeError):
        GradScaler("cpu", 2.0**16, 2.0, 0.5, 2000, True, 2)  # the extras are keyword-only


@pytest.mark.parametrize("lazy", [True, False])
def test_state_round_trip_keeps_the_budget_and_the_counters(lazy):
    kw = {"init_scale": 1024.0, "growth_interval": 3, "hysteresis": 3, "min_scale": 8.0, "max_scale": 2.0**20}
    whole = GradScaler("cpu", **kw)
    expected = drive(whole, "x.x" + "xx..x...")
    first = GradScaler("cpu", **kw)
    drive(first, "x.x")
    saved = first.state_dict()
    assert saved["ampray"]["hysteresis_left"] == 2 and saved["ampray"]["overflows"] == 2
    resumed = GradScaler("cpu")  # the saved settings replace the constructor's, as torch's keys do
    if not lazy:
        resumed.scale(torch.ones(()))
    resumed.load_state_dict(saved)
    assert (resumed.hysteresis, resumed.min_scale, resumed.max_scale, resumed.get_growth_interval()) == (3, 8.0, 2.0**20, 3)
    assert resumed.stats() == first.stats()
    assert expected[3:] == drive(resumed, "xx..x...")
    assert resumed.stats() == whole.stats()


def test_torchs_gradscaler_loads_ours_and_continues_identically():
    ours = GradScaler("cpu", init_scale=256.0, growth_interval=2)
    drive(ours, "..x.")
    saved = ours.state_dict()
    assert set(saved) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker", "ampray"}
    ref = torch.amp.GradScaler("cpu")
    ref.load_state_dict(saved)  # reads its five keys, ignores "ampray"
    assert ref.state_dict() == {k: v for k, v in saved.items() if k != "ampray"}
    assert drive(ref, "x...x..") == drive(ours, "x...x..")


def test_ours_loads_torchs_with_its_own_extras_a_full_budget_and_zero_counters():
    ref = torch.amp.GradScaler("cpu", init_scale=512.0, growth_factor=4.0, growth_interval=2)
    drive(ref, ".x.")
    ours = GradScaler("cpu", hysteresis=2, min_scale=64.0)
    drive(ours, "x")
    ours.load_state_dict(ref.state_dict())
    st = ours.stats()
    assert (st.scale, st.growth_tracker, st.hysteresis_left, st.overflows, st.steps, st.skipped_steps) == \
        (256.0, 1, 2, 0, 0, 0)
    assert (ours.get_growth_factor(), ours.hysteresis, ours.min_scale) == (4.0, 2, 64.0)
    assert drive(ours, ".xx") == [1024.0, 1024.0, 512.0]


def test_pickle_keeps_the_extras():
    model = nn.Linear(3, 1)
    s = GradScaler("cpu", init_scale=64.0, hysteresis=3, attribution=True).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (True, False, True):
        opt.zero_grad()
        s.scale(model(torch.ones(2, 3)).sum()).backward()
        if bad:
            model.weight.grad[0, 1] = INF
        s.step(opt)
        s.update()
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.stats() == s.stats() and s2.stats().hysteresis_left == 2
    assert s2.top_offenders() == s.top_offenders() == [("weight", 2)]
    opt.zero_grad()
    s2.scale(model(torch.ones(2, 3)).sum()).backward()  # re-created lazily, counting on
    model.weight.grad[0, 0] = INF
    s2.step(opt)
    s2.update()
    assert s2.top_offenders() == [("weight", 3)] and s2.stats().skipped_steps == 3
