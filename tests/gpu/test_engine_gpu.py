"""The engine on a CUDA GPU: precisions, synchronisation count, real OOM splitting, resume, fused
optimizers and channels_last, fp32 islands, the bf16 fallback and the benchmark helper."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ampray import benchmark_mixed_precision
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer, piece_bounds
from ampray.data.synthetic import SyntheticConfig, make_dataset
from ampray.models import build_criterion, build_model, example_batch

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def gpt_setup(dtype, **cfg):
    torch.manual_seed(0)
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=dtype, **cfg), CUDA)
    model = eng.prepare_model(build_model("gpt", preset="micro"))
    opt = eng.build_optimizer(model, "adamw", lr=3e-3)
    return eng, model, opt


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gpt_learns_under_each_precision(dtype):
    eng, model, opt = gpt_setup(dtype)
    x, y = make_dataset("gpt", SyntheticConfig(num_samples=32, seq_len=128))
    x, y = x.cuda(), y.cuda()
    losses = [float(eng.train_step(model, opt, build_criterion("gpt"), x, y)["loss"]) for _ in range(60)]
    assert losses[-1] < 0.7 * losses[0]  # from the uniform ~5.5 towards the chain's log(4) ~ 1.4
    info = eng.get_performance_summary()["scaler_info"]
    assert info["autocast_dtype"] == ("float16" if dtype == "fp16" else "bfloat16")
    assert info["enabled"] == (dtype == "fp16")


def _count_syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@pytest.mark.parametrize("dtype,policy,fused,expected", [
    ("fp16", "skip", True, 0), ("bf16", "skip", True, 0), ("bf16", "ignore", True, 0),
    ("fp16", "skip", False, 1), ("bf16", "skip", False, 1), ("bf16", "ignore", False, 0),
])
def test_syncs_per_step(dtype, policy, fused, expected):
    """Fused optimizers: the skip stays on the device (no sync); others: one sync per optimizer step,
    as GradScaler.step; accumulation micro-steps never sync."""
    eng, model, _ = gpt_setup(dtype, gradient_accumulation_steps=4, nonfinite_loss_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    x, y = example_batch("gpt", {"preset": "micro"}, 8, torch.Generator().manual_seed(0))
    x, y = x.cuda(), y.cuda()
    crit = build_criterion("gpt")
    for _ in range(8):  # warm-up: lazy state (optimizer buffers, cuBLAS handles) is created here
        eng.train_step(model, opt, crit, x, y)
    micro = _count_syncs(lambda: [eng.train_step(model, opt, crit, x, y) for _ in range(3)])
    boundary = _count_syncs(lambda: eng.train_step(model, opt, crit, x, y))
    assert micro == 0
    assert boundary == expected
    assert eng.get_performance_summary()["performance"]["optimizer_steps"] == 3


def test_two_fused_optimizers_with_a_scheduler_make_no_sync_and_skip_together():
    eng, model, _ = gpt_setup("fp16", gradient_accumulation_steps=2)
    params = list(model.parameters())
    opts = [torch.optim.AdamW(params[:4], lr=1e-3, fused=True), torch.optim.SGD(params[4:], lr=1e-3, fused=True)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, 0.9) for o in opts]
    x, y = example_batch("gpt", {"preset": "micro"}, 8, torch.Generator().manual_seed(0))
    x, y, crit = x.cuda(), y.cuda(), build_criterion("gpt")
    for _ in range(8):
        eng.train_step(model, opts, crit, x, y, scheds)
    assert _count_syncs(lambda: [eng.train_step(model, opts, crit, x, y, scheds) for _ in range(4)]) == 0
    h = params[-1].register_hook(lambda g: torch.full_like(g, float("inf")))
    before = [p.detach().clone() for p in params]
    eng.train_step(model, opts, crit, x, y, scheds)
    out = eng.train_step(model, opts, crit, x, y, scheds)
    h.remove()
    assert bool(out.skipped) and out.scale.item() == out.scale_used.item() / 2
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # the first optimizer skipped too
    eng.records()  # books the deferred step
    assert [s.last_epoch for s in scheds] == [6, 6]  # 6 clean optimizer steps; the skipped one is not counted


def test_real_oom_is_split_and_training_continues():
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    hidden = 65536
    rows = int(1.2 * free / (hidden * 2 * 2))  # the forward's bf16 activations alone exceed free memory
    torch.manual_seed(0)
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", oom_policy="split"), CUDA)
    model = eng.prepare_model(nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(rows, 64, device=CUDA)
    y = torch.randint(0, 4, (rows,), device=CUDA)
    eng.train_step(model, opt, F.cross_entropy, x, y)
    # Near the memory limit a half may still fail in backward after another half has added its
    # gradients; that window is dropped (not applied wrongly). Later batches start at the learnt size.
    perf = eng.get_performance_summary()["performance"]
    assert perf["oom_events"] >= 1 and perf["oom_split_retries"] >= 1
    assert perf["oom_pieces"] >= 2
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):  # every failure halves the chunk: a step applies within a few batches
        out = eng.train_step(model, opt, F.cross_entropy, x, y)
        if not out.skipped:
            break
    assert not out.skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    pieces, events = eng.counters.pieces, eng.counters.oom_events
    with torch.no_grad(), eng.autocast():
        ref = sum(F.cross_entropy(model[2](model[1](model[0](x[a:b]))), y[a:b]).float() * ((b - a) / rows)
                  for a, b in piece_bounds(rows, pieces))
    out3 = eng.train_step(model, opt, F.cross_entropy, x, y)
    assert not out3.skipped and eng.counters.oom_events == events  # settled: no new OOM
    assert float(out3["loss"]) == pytest.approx(float(ref), rel=1e-2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_on_gpu_is_bitwise(tmp_path):
    def fresh():
        torch.manual_seed(0)
        eng = MixedPrecisionTrainer(MixedPrecisionConfig(init_scale=2.0**20, growth_interval=3), CUDA)
        model = eng.prepare_model(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
        return eng, model, eng.build_optimizer(model, "adamw", lr=1e-2)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 32, generator=g).cuda() * 100, torch.randint(0, 8, (16,), generator=g).cuda())
            for _ in range(20)]
    e_full, m_full, o_full = fresh()
    full = [e_full.train_step(m_full, o_full, F.cross_entropy, x, y).scale.item() for x, y in data]
    e1, m1, o1 = fresh()
    first = [e1.train_step(m1, o1, F.cross_entropy, x, y).scale.item() for x, y in data[:9]]
    e1.save_scaler_state(tmp_path / "engine.pt")
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, tmp_path / "rest.pt")
    e2, m2, o2 = fresh()
    rest = torch.load(tmp_path / "rest.pt", weights_only=True)
    m2.load_state_dict(rest["m"])
    o2.load_state_dict(rest["o"])
    e2.load_scaler_state(tmp_path / "engine.pt")
    second = [e2.train_step(m2, o2, F.cross_entropy, x, y).scale.item() for x, y in data[9:]]
    assert first + second == full
    for p, q in zip(m2.parameters(), m_full.parameters()):
        assert torch.equal(p, q)


def test_memory_efficient_cnn_is_channels_last_with_a_fused_optimizer():
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16"), CUDA)
    model = eng.prepare_model(build_model("cnn", arch="resnet18", num_classes=10))
    opt = eng.build_optimizer(model, "adamw", lr=1e-3)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.defaults["fused"] is True
    x, y = example_batch("cnn", {"arch": "resnet18", "num_classes": 10}, 32, torch.Generator().manual_seed(0))
    x, y = x.cuda(), y.cuda()
    losses = [float(eng.train_step(model, opt, F.cross_entropy, x, y)["loss"]) for _ in range(10)]
    assert losses[-1] < losses[0]
    plain = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", memory_efficient=False), CUDA)
    m2 = plain.prepare_model(build_model("cnn", arch="resnet18", num_classes=10))
    assert next(m for m in m2.modules() if isinstance(m, nn.Conv2d)).weight.is_contiguous()
    assert not plain.build_optimizer(m2, "adamw").defaults.get("fused")


def test_fp32_island_on_cuda():
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp16", fp32_modules=("2",)), CUDA)
    model = eng.prepare_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("0", o.dtype))
    model[2].register_forward_hook(lambda m, i, o: seen.__setitem__("2", o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng.train_step(model, opt, F.cross_entropy, torch.randn(4, 8), torch.randint(0, 4, (4,)))
    assert seen == {"0": torch.float16, "2": torch.float32}


def test_scale_collapse_falls_back_to_bf16_on_the_gpu():
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(init_scale=1.0, collapse_patience=2,
                                                     collapse_policy="fallback_bf16"), CUDA)
    model = eng.prepare_model(nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    h = model.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    for _ in range(2):
        eng.train_step(model, opt, F.cross_entropy, torch.randn(4, 8), torch.randint(0, 4, (4,)))
    h.remove()
    # Decided at the collapse, applied at the next window's start (the same step on every rank).
    assert eng.fallback_due and eng.events[-1]["action"] == "fallback_bf16"
    out = eng.train_step(model, opt, F.cross_entropy, torch.randn(4, 8), torch.randint(0, 4, (4,)))
    assert eng.amp_dtype == torch.bfloat16 and not eng.fallback_due
    assert not out.skipped


def test_benchmark_reports_every_precision_with_memory():
    torch.manual_seed(0)
    model = build_model("mlp", in_features=256, hidden=1024, depth=2, num_classes=10)
    data = (torch.randn(256, 256), torch.randint(0, 10, (256,)))
    res = benchmark_mixed_precision(model, data, num_iterations=10)
    assert set(res["results"]) >= {"fp32", "tf32", "fp16", "bf16"}
    for name, row in res["results"].items():
        assert row["median_step_time_s"] > 0 and row["peak_memory_bytes"] > 0
        expected = (res["results"]["fp32"]["median_step_time_s"] / row["median_step_time_s"] - 1) * 100
        assert row["speed_improvement_percent"] == pytest.approx(expected)


def test_scale_update_as_a_cuda_graph_equals_the_eager_update():
    """The captured update follows the eager one exactly: hysteresis, floor, ceiling, a NaN-loss mask,
    settings changed mid-run (recapture) and a state reload (new tensors, recapture)."""
    from ampray.amp.scaler import LossScaler

    def run(graphs: bool):
        s = LossScaler(MixedPrecisionConfig(init_scale=1024.0, hysteresis=2, growth_interval=3, min_scale=4.0,
                                            max_scale=4096.0), CUDA)
        s.use_graphs = graphs
        states = []
        for i, ch in enumerate("..x.xx......xxxxxxxxxxxxn.n....x.xx....................."):
            if i == 12:
                s.set(growth_factor=4.0, hysteresis=1)
            if i == 30:
                s.load_state_dict(s.state_dict())
            found = torch.tensor(1.0 if ch in "xn" else 0.0, device=CUDA)
            valid = torch.tensor(ch != "n", device=CUDA) if i % 2 else None
            s.update(found, valid=valid)
            states.append(s.state_dict())
        return states, s

    eager, _ = run(False)
    graphed, s = run(True)
    assert graphed == eager
    assert s.use_graphs and s._graphs  # the graph path was taken, not silently dropped
    assert {st["scale"] for st in eager} >= {4.0, 4096.0}  # the floor and the ceiling were both reached


def test_deferred_booking_of_several_steps_equals_booking_each_at_once():
    """Without a scheduler up to `depth` device-side steps wait for their booking (the host never waits
    on the device while it has work to launch); the history, counters and collapse are the same."""
    def run(depth):
        torch.manual_seed(0)
        eng = MixedPrecisionTrainer(MixedPrecisionConfig(init_scale=2.0**6, min_scale=4.0, growth_interval=3,
                                                         hysteresis=2, collapse_patience=3,
                                                         collapse_policy="fallback_bf16"), CUDA)
        eng.stepper.depth = depth
        model = eng.prepare_model(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)))
        opt = eng.build_optimizer(model, "adamw", lr=1e-2)
        g = torch.Generator().manual_seed(1)
        bad = {3, 4, 5, 9, *range(14, 31)}  # the collapse (step 22) is booked before the overflows end
        for i in range(40):
            h = model[2].weight.register_hook(lambda g: torch.full_like(g, float("inf"))) if i in bad else None
            eng.train_step(model, opt, F.cross_entropy, torch.randn(16, 32, generator=g).cuda(),
                           torch.randint(0, 8, (16,), generator=g).cuda())
            if h is not None:
                h.remove()
        summary = eng.get_performance_summary()
        return (summary["performance"]["skipped_steps"], summary["scaler_info"]["scale_history"],
                [e["kind"] for e in eng.events], str(eng.amp_dtype), [p.detach().cpu() for p in model.parameters()])

    tight, deep = run(1), run(4)
    assert tight[:4] == deep[:4] and "scale_collapse" in tight[2]
    for p, q in zip(tight[4], deep[4]):
        assert torch.equal(p, q)
