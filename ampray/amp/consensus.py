"""Consensus: every decision of the engine is the same on every rank of a process group.

Most decisions cost no communication at all. Under DDP every rank steps on the same all-reduced
gradients, so an overflow is seen by every rank in the same step; a non-finite loss is made into
non-finite gradients of the rank that saw it (its backward is multiplied by NaN), so DDP's own all-reduce
carries it to every rank too. The skip, the scale update, the hysteresis and collapse counts, the bf16
fallback and the adaptation all follow from those identical flags, and retunes come from the job, the
same on every rank.

Under FSDP (`fully_shard`) each rank holds only a shard of each gradient, so no rank sees an overflow
on another's shard: the engine pays one all-reduce per optimizer step, of the per-parameter squared norms
(`global_norms`), from which every rank reads the same overflow flags, attribution and clipping norm
(`sharding.py`). Without FSDP it is never made.

Two decisions need a collective, and pay it only when their policy asks for it:
- `oom_policy="skip"` / `"split"`: an out-of-memory error is one rank's. The ranks agree after each
  piece's forward and after its backward (a small MAX all-reduce, one host read each), so that all of them
  retry the same halves or drop the same window; for that, backward runs under DDP's `no_sync()` and the
  engine all-reduces the gradients itself at the optimizer step (no overlap with backward: the price of
  the policy, measured in BENCHMARKS.md). With `"raise"` nothing is exchanged: the rank raises, and the
  launcher (Ray Train, torchrun) or the broken connection ends its peers.
- `nonfinite_loss_policy="raise"`: the ranks whose loss was non-finite are gathered at the optimizer step
  (which reads the flags on the host anyway), so that every rank raises the same error naming them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn


class Consensus:
    """The process group the engine agrees over (None: one process, every exchange is local).

    `sharded`: the gradients are DTensors (FSDP), each rank holding a shard of every one; the engine
    reads their local shards, and sums the per-parameter norms over the group (`global_norms`)."""

    def __init__(self, group: Any = None, sharded: bool = False):
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.sharded = sharded
        self.rank = dist.get_rank(group) if group is not None else 0
        backend = str(dist.get_backend(group)) if group is not None else "gloo"
        # Collectives of flags travel as CPU tensors on gloo, as CUDA tensors on NCCL.
        self.device = torch.device("cpu") if "gloo" in backend or not torch.cuda.is_available() else \
            torch.device("cuda", torch.cuda.current_device())

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def resolve(cls, model: nn.Module, group: Any = "auto") -> "Consensus":
        """The group of a DDP-wrapped model or of an FSDP-sharded one's mesh ("auto"), an explicit group,
        or none (None)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(None)
        from ampray.amp.sharding import sharded_mesh

        mesh = sharded_mesh(model)
        if group is None:
            return cls(None, sharded=mesh is not None)
        if group != "auto":
            return cls(dist.group.WORLD if group in (True, "world") else group, sharded=mesh is not None)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return cls(model.process_group)
        if mesh is not None:
            return cls(mesh.get_group(), sharded=True)
        return cls(None)

    def max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of small integers over the ranks (one all-reduce and one host read)."""
        if not self.active:
            return [int(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    @torch.no_grad()
    def global_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-parameter norms of whole gradients from each rank's norms of its shards: the squares are
        summed over the group (in float64: a float32 norm above 1.8e19 would overflow as a square). An
        inf or NaN on any rank stays inf or NaN in the sum, so every rank gets the same flags, and the
        same bits (one all-reduce: every rank receives the same sums)."""
        if not (self.sharded and self.active):
            return norms
        squares = norms.to(self.device, torch.float64).square()
        dist.all_reduce(squares, group=self.group)
        return squares.sqrt().to(norms.device, torch.float32)

    def ranks_where(self, flag: torch.Tensor | bool) -> list[int]:
        """The group ranks where `flag` (a 0-d tensor or a bool) is true."""
        if not self.active:
            return [0] if bool(flag) else []
        t = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        t[self.rank] = flag.to(self.device).long() if torch.is_tensor(flag) else int(flag)
        dist.all_reduce(t, group=self.group)
        return [r for r, v in enumerate(t.tolist()) if v]

    # -- the gradient all-reduce of the OOM-safe path ----------------------------------------------
    @torch.no_grad()
    def average_gradients(self, module: nn.Module, present: Sequence[int] | None = None,
                          bucket_bytes: int = 25 << 20) -> None:
        """Average the gradients of `module` over the ranks, as DDP's reducer would: a parameter whose
        gradient is missing on this rank but present on another counts as zeros here; `present` is the
        all-reduced presence mask of `module.parameters()` (None: every parameter)."""
        params = [p for p in module.parameters() if p.requires_grad]
        grads = []
        for i, p in enumerate(params):
            if present is not None and not present[i]:
                continue  # unused on every rank: left as it is (None), as DDP does
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse:
                raise TypeError("ampray: sparse gradients cannot be averaged by the engine under a process "
                                "group; use oom_policy='raise' with sparse embeddings under DDP")
            grads.append(p.grad)
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)
            torch._foreach_copy_(bucket, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in bucket]),
                                                                         bucket)])

    @torch.no_grad()
    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers to every rank (DDP does this before each synchronised forward)."""
        # bool buffers travel as bytes (not every backend takes bool tensors)
        buffers = [b.view(torch.uint8) if b.dtype == torch.bool else b for b in module.buffers()]
        src = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
        for bucket in _buckets(buffers, 25 << 20):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.broadcast(flat, src=src, group=self.group)
            torch._foreach_copy_(bucket, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in bucket]),
                                                                         bucket)])


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most `limit` bytes (or one tensor)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        key = (t.dtype, t.device)
        if out and (out[-1][0].dtype, out[-1][0].device) == key and size + t.numel() * t.element_size() <= limit:
            out[-1].append(t)
            size += t.numel() * t.element_size()
        else:
            out.append([t])
            size = t.numel() * t.element_size()
    return out
