"""Model flops utilisation (MFU): achieved training flops over the device's peak for the precision in use.

The peaks are the vendors' dense (no sparsity) tensor-core figures per GPU; a device that is not listed has
no MFU unless `AMPRAY_PEAK_TFLOPS` gives its peak (TFLOP/s, for the precision the run uses). CPUs have none.
"""

from __future__ import annotations

import os

import torch

# name fragment (as torch.cuda.get_device_name reports it, lower case) -> TFLOP/s for bf16, fp16, tf32, fp32.
# Most specific first: "h100 pcie" before "h100".
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("gh200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("l40s", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("l4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("a10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("v100", {"fp16": 125.0, "fp32": 15.7}),
)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """The precision whose peak applies: the autocast dtype, or fp32 (tf32 where matmuls may use it)."""
    if amp_dtype == torch.bfloat16:
        return "bf16"
    if amp_dtype == torch.float16:
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device: torch.device, amp_dtype: torch.dtype | None, precision: str | None = None) -> float | None:
    """The device's dense peak in flop/s for the precision in use (`precision`, one of bf16, fp16, tf32,
    fp32, names it outright), or None where unknown."""
    override = os.environ.get("AMPRAY_PEAK_TFLOPS", "")
    if override:
        try:
            value = float(override)
        except ValueError:
            value = 0.0
        if value > 0:
            return value * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    for fragment, peaks in _PEAKS:
        if fragment in name:
            value = peaks.get(precision or precision_name(amp_dtype))
            return None if value is None else value * 1e12
    return None


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Achieved over peak, or None where the peak is unknown."""
    return flops_per_s / peak if peak else None
