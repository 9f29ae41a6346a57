"""Where FSDP's time goes on one GPU: the engine's step on the built-in GPT unsharded and under FSDP2 (one
rank, the worker's sharding: each Block, then the root, parameters in the precision's dtype, gradients
reduced in fp32), in one process. For each: the step time (CUDA events over alternating blocks), peak
memory, and under torch.profiler the kernels per step, their time, the host's time per step, and the top
operators by host time and by kernel time.

    python benchmarks/profile_fsdp.py --preset small --batch 8 --dtype bf16 --out OUT.json

Without a GPU it runs on the CPU with gloo (a check of the script; the figures mean nothing there).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ampray.amp.bench import time_steps  # noqa: E402
from ampray.amp.config import MixedPrecisionConfig  # noqa: E402
from ampray.amp.sharding import build_mp_policy, shard_model  # noqa: E402
from ampray.amp.trainer import MixedPrecisionTrainer  # noqa: E402
from ampray.models import build_criterion, build_model, example_batch  # noqa: E402


def build(variant: str, base: torch.nn.Module, args, device: torch.device):
    config = MixedPrecisionConfig(dtype=args.dtype)
    engine = MixedPrecisionTrainer(config, device=device)
    model = engine.prepare_model(copy.deepcopy(base))
    if variant.startswith("fsdp"):
        model = shard_model(model, policy=build_mp_policy(config), blocks=["Block"],
                            reshard_after_forward=variant != "fsdp_keep")
    opt = engine.build_optimizer(model, "adamw", lr=3e-4)
    return engine, model, opt


def profile_steps(step, steps: int, device: torch.device, rows: int) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = torch.autograd.DeviceType.CUDA
    kernels = [e for e in events if e.device_type == cuda]
    cpu = [e for e in events if e.device_type != cuda]
    top_cpu = sorted(cpu, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    top_gpu = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
    # Inclusive host time of the named ranges (FSDP's hooks, the optimizer step, autograd): where a phase's
    # host time goes, children included.
    ranges = sorted((e for e in cpu if "FSDP" in e.key or "Optimizer" in e.key or e.key.startswith("ProfilerStep")
                     or "PythonSubclass" in e.key), key=lambda e: e.cpu_time_total, reverse=True)[:rows]
    return {
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / steps / 1e3,
        "host_ms_per_step": sum(e.self_cpu_time_total for e in cpu) / steps / 1e3,
        "top_host": [(e.key, e.count // steps, round(e.self_cpu_time_total / steps / 1e3, 3)) for e in top_cpu],
        "ranges_inclusive": [(e.key, e.count // steps, round(e.cpu_time_total / steps / 1e3, 3)) for e in ranges],
        "top_kernels": [(e.key[:90], e.count // steps, round(e.self_device_time_total / steps / 1e3, 3))
                        for e in top_gpu],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--variants", default="plain,fsdp,fsdp_keep",
                   help="plain (no wrapper), fsdp (reshard after forward), fsdp_keep (no reshard)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    base = build_model("gpt", preset=args.preset)
    x, y = example_batch("gpt", base.config, args.batch, generator=torch.Generator().manual_seed(0))
    x, y, criterion = x.to(device), y.to(device), build_criterion("gpt")
    variants = args.variants.split(",")
    loops, out = {}, {"meta": {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                               "args": {k: str(v) for k, v in vars(args).items()}}, "variants": {}}
    for name in variants:
        engine, model, opt = build(name, base, args, device)
        loops[name] = (lambda e=engine, m=model, o=opt: e.train_step(m, o, criterion, x, y))
        for _ in range(5):
            loops[name]()
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for k in (variants if r % 2 == 0 else variants[::-1]):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[k] += time_steps(loops[k], args.iters, device)
    for name in variants:
        t = times[name]
        rec = {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)}
        rec.update(profile_steps(loops[name], args.profile_steps, device, args.rows))
        out["variants"][name] = rec
        print(f"\n## {name}: median {rec['median_ms']:.2f} ms, min {rec['min_ms']:.2f} ms; profiled: "
              f"{rec['kernels_per_step']:.0f} kernels, {rec['kernel_ms_per_step']:.2f} ms kernel time, "
              f"{rec['host_ms_per_step']:.2f} ms host time per step")
        print("top host ops (name, calls/step, ms/step):")
        for row in rec["top_host"]:
            print("  ", row)
        print("named ranges, host time with children (name, calls/step, ms/step):")
        for row in rec["ranges_inclusive"]:
            print("  ", row)
        print("top kernels:")
        for row in rec["top_kernels"]:
            print("  ", row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
