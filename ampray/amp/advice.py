"""Advice from hardware and model facts: whether to use mixed precision, which dtype, which scaler settings.

Everything here is an estimate from first principles (parameter counts, a rough activation size, what the
device can do); `benchmark_mixed_precision` measures. Model facts come from parameter shapes only, so a
model built on the meta device (`with torch.device("meta"): ...`) is advised on without allocating it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ampray.amp.autocast import autocast_supported, default_device
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.memory import total_device_memory
from ampray.amp.state import count_params

# fp32 weights (4) + gradients (4) + Adam's two moments (8): the resident bytes per parameter of a run.
_STATIC_BYTES_PER_PARAM = 16
# Tensors saved for backward per layer output (the output itself plus inputs of activations, norm
# statistics, masks). With _positions_per_sample below this lands within ~25% of the measured saved bytes
# of the zoo's GPT-2 small (seq 1024: estimate 893 MiB/sample, measured 779) and ResNet-50 (224px: 62 vs 82).
_SAVED_PER_OUTPUT = 1.5
# Fraction of device memory a run may plan to use: the caching allocator fragments and the CUDA context,
# cuDNN workspaces and the autocast weight cache need the rest.
_HEADROOM = 0.9
# Below this many parameters a CPU step is dominated by per-op overhead; autocast's casts add to it.
_SMALL_MODEL_PARAMS = 1_000_000

# Scaler tiers by parameter count. Larger models have smaller per-element gradients (fan-in scaled
# initialisation, averaging over more tokens), so fp16 underflow is the early risk: start higher (an
# initial overflow only costs a few skipped steps, each halving the scale). Growth is gentler and
# hysteresis 2 tolerates an isolated spike, because every overflow-backoff cycle skips an expensive step.
_TIERS: tuple[tuple[float, str, dict[str, Any]], ...] = (
    (10e6, "small (<10M)", dict(init_scale=2.0**16, growth_factor=2.0, growth_interval=1000, hysteresis=1)),
    (100e6, "medium (<100M)", dict(init_scale=2.0**16, growth_factor=2.0, growth_interval=2000, hysteresis=1)),
    (1e9, "large (<1B)", dict(init_scale=2.0**18, growth_factor=1.5, growth_interval=4000, hysteresis=2)),
    (math.inf, "xl (>=1B)", dict(init_scale=2.0**20, growth_factor=1.25, growth_interval=8000, hysteresis=2)),
)


# -- hardware ------------------------------------------------------------------------------------------
def _cpu_features() -> dict[str, bool]:
    """Native bf16/fp16 instructions of the CPU (AVX512-BF16, AMX); torch.cpu.get_capabilities names them,
    while torch.backends.cpu.get_cpu_capability() only says "AVX512" (which includes CPUs without BF16)."""
    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    return {
        "avx512_bf16": bool(caps.get("avx512_bf16", False)),
        "amx_bf16": bool(caps.get("amx_bf16", False)),
        "amx_fp16": bool(caps.get("amx_fp16", False)) or bool(caps.get("avx512_fp16", False)),
    }


def detect_hardware(device: torch.device | str | None = None) -> dict[str, Any]:
    """Plain facts about `device` (default: CUDA if present, else CPU) that decide precision choices."""
    device = torch.device(device) if device is not None else default_device()
    info: dict[str, Any] = {"device_type": device.type, "total_memory_bytes": total_device_memory(device)}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        info.update(device_name=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}",
                    tensor_cores=major >= 7, bf16=bf16, bf16_accelerated=bf16, fp16=True,
                    fp16_accelerated=major >= 7, tf32=major >= 8, cpu_capability=None)
        return info
    feats = _cpu_features()
    autocast = autocast_supported(device.type, torch.bfloat16)
    info.update(device_name=_cpu_name(), compute_capability=None, tensor_cores=False,
                bf16=autocast, bf16_accelerated=autocast and (feats["avx512_bf16"] or feats["amx_bf16"]),
                fp16=autocast_supported(device.type, torch.float16),
                fp16_accelerated=autocast and feats["amx_fp16"], tf32=False,
                cpu_capability=torch.backends.cpu.get_cpu_capability(), **feats)
    return info


def _cpu_name() -> str:
    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    return str(caps.get("cpu_name") or "cpu")


# -- model facts ---------------------------------------------------------------------------------------
def _positions_per_sample(model: nn.Module, module: nn.Module) -> int:
    """How many outputs per sample a layer produces per output feature: tokens for sequence models, a
    mid-network resolution (stride 16) for conv layers; 1 when the model's config does not say."""
    config = getattr(model, "config", None)
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
        size = getattr(config, "image_size", None)
        return max(1, (size // 16) ** 2) if size else 1
    return int(getattr(config, "block_size", 1) or 1)


def estimate_memory(model: nn.Module, batch_size: int, half_precision: bool = False) -> dict[str, int]:
    """Rough bytes of a training step: resident (weights, grads, Adam) and activations saved for backward.

    Activations: sum of the output features of every Linear/Conv/Norm layer, times positions per sample
    (see `_positions_per_sample`), times `_SAVED_PER_OUTPUT`, in 4 bytes (2 under half-precision autocast,
    which also caches a 2-byte copy of each weight during forward). Works on meta-device models.
    """
    params = count_params(model)
    outputs = sum(m.weight.shape[0] * _positions_per_sample(model, m) for m in model.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm2d))
                  and getattr(m, "weight", None) is not None)
    act_bytes = int(outputs * _SAVED_PER_OUTPUT * (2 if half_precision else 4))
    static = params * _STATIC_BYTES_PER_PARAM + (2 * params if half_precision else 0)
    return {"num_params": params, "static_bytes": static, "activation_bytes_per_sample": act_bytes,
            "total_bytes": static + act_bytes * batch_size}


def _check_args(owner: str, batch_size: Any, available_memory: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{owner}: batch_size={batch_size!r} is not allowed: expected an integer >= 1")
    if isinstance(available_memory, bool) or not isinstance(available_memory, (int, float)) \
            or not math.isfinite(available_memory) or available_memory <= 0:
        raise ValueError(f"{owner}: available_memory={available_memory!r} is not allowed: "
                         f"expected a number of bytes > 0")


# -- decisions -----------------------------------------------------------------------------------------
def explain_mixed_precision(model: nn.Module, batch_size: int, available_memory: float,
                            device: torch.device | str | None = None) -> tuple[bool, list[str]]:
    """`should_use_mixed_precision` with its reasons. The rule, first match wins:

    1. CUDA with tensor cores (cc >= 7.0): yes, half-precision matmuls run on tensor cores.
    2. The estimated fp32 footprint exceeds `_HEADROOM` (90%) of available_memory and the device can
       autocast to a half dtype: yes, activations shrink by about half.
    3. CPU with native bf16 (AVX512-BF16 or AMX) and a model of >= 1M parameters: yes.
    4. Otherwise (CPU without bf16 instructions, a small model, or a GPU without tensor cores that has
       room): no; the casts cost more than they save.
    """
    _check_args("should_use_mixed_precision", batch_size, available_memory)
    hw = detect_hardware(device)
    est = estimate_memory(model, batch_size)
    fp32_gib, avail_gib = est["total_bytes"] / 2**30, available_memory / 2**30
    if hw["tensor_cores"]:
        return True, [f"{hw['device_name']} (cc {hw['compute_capability']}) has tensor cores: "
                      f"fp16/bf16 matmuls run several times faster than fp32"]
    if est["total_bytes"] > _HEADROOM * available_memory and (hw["bf16"] or hw["fp16"]):
        return True, [f"estimated fp32 footprint {fp32_gib:.2f} GiB exceeds {_HEADROOM:.0%} of available "
                      f"{avail_gib:.2f} GiB: half-precision activations need about half"]
    if hw["bf16_accelerated"] and est["num_params"] >= _SMALL_MODEL_PARAMS:
        return True, [f"the CPU has native bf16 instructions and the model has {est['num_params']:,} "
                      f"parameters: bf16 autocast speeds up its matmuls"]
    why = ("no tensor cores and no native bf16 instructions" if not hw["bf16_accelerated"]
           else f"the model is small ({est['num_params']:,} < {_SMALL_MODEL_PARAMS:,} parameters)")
    return False, [f"{why}; estimated fp32 footprint {fp32_gib:.2f} GiB fits in {avail_gib:.2f} GiB: "
                   f"fp32 is as fast and simpler"]


def should_use_mixed_precision(model: nn.Module, batch_size: int, available_memory: float,
                               device: torch.device | str | None = None) -> bool:
    """Whether mixed precision is worth it for this model, batch and memory (rule: explain_mixed_precision)."""
    return explain_mixed_precision(model, batch_size, available_memory, device)[0]


def _scaler_tier(num_params: int) -> tuple[str, dict[str, Any]]:
    for limit, name, settings in _TIERS:
        if num_params < limit:
            return name, dict(settings)
    raise AssertionError("the last tier has no upper limit")


def _pick_dtype(hw: dict[str, Any], use_mp: bool) -> torch.dtype:
    """bf16 wherever autocast has it (fp32's range: no loss scaling), else fp16; fp32 without mixed precision.

    On a CPU, bf16 is preferred even without fp16 instructions because both are emulated there and bf16
    needs no scaler; on CUDA, bf16 needs Ampere or newer (detect_hardware's "bf16").
    """
    if not use_mp:
        return torch.float32
    if hw["bf16"]:
        return torch.bfloat16
    return torch.float16 if hw["fp16"] else torch.float32


def _accumulation_steps(est: dict[str, int], batch_size: int, available_memory: float) -> int:
    """Smallest k so that the micro-batch ceil(batch_size / k) fits in the headroom; batch_size if none does."""
    budget = _HEADROOM * available_memory - est["static_bytes"]
    for k in range(1, batch_size + 1):
        if budget >= est["activation_bytes_per_sample"] * math.ceil(batch_size / k):
            return k
    return batch_size


def optimize_mixed_precision_settings(model: nn.Module, batch_size: int, available_memory: float,
                                      device: torch.device | str | None = None) -> MixedPrecisionConfig:
    """A config tuned to the model's size tier (`_TIERS`), the device's dtypes and the memory budget.

    gradient_accumulation_steps is raised until the micro-batch (batch_size / k) fits: feed train_step
    micro-batches of that size. When even one sample does not fit, k = batch_size (see the estimate).
    """
    use_mp = should_use_mixed_precision(model, batch_size, available_memory, device)
    dtype = _pick_dtype(detect_hardware(device), use_mp)
    est = estimate_memory(model, batch_size, half_precision=dtype != torch.float32)
    _, settings = _scaler_tier(est["num_params"])
    return MixedPrecisionConfig(enabled=use_mp, dtype=dtype, memory_efficient=True,
                                gradient_accumulation_steps=_accumulation_steps(est, batch_size, available_memory),
                                **settings)


def get_mixed_precision_recommendations(model: nn.Module | None = None, batch_size: int = 1,
                                        available_memory: float | None = None,
                                        device: torch.device | str | None = None) -> dict[str, Any]:
    """What to use on this machine and why; with a model, the config is tuned to it as well."""
    hw = detect_hardware(device)
    available_memory = available_memory if available_memory is not None else hw["total_memory_bytes"]
    if model is not None:
        use_mp, reasons = explain_mixed_precision(model, batch_size, available_memory, device)
        config = optimize_mixed_precision_settings(model, batch_size, available_memory, device)
    else:
        use_mp = hw["tensor_cores"] or hw["bf16_accelerated"]
        reasons = [_hardware_reason(hw)]
        config = create_mixed_precision_config(enabled=use_mp, dtype=_pick_dtype(hw, use_mp))
    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(config.dtype, "fp32") if use_mp else "fp32"
    reasons.append(_dtype_reason(dtype, hw))
    if hw["tf32"]:
        reasons.append("TF32 (cc >= 8.0): fp32 matmuls left outside autocast run on tensor cores with a "
                       "10-bit mantissa; enable it unless exact fp32 matmuls are needed")
    return {"hardware": hw, "recommended_dtype": dtype, "use_mixed_precision": use_mp,
            "use_tf32": bool(hw["tf32"]), "reasons": reasons, "config": config.to_dict()}


def _hardware_reason(hw: dict[str, Any]) -> str:
    if hw["tensor_cores"]:
        return f"{hw['device_name']} (cc {hw['compute_capability']}) has tensor cores"
    if hw["bf16_accelerated"]:
        return f"the CPU ({hw['device_name']}) has native bf16 instructions (AVX512-BF16/AMX)"
    extra = f", CPU capability {hw['cpu_capability']}" if hw.get("cpu_capability") else ""
    return (f"{hw['device_name']} has neither tensor cores nor native bf16 instructions{extra}: "
            f"autocast would emulate half precision and run slower than fp32")


def _dtype_reason(dtype: str, hw: dict[str, Any]) -> str:
    if dtype == "bf16":
        return "bf16: fp32's exponent range, so no loss scaling is needed (the config turns it off)"
    if dtype == "fp16":
        why = "bf16 is not supported natively on this GPU" if not hw["bf16"] else "fp16 chosen"
        return f"fp16 with dynamic loss scaling: {why}"
    return "fp32: mixed precision is not expected to pay off here"


def create_mixed_precision_config(enabled: bool = True, dtype: torch.dtype | str = torch.float16,
                                  init_scale: float = 2.0**16, memory_efficient: bool = True) -> MixedPrecisionConfig:
    """A MixedPrecisionConfig from the four settings most users change; the rest keep their defaults."""
    return MixedPrecisionConfig(enabled=enabled, dtype=dtype, init_scale=init_scale,
                                memory_efficient=memory_efficient)
