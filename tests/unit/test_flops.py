"""Throughput in flops and MFU: the model's flops per sample (built-in formula, or a user model's own
method) and the device's peak for the precision in use."""

import pytest
import torch
from torch import nn

from ampray.actors.worker import interval_throughput
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.amp.flops import peak_flops, precision_name
from ampray.models import build_model
from ampray.models.registry import model_flops_per_sample, resolve_spec


def test_builtin_gpt_counts_the_batch_sequence_length():
    spec = resolve_spec("gpt")
    model = build_model("gpt", preset="nano")
    x = torch.zeros(2, 32, dtype=torch.long)
    assert model_flops_per_sample(spec, model, x) == model.flops_per_token(32) * 32
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.module = model  # what DDP holds: the formula sees the inner model
    assert model_flops_per_sample(spec, wrapped, x) == model.flops_per_token(32) * 32


class Own(nn.Linear):
    def flops_per_sample(self):
        return 6 * self.in_features * self.out_features


class Broken(nn.Linear):
    def flops_per_sample(self, x):
        raise RuntimeError("no")


def test_a_user_model_gives_its_own_flops_or_none():
    spec = resolve_spec("", factory="torch.nn:Linear")
    assert model_flops_per_sample(spec, Own(4, 3), torch.zeros(2, 4)) == 72
    assert model_flops_per_sample(spec, nn.Linear(4, 3), torch.zeros(2, 4)) is None
    assert model_flops_per_sample(spec, Broken(4, 3), torch.zeros(2, 4)) is None  # never stops the run


def test_peaks(monkeypatch):
    monkeypatch.delenv("AMPRAY_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert precision_name(torch.float16) == "fp16" and precision_name(None) in ("fp32", "tf32")
    monkeypatch.setenv("AMPRAY_PEAK_TFLOPS", "2.5")
    assert peak_flops(torch.device("cpu"), torch.bfloat16) == 2.5e12


def test_reports_carry_tflops_and_mfu_when_the_peak_is_known(monkeypatch):
    monkeypatch.setenv("AMPRAY_PEAK_TFLOPS", "0.001")  # 1 GFLOP/s
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=torch.bfloat16), torch.device("cpu"))
    # 16 samples a step at 0.5 s a step: 32 samples/s, of 100 tokens and 192 flops each.
    m = interval_throughput(eng, 0.5, 16, 100, 192)
    assert m == {"perf/interval_samples_per_s": 32.0, "perf/interval_tokens_per_s": 3200.0,
                 "perf/tflops_per_s": 32 * 192 / 1e12, "perf/mfu": 32 * 192 / 1e9}
    monkeypatch.delenv("AMPRAY_PEAK_TFLOPS")
    m = interval_throughput(eng, 0.5, 16, 0, 192)
    assert "perf/tflops_per_s" in m and "perf/mfu" not in m and "perf/interval_tokens_per_s" not in m
    assert interval_throughput(eng, 0.0, 16, 0, 192) == {}


def test_ampray_bench_rows_carry_tflops_and_mfu_against_the_precisions_peak(monkeypatch):
    from ampray.orchestrator.interface import benchmark_mixed_precision_interface

    monkeypatch.delenv("AMPRAY_PEAK_TFLOPS", raising=False)
    plain = benchmark_mixed_precision_interface("mlp", 16, num_iterations=2, warmup=1, device="cpu",
                                                precisions=["fp32"])
    row = plain["rows"][0]
    assert row["tflops_per_s"] > 0 and row["mfu"] is None  # a CPU has no known peak
    monkeypatch.setenv("AMPRAY_PEAK_TFLOPS", "0.5")
    peaked = benchmark_mixed_precision_interface("mlp", 16, num_iterations=2, warmup=1, device="cpu",
                                                 precisions=["fp32"])
    row = peaked["rows"][0]
    assert row["mfu"] == pytest.approx(row["tflops_per_s"] / 0.5, rel=1e-3)  # both to 4 significant digits


def test_the_final_table_shows_tokens_mfu_and_rollbacks_when_reported():
    from types import SimpleNamespace

    from rich.console import Console

    from ampray.orchestrator.cli import final_table

    final = {r: {"step": 40, "loss": 2.0, "perf/samples_per_s": 100.0, "perf/interval_tokens_per_s": 4096.0 * (r + 1),
                 "perf/mfu": 0.25 + 0.1 * r, "scaler/scale": 1.0, "events/rollback": 1.0} for r in range(2)}
    outcome = SimpleNamespace(num_workers=2, use_gpu=True, run_dir="/runs/x", final=final, aggregate={})
    console = Console(width=200, record=True)
    console.print(final_table(outcome))
    text = console.export_text()
    assert "tokens/s" in text and "MFU %" in text and "rollbacks" in text
    assert "4,096" in text and "8,192" in text and "25.0" in text and "35.0" in text
    assert "12,288 tokens/s" in text and "MFU 30.0% (mean)" in text
    plain = {0: {"step": 40, "loss": 2.0, "perf/samples_per_s": 100.0, "scaler/scale": 1.0}}
    console = Console(width=200, record=True)
    console.print(final_table(SimpleNamespace(num_workers=1, use_gpu=False, run_dir="/r", final=plain, aggregate={})))
    text = console.export_text()
    assert "tokens/s" not in text and "MFU" not in text and "rollbacks" not in text
