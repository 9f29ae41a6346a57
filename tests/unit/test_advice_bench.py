"""CPU tests of the advice functions (tiers, rule, recommendations, errors) and the precision benchmark."""

from __future__ import annotations

import math
import os
import re
import statistics
import threading
import time

import pytest
import torch
from torch import nn

from ampray.amp import advice
from ampray.amp.advice import (
    create_mixed_precision_config,
    detect_hardware,
    estimate_memory,
    explain_mixed_precision,
    get_mixed_precision_recommendations,
    optimize_mixed_precision_settings,
    should_use_mixed_precision,
)
from ampray.amp.bench import available_precisions, benchmark_mixed_precision, format_bench_table, tf32_mode
from ampray.amp.config import MixedPrecisionConfig
from ampray.models import build_model, example_batch

GiB = 2**30


class _Blob(nn.Module):
    """A model of `n` parameters that allocates nothing: one meta-device parameter."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, device="meta"))


def _fake_hw(**overrides):
    hw = dict(device_type="cpu", device_name="fake", total_memory_bytes=64 * GiB, compute_capability=None,
              tensor_cores=False, bf16=True, bf16_accelerated=False, fp16=True, fp16_accelerated=False,
              tf32=False, cpu_capability="AVX2")
    return {**hw, **overrides}


def _cuda_hw(major: int):
    return _fake_hw(device_type="cuda", device_name=f"gpu sm{major}0", compute_capability=f"{major}.0",
                    tensor_cores=major >= 7, bf16=major >= 8, bf16_accelerated=major >= 8, tf32=major >= 8,
                    fp16_accelerated=major >= 7, cpu_capability=None)


@pytest.fixture
def hw(monkeypatch):
    """Replace the detected hardware, so the rule is tested the same way on every host."""
    def use(facts):
        monkeypatch.setattr(advice, "detect_hardware", lambda device=None: facts)
    return use


# -- model facts -------------------------------------------------------------------------------------
def test_param_count_works_on_meta_tensors():
    assert estimate_memory(nn.Linear(10_000, 10_000, device="meta"), 1)["num_params"] == 100_010_000
    assert estimate_memory(_Blob(3_000_000_000), 1)["num_params"] == 3_000_000_000


def test_memory_estimate_scales_with_batch_and_halves_activations_under_autocast():
    with torch.device("meta"):
        model = build_model("gpt", preset="small")
    fp32, half = estimate_memory(model, 8), estimate_memory(model, 8, half_precision=True)
    assert fp32["total_bytes"] == fp32["static_bytes"] + 8 * fp32["activation_bytes_per_sample"]
    assert half["activation_bytes_per_sample"] * 2 == fp32["activation_bytes_per_sample"]
    # 124M parameters x 16 bytes (weights, grads, two Adam moments).
    assert fp32["static_bytes"] == 16 * fp32["num_params"]


# -- tiers -------------------------------------------------------------------------------------------
TIER_CASES = [  # (params, init_scale, growth_factor, growth_interval, hysteresis): the table in advice._TIERS
    (1_000, 2.0**16, 2.0, 1000, 1),
    (50_000_000, 2.0**16, 2.0, 2000, 1),
    (500_000_000, 2.0**18, 1.5, 4000, 2),
    (2_000_000_000, 2.0**20, 1.25, 8000, 2),
]


@pytest.mark.parametrize("params,init_scale,growth,interval,hysteresis", TIER_CASES)
def test_tiers_give_documented_scaler_settings(hw, params, init_scale, growth, interval, hysteresis):
    hw(_cuda_hw(7))
    cfg = optimize_mixed_precision_settings(_Blob(params), 4, 1e15)
    assert (cfg.init_scale, cfg.growth_factor, cfg.growth_interval, cfg.hysteresis) == (
        init_scale, growth, interval, hysteresis)


def test_larger_models_get_higher_init_scale_and_gentler_growth(hw):
    hw(_cuda_hw(7))
    cfgs = [optimize_mixed_precision_settings(_Blob(c[0]), 4, 1e15) for c in TIER_CASES]
    assert [c.init_scale for c in cfgs] == sorted(c.init_scale for c in cfgs)
    assert cfgs[-1].init_scale > cfgs[0].init_scale
    assert cfgs[-1].growth_factor < cfgs[0].growth_factor
    assert cfgs[-1].growth_interval > cfgs[0].growth_interval and cfgs[-1].hysteresis == 2


def test_dtype_follows_hardware(hw):
    hw(_cuda_hw(7))  # Volta: tensor cores, no bf16
    cfg = optimize_mixed_precision_settings(_Blob(1000), 4, 1e12)
    assert cfg.dtype == torch.float16 and cfg.scaling_enabled
    hw(_cuda_hw(9))  # Hopper: bf16, so the config turns scaling off
    cfg = optimize_mixed_precision_settings(_Blob(1000), 4, 1e12)
    assert cfg.dtype == torch.bfloat16 and cfg.enabled and not cfg.scaling_enabled


def test_accumulation_steps_make_the_micro_batch_fit(hw):
    hw(_cuda_hw(9))
    with torch.device("meta"):
        model = build_model("gpt", preset="small")
    memory = 8 * GiB
    cfg = optimize_mixed_precision_settings(model, 64, memory)
    k = cfg.gradient_accumulation_steps
    est = estimate_memory(model, 64, half_precision=True)
    micro = lambda k: math.ceil(64 / k)  # noqa: E731
    fits = lambda k: est["static_bytes"] + micro(k) * est["activation_bytes_per_sample"] <= 0.9 * memory  # noqa: E731
    assert k > 1 and fits(k) and not fits(k - 1)
    assert optimize_mixed_precision_settings(model, 64, 1000 * GiB).gradient_accumulation_steps == 1


# -- the rule ----------------------------------------------------------------------------------------
def test_rule_cuda_tensor_cores_say_yes(hw):
    hw(_cuda_hw(8))
    use, reasons = explain_mixed_precision(nn.Linear(4, 4), 1, 1e12)
    assert use and "tensor cores" in reasons[0]


def test_rule_small_model_on_cpu_without_bf16_says_no(hw):
    hw(_fake_hw())
    use, reasons = explain_mixed_precision(nn.Linear(4, 4), 1, 1e12)
    assert not use and "no native bf16" in reasons[0]
    hw(_fake_hw(bf16_accelerated=True))  # native bf16, but too small to gain
    assert not should_use_mixed_precision(nn.Linear(4, 4), 1, 1e12)
    assert should_use_mixed_precision(nn.Linear(2000, 2000, device="meta"), 1, 1e12)


def test_rule_memory_pressure_says_yes_on_any_device(hw):
    hw(_fake_hw())
    use, reasons = explain_mixed_precision(_Blob(100_000_000), 1, 1 * GiB)  # 1.6 GB of fp32 state
    assert use and "exceeds" in reasons[0]


def test_recommendations_on_this_host_name_dtype_and_reasons():
    rec = get_mixed_precision_recommendations()
    assert rec["recommended_dtype"] in ("bf16", "fp16", "fp32")
    assert rec["reasons"] and all(isinstance(r, str) and r for r in rec["reasons"])
    assert rec["hardware"] == detect_hardware()
    cfg = MixedPrecisionConfig.from_dict(rec["config"])
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rec["recommended_dtype"])
    assert (cfg.autocast_enabled, cfg.dtype if expected else None) == (rec["use_mixed_precision"], expected)
    if not torch.cuda.is_available():
        assert rec["hardware"]["device_type"] == "cpu" and rec["use_tf32"] is False


def test_recommendations_with_a_model_use_its_tuned_config(hw):
    hw(_cuda_hw(9))
    rec = get_mixed_precision_recommendations(_Blob(2_000_000_000), batch_size=2, available_memory=1e15)
    assert rec["recommended_dtype"] == "bf16" and rec["use_tf32"]
    assert rec["config"]["init_scale"] == 2.0**20 and rec["config"]["dtype"] == "bfloat16"


def test_create_config():
    cfg = create_mixed_precision_config(dtype="bf16", init_scale=1024.0, memory_efficient=False)
    assert (cfg.dtype, cfg.init_scale, cfg.memory_efficient, cfg.enabled) == (torch.bfloat16, 1024.0, False, True)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(batch_size=0, available_memory=1e9), "batch_size=0"),
    (dict(batch_size=2.5, available_memory=1e9), "batch_size=2.5"),
    (dict(batch_size=1, available_memory=0), "available_memory=0"),
    (dict(batch_size=1, available_memory=-1.0), "available_memory=-1.0"),
])
def test_advice_errors_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        optimize_mixed_precision_settings(nn.Linear(2, 2), **kwargs)
    with pytest.raises(ValueError, match=needle):
        should_use_mixed_precision(nn.Linear(2, 2), **kwargs)


# -- benchmark ---------------------------------------------------------------------------------------
@pytest.fixture
def mlp_batch():
    torch.manual_seed(0)
    model = build_model("mlp", in_features=16, hidden=32, depth=2, num_classes=4)
    return model, example_batch("mlp", model.config, 8)


def test_benchmark_gives_one_consistent_result_per_precision(mlp_batch):
    model, batch = mlp_batch
    before = [p.detach().clone() for p in model.parameters()]
    out = benchmark_mixed_precision(model, batch, num_iterations=3, warmup=1, device="cpu")
    assert out["device"] == "cpu" and set(out["results"]) == set(available_precisions("cpu"))
    medians = {p: statistics.median(t) for p, t in out["step_times_s"].items()}
    for p, r in out["results"].items():
        assert len(out["step_times_s"][p]) == r["iterations"] == 3
        assert r["median_step_time_s"] == medians[p]
        assert out["speed_improvement_percent"][p] == (medians["fp32"] / medians[p] - 1) * 100
        assert r["speed_improvement_percent"] == out["speed_improvement_percent"][p]
        assert r["throughput_samples_per_s"] == 8 / medians[p]
        assert r["peak_memory_bytes"] is None and out["memory_savings_percent"][p] is None
    assert out["speed_improvement_percent"]["fp32"] == 0.0
    assert out["best"] == min(medians, key=medians.get)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # copies were trained
    rows = format_bench_table(out)
    assert [r["precision"] for r in rows] == list(out["results"]) and sum(r["best"] for r in rows) == 1


def test_benchmark_without_target_and_fp32_baseline_always_first(mlp_batch):
    model, (x, _) = mlp_batch
    out = benchmark_mixed_precision(model, x, num_iterations=1, warmup=0, precisions=["bf16"], device="cpu")
    assert list(out["results"]) == ["fp32", "bf16"]
    assert all(math.isfinite(t) and t > 0 for ts in out["step_times_s"].values() for t in ts)


def test_benchmark_compiles_torch_containers_too():
    """An nn.Sequential's own forward is torch's code, which Module.compile() would leave eager: the
    benchmark compiles it through a forward of its own."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    before = counters["stats"]["unique_graphs"]
    out = benchmark_mixed_precision(model, (x, y), num_iterations=1, warmup=1, precisions=["fp32"],
                                    device="cpu", compile=True)
    assert out["compiled"] is True and counters["stats"]["unique_graphs"] > before
    assert benchmark_mixed_precision(model, (x, y), num_iterations=1, warmup=0, device="cpu")["compiled"] is False


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_iterations=0), "num_iterations=0"),
    (dict(num_iterations=3, warmup=-1), "warmup=-1"),
    (dict(num_iterations=1, precisions=["fp8"]), "'fp8'"),
    (dict(num_iterations=1, warmup=0, compile=True), "warmup=0 with compile=True"),
])
def test_benchmark_errors_name_the_argument(mlp_batch, kwargs, needle):
    model, batch = mlp_batch
    with pytest.raises(ValueError, match=needle):
        benchmark_mixed_precision(model, batch, device="cpu", **kwargs)


def test_tf32_mode_restores_the_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_mode(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with tf32_mode(False):
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_step_profiler_cpu_mode_counts_the_busy_thread_without_the_profiler(tmp_path):
    from ampray.amp.bench import StepProfiler

    out = tmp_path / "p.txt"
    prof = StepProfiler("2:3:cpu", out)
    x = torch.randn(64, 64)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(6):
        deadline = time.perf_counter() + 0.05
        while time.perf_counter() < deadline:  # 50 ms of wall time per step, busy on this thread
            x = (x @ x).tanh()
        prof.step()
    # The share of a core this thread got, measured here: on an idle host about 1, on a busy one less.
    share = (time.thread_time() - cpu0) / (time.perf_counter() - wall0)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("steps 2..4: wall ") and "not profiled" in lines[0]
    assert lines[1].startswith(f"env: pid {os.getpid()}")
    # The looping thread (this one) is reported with the share of a core it used, whatever the host's load.
    tid = threading.get_native_id()
    used = float(re.search(rf"\[{tid}\] ([0-9.]+)", lines[2]).group(1))
    assert abs(used - share) <= 0.3 and used > 0.05, (lines[2], share)
    assert "Self CPU" not in out.read_text()  # no operator tables: the profiler never ran


@pytest.mark.parametrize("spec", ["3", "a:b", "1:0", "-1:2", "1:2:gpu"])
def test_step_profiler_rejects_a_bad_spec_naming_it(spec):
    from ampray.amp.bench import StepProfiler

    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        StepProfiler(spec, "unused.txt")
