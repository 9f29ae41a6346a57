"""Counters of the training loop (host integers and device-side loss sums) and safe state files."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HOST_FIELDS = ("training_steps", "optimizer_steps", "skipped_steps", "samples", "oom_events",
                "oom_skipped_batches", "oom_split_retries", "pieces", "micro_in_window",
                "overflows_at_floor")


class TrainerCounters:
    """Counts what the trainer did. Integers known on the host cost nothing to keep; the loss sums stay
    on the device and are read only by `read()` / `state_dict()`."""

    def __init__(self, device: torch.device):
        self.device = device
        for name in _HOST_FIELDS:
            setattr(self, name, 0)
        self.pieces = 1  # the OOM policy's split of each micro-batch (a power of two)
        self.present: list[int] | None = None  # agreed gradient presence (OOM-safe path under DDP)
        self.host_time_s = 0.0
        self.wall_time_before_s = 0.0  # wall time of earlier sessions of a resumed run
        self._t_start: float | None = None
        self._t_end = 0.0
        cuda = device.type == "cuda"
        self._ev_start = torch.cuda.Event(enable_timing=True) if cuda else None
        self._ev_end = torch.cuda.Event(enable_timing=True) if cuda else None
        self.grads_dirty = False      # a backward of this accumulation window has completed
        self.window_poisoned = False  # an OOM left this window's gradients unusable
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.int64, device=device)
        self.last_loss = torch.full((), float("nan"), device=device)
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=device)
        self.window_bad_loss = torch.zeros((), dtype=torch.bool, device=device)

    def mark_start(self) -> None:
        if self._t_start is None:
            self._t_start = time.perf_counter()
            if self._ev_start is not None:
                self._ev_start.record()

    def mark_end(self) -> None:
        self._t_end = time.perf_counter()
        if self._ev_end is not None:
            self._ev_end.record()

    def wall_time_s(self) -> float:
        """Time from the first step's start to the last step's end: on CUDA measured by events on the
        stream (the GPU's own time, waiting for it), else on the host."""
        if self._t_start is None:
            return self.wall_time_before_s
        if self._ev_start is not None:
            self._ev_end.synchronize()
            span = self._ev_start.elapsed_time(self._ev_end) / 1e3
        else:
            span = self._t_end - self._t_start
        return self.wall_time_before_s + span

    @torch.no_grad()
    def add_loss(self, loss: torch.Tensor, check: bool) -> None:
        self.last_loss = loss
        if check:
            bad = ~torch.isfinite(loss)
            self.window_bad_loss |= bad
            self.nonfinite_losses += bad
            self.loss_sum += torch.where(bad, 0.0, loss.double())
            self.loss_count += ~bad
        else:
            self.loss_sum += loss.double()
            self.loss_count += 1

    def end_window(self) -> None:
        self.micro_in_window = 0
        self.grads_dirty = False
        self.window_poisoned = False
        self.window_bad_loss.zero_()

    def read(self) -> dict[str, Any]:
        """All counters as plain numbers (one sync)."""
        loss_sum, count, last, nonfinite = torch.stack([
            self.loss_sum, self.loss_count.double(), self.last_loss.double(), self.nonfinite_losses.double()
        ]).tolist()
        out = {name: getattr(self, name) for name in _HOST_FIELDS}
        out.update(host_time_s=self.host_time_s, wall_time_s=self.wall_time_s(), loss_sum=loss_sum, loss_count=int(count), last_loss=last,
                   nonfinite_losses=int(nonfinite))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.read()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in _HOST_FIELDS:
            setattr(self, name, int(state.get(name, 1 if name == "pieces" else 0)))
        self.host_time_s = float(state["host_time_s"])
        self.wall_time_before_s = float(state.get("wall_time_s", 0.0))
        self._t_start = None
        self.loss_sum.fill_(float(state["loss_sum"]))
        self.loss_count.fill_(int(state["loss_count"]))
        self.last_loss = torch.tensor(float(state["last_loss"]), device=self.device)
        self.nonfinite_losses.fill_(int(state["nonfinite_losses"]))
        self.end_window()


def estimate_memory_savings(amp_dtype: torch.dtype, num_params: int) -> dict[str, Any]:
    """What a half-precision autocast saves and costs, from first principles (not a measurement; see
    `benchmark_mixed_precision` for measured numbers)."""
    half = amp_dtype in (torch.float16, torch.bfloat16)
    return {
        # Activations saved for backward are produced by autocast ops in 2 bytes instead of 4.
        "activation_fraction_saved": 0.5 if half else 0.0,
        # fp32 master weights stay; autocast caches a 2-byte copy of each weight during forward.
        "weight_cast_cache_bytes": 2 * num_params if half else 0,
        "param_and_optimizer_bytes_saved": 0,
        "num_params": num_params,
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
