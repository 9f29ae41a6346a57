"""The plain-PyTorch reference for `ampray train`: the same model, batch and optimizer under torchrun DDP,
with a hand-written autocast + GradScaler loop and no Ray.

    torchrun --nproc_per_node 2 benchmarks/plain_ddp.py --preset small --dtype bf16 --batch-size 8 --steps 60

Prints one JSON line (rank 0): median per-step time over the timed steps (CUDA events), throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ampray.data.synthetic import SyntheticConfig, make_dataset  # noqa: E402
from ampray.models import build_criterion, build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-samples", type=int, default=512)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = build_model("gpt", preset=args.preset).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, fused=cuda)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    cfg = model.config
    x_all, y_all = make_dataset("gpt", SyntheticConfig(num_samples=args.num_samples, vocab_size=cfg.vocab_size,
                                                       seq_len=cfg.block_size))
    x_all, y_all = x_all.to(device), y_all.to(device)
    criterion = build_criterion("gpt")
    times = []
    for step in range(args.warmup + args.steps):
        idx = torch.arange(args.batch_size, device=device) + ((step * world + rank) * args.batch_size) % (
            args.num_samples - args.batch_size)
        start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
        t0 = time.perf_counter()
        if cuda:
            start.record()
        with ctx:
            loss = criterion(ddp(x_all[idx]), y_all[idx])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
        if step >= args.warmup:
            # Events are read after the loop: a sync per step would stall the CPU's run-ahead.
            times.append((start, end) if cuda else time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        # Mean step = GPU time from the first timed step's start to the last one's end, gaps included:
        # the same measure as the Ray side's interval step time.
        mean = times[0][0].elapsed_time(times[-1][1]) / 1e3 / len(times)
        times = [s.elapsed_time(e) / 1e3 for s, e in times]
    else:
        mean = statistics.fmean(times)
    median = statistics.median(times)
    if rank == 0:
        print(json.dumps({"runner": "torchrun", "world_size": world, "dtype": args.dtype, "preset": args.preset,
                          "batch_per_rank": args.batch_size, "median_step_s": median, "mean_step_s": mean,
                          "samples_per_s": args.batch_size * world / mean,
                          "tokens_per_s": args.batch_size * world * cfg.block_size / mean,
                          "final_loss": float(loss)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
