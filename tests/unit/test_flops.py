"""Throughput in flops and MFU: the model's flops per sample (built-in formula, or a user model's own
method) and the device's peak for the precision in use."""

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
