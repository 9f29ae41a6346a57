"""Autocast contexts and per-module fp32 islands.

`mixed_precision_context` is nanoGPT's `ctx`: either a null context or `torch.autocast`, so a training
loop has no precision branches. `Fp32Islands` runs chosen modules in fp32 inside an autocast region by
forward hooks (removable, no change to the module or its state_dict keys).
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator

import torch
from torch import nn

from ampray.amp.config import parse_dtype


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch can autocast to `dtype` on `device_type` (bf16 needs Ampere or newer on CUDA)."""
    if dtype == torch.float32:
        return True
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        return dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.amp.autocast_mode.is_autocast_available(device_type)


def mixed_precision_context(enabled: bool = True, dtype: torch.dtype | str = torch.float16,
                            device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (default: CUDA if present, else CPU); a null context when
    disabled or fp32."""
    dtype = parse_dtype(dtype, owner="mixed_precision_context")
    device = torch.device(device) if device is not None else default_device()
    if not enabled or dtype == torch.float32:
        return contextlib.nullcontext()
    if not autocast_supported(device.type, dtype):
        raise ValueError(f"mixed_precision_context: dtype={dtype} is not supported for autocast on "
                         f"device={device}; use torch.float32, or torch.float16 on CUDA")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _matches(name: str, module: nn.Module, patterns: tuple[str, ...], cls: type | None = None) -> bool:
    cls = cls or type(module)
    return any(fnmatch.fnmatchcase(name, p) or p in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
               for p in patterns)


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


class Fp32Islands:
    """Forward hooks that switch autocast off around matching modules and cast their inputs to fp32."""

    def __init__(self, patterns: tuple[str, ...], device_type: str):
        self.patterns = tuple(patterns)
        self.device_type = device_type
        self._saved: list[bool] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.modules: list[str] = []

    def attach(self, model: nn.Module) -> list[str]:
        """Hook every module whose qualified name or class matches; returns the names hooked."""
        for name, module in model.named_modules():
            name = name.removeprefix("module.")  # DDP wraps the model as .module
            if name and _matches(name, module, self.patterns):
                # A ModuleList/ModuleDict has no forward (its hooks would never run): its members are hooked.
                members = (list(module.named_children()) if isinstance(module, (nn.ModuleList, nn.ModuleDict))
                           else [("", module)])
                for sub, member in members:
                    self._handles.append(member.register_forward_pre_hook(self._enter, with_kwargs=True))
                    self._handles.append(member.register_forward_hook(self._exit, always_call=True))
                    self.modules.append(f"{name}.{sub}" if sub else name)
        if self.patterns and not self.modules:
            raise ValueError(f"MixedPrecisionConfig.fp32_modules={list(self.patterns)} matched no module of "
                             f"{type(model).__name__}; use qualified-name globs or class names")
        return self.modules

    def _enter(self, module, args, kwargs):
        self._saved.append(torch.is_autocast_enabled(self.device_type))
        torch.set_autocast_enabled(self.device_type, False)
        return _to_fp32(args), _to_fp32(kwargs)

    def _exit(self, module, args, output):
        # always_call=True: runs even when forward raises, so autocast state never leaks.
        if self._saved:
            torch.set_autocast_enabled(self.device_type, self._saved.pop())
        return None

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.modules.clear()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Restore the autocast state even if a hooked forward was interrupted."""
        depth = len(self._saved)
        try:
            yield
        finally:
            while len(self._saved) > depth:
                torch.set_autocast_enabled(self.device_type, self._saved.pop())
