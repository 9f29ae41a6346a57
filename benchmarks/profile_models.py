"""ampray's GPT beside the plain-PyTorch reference (`../shared/gpu/anchor_gpt.py`), in one process on one
GPU: the same loop (autocast, GradScaler for fp16, fused AdamW, zero_grad(set_to_none)), the same batch;
per model its step time (median of rounds), peak memory and, with --profile, the CUDA kernels of a few
steps side by side (time and count per kernel name), so that a gap between the two models shows where
it is.

    python benchmarks/profile_models.py --anchor .gpukit/anchor_gpt.py --batch 16 --dtypes bf16,fp16 \
        --variants anchor,ampray --compile --profile

Variants: `anchor` (the reference's GPT with its loss inside forward), `ampray` (ampray's `gpt` small with
`lm_loss`, as `ampray train` runs it), and any diagnostic variant named in VARIANTS.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ampray.models.gpt import GPT, GPTConfig, lm_loss, lm_loss_eager  # noqa: E402


def load_anchor(path: str):
    spec = importlib.util.spec_from_file_location("anchor_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class WithLoss(nn.Module):
    """ampray's model and a loss, as one module that takes (idx, targets) like the reference's."""

    def __init__(self, model: nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, idx, targets):
        return self.loss(self.model(idx), targets)


def plain_ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


VARIANTS = {
    "ampray": lambda anchor: WithLoss(GPT(GPTConfig.preset("small")), lm_loss),
    "ampray_eager_loss": lambda anchor: WithLoss(GPT(GPTConfig.preset("small")), lm_loss_eager),
    "ampray_plain_ce": lambda anchor: WithLoss(GPT(GPTConfig.preset("small")), plain_ce),
    "anchor": lambda anchor: anchor.GPT(),
}


def measure(name, build, dtype, batch, rounds, iters, compile_, profile):
    torch.manual_seed(0)
    model = build().cuda()
    if compile_:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 50304, (batch, 1024), device="cuda", generator=g)
    y = torch.randint(0, 50304, (batch, 1024), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            loss = step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    row = dict(variant=name, dtype=str(dtype).split(".")[-1], compile=compile_, batch=batch,
               step_ms=statistics.median(times) * 1e3, p25_ms=sorted(times)[len(times) // 4] * 1e3,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss))
    kernels = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        kernels = defaultdict(lambda: [0.0, 0])
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels[e.name[:90]]
                k[0] += e.device_time_total / 3 / 1e3  # ms per step
                k[1] += 1 / 3
        row["kernel_ms"] = sum(v[0] for v in kernels.values())
        row["kernels"] = round(sum(v[1] for v in kernels.values()))
    return row, kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--anchor", default=str(Path(__file__).resolve().parents[1] / ".gpukit" / "anchor_gpt.py"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--variants", default="anchor,ampray")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also each variant under torch.compile")
    p.add_argument("--profile", action="store_true", help="kernel tables (eager only)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default="")
    a = p.parse_args()
    anchor = load_anchor(a.anchor)
    rows, tables = [], {}
    for dt in a.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        for comp in ([False, True] if a.compile else [False]):
            # Interleaved twice, so that a drift of the host's clocks shows as a difference of repeats.
            for rep in range(2):
                for v in a.variants.split(","):
                    row, k = measure(v, lambda: VARIANTS[v](anchor), dtype, a.batch, a.rounds, a.iters, comp,
                                     a.profile and not comp and rep == 0)
                    torch.cuda.empty_cache()  # the model and optimizer of the last measure are gone
                    row["repeat"] = rep
                    row["tok_s"] = a.batch * 1024 / row["step_ms"] * 1e3
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if k is not None:
                        tables[(v, dt)] = k
    for dt in a.dtypes.split(","):
        names = [v for v in a.variants.split(",") if (v, dt) in tables]
        if len(names) < 2:
            continue
        keys = sorted(set().union(*(tables[(v, dt)] for v in names)),
                      key=lambda n: -max(tables[(v, dt)].get(n, [0, 0])[0] for v in names))
        print(f"\n== kernels per step, {dt} (ms / count): " + " | ".join(names))
        for kname in keys[: a.rows]:
            cells = "  ".join(f"{tables[(v, dt)].get(kname, [0, 0])[0]:7.3f}/{tables[(v, dt)].get(kname, [0, 0])[1]:4.0f}"
                              for v in names)
            print(f"{cells}  {kname}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
