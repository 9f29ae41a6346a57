"""The plain-PyTorch reference for `ampray train`: the same model, batch and optimizer under torchrun DDP,
with a hand-written autocast + GradScaler loop and no Ray.

    torchrun --nproc_per_node 2 benchmarks/plain_ddp.py --preset small --dtype bf16 --batch-size 8 --steps 60
    torchrun --nproc_per_node 2 benchmarks/plain_ddp.py --runner engine ...   # the worker's step, no Ray

`--accum K` accumulates K micro-batches per optimizer step (DDP's all-reduce only on the last);
`--allreduce-dtype bf16` compresses the all-reduce as `scaling.allreduce_dtype` does.
`--runner engine` runs what an `ampray train` worker runs in each step (ShardedBatches,
`MixedPrecisionTrainer.train_step` with the job's default precision settings, the LR scheduler, the loss
accumulation) under torchrun: the difference between the three runners splits Ray's overhead into the
engine's part and Ray's part.

Prints one JSON line (rank 0): mean and median per-step time over the timed steps (CUDA events), throughput.
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
from ampray.amp.bench import StepProfiler  # noqa: E402
from ampray.data.synthetic import SyntheticConfig, make_dataset  # noqa: E402
from ampray.models import build_criterion, build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (no_sync before the last)")
    p.add_argument("--allreduce-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--runner", default="plain", choices=["plain", "engine"])
    p.add_argument("--report-every", type=int, default=0,
                   help="engine runner: build a worker's report (loss read back, engine records) every N steps")
    p.add_argument("--bind-cpus", action="store_true",
                   help="bind each rank to its own physical cores, as scaling.bind_cpus does for ampray train")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as model.compile does")
    p.add_argument("--profile", default="", help="START:COUNT: profile those steps into --profile-out")
    p.add_argument("--profile-out", default="profile")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.bind_cpus:
        from ampray.actors.affinity import bind_local_rank

        bind_local_rank(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = build_model("gpt", preset=args.preset).to(device)
    cfg = model.config
    x_all, y_all = make_dataset("gpt", SyntheticConfig(num_samples=args.num_samples, vocab_size=cfg.vocab_size,
                                                       seq_len=cfg.block_size))
    x_all, y_all = x_all.to(device), y_all.to(device)
    criterion = build_criterion("gpt")
    profiler = StepProfiler(args.profile, Path(args.profile_out) / f"{args.runner}-rank{rank}.txt")
    step_fn = (engine_step if args.runner == "engine" else plain_step)(args, model, x_all, y_all, criterion, device,
                                                                         rank, world)
    times = []
    for step in range(args.warmup + args.steps):
        start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
        t0 = time.perf_counter()
        if cuda:
            start.record()
        loss = step_fn(step)
        if cuda:
            end.record()
        profiler.step()
        if step >= args.warmup:
            # Events are read after the loop: a sync per step would stall the CPU's run-ahead.
            times.append((start, end) if cuda else time.perf_counter() - t0)
    profiler.close()
    if cuda:
        torch.cuda.synchronize()
        # Mean step = GPU time from the first timed step's start to the last one's end, gaps included:
        # the same measure as the Ray side's interval step time.
        mean = times[0][0].elapsed_time(times[-1][1]) / 1e3 / len(times)
        times = [s.elapsed_time(e) / 1e3 for s, e in times]
    else:
        mean = statistics.fmean(times)
    median = statistics.median(times)
    samples = args.batch_size * args.accum * world
    if rank == 0:
        print(json.dumps({"runner": "torchrun" if args.runner == "plain" else "torchrun-engine", "world_size": world,
                          "dtype": args.dtype, "preset": args.preset, "micro_batch_per_rank": args.batch_size,
                          "accum": args.accum, "allreduce_dtype": args.allreduce_dtype,
                          "median_step_s": median, "mean_step_s": mean, "samples_per_s": samples / mean,
                          "tokens_per_s": samples * cfg.block_size / mean, "final_loss": float(loss)}))
    dist.destroy_process_group()


def _ddp(model, device, args):
    """DDP with more than one process; one process trains the bare model, as `ray.train.torch.prepare_model`
    leaves it for one worker (DDP on one rank would still bucket and all-reduce every gradient)."""
    from ampray.actors.worker import compress_allreduce

    if args.compile:
        model.compile()  # in place, then DDP around it: what the worker does with model.compile
    if dist.get_world_size() == 1:
        return model
    cuda = device.type == "cuda"
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    compress_allreduce(ddp, args.allreduce_dtype)
    return ddp


def plain_step(args, model, x_all, y_all, criterion, device, rank, world):
    """nanoGPT's step: autocast, GradScaler for fp16, no_sync on the micro-steps before the last."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ddp = _ddp(model, device, args)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, fused=device.type == "cuda")
    b, n = args.batch_size, args.num_samples

    def step(i: int):
        for micro in range(args.accum):
            start = (((i * args.accum + micro) * world + rank) * b) % (n - b)
            idx = torch.arange(b, device=device) + start
            sync = micro == args.accum - 1
            with ctx, (contextlib.nullcontext() if sync or not hasattr(ddp, "no_sync") else ddp.no_sync()):
                loss = criterion(ddp(x_all[idx]), y_all[idx]) / args.accum
                scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach() * args.accum

    return step


def engine_step(args, model, x_all, y_all, criterion, device, rank, world):
    """The step of `ampray.actors.worker.train_loop_per_worker`, without Ray."""
    from ampray import MixedPrecisionConfig, MixedPrecisionTrainer
    from ampray.actors.worker import build_scheduler, report_metrics
    from ampray.data.parquet import ShardedBatches
    from ampray.job import OptimizerSection

    engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=args.dtype, gradient_accumulation_steps=args.accum),
                                   device)
    ddp = _ddp(engine.prepare_model(model), device, args)
    opt_cfg = OptimizerSection(lr=args.lr, schedule="constant")
    optimizer = engine.build_optimizer(ddp, opt_cfg.name, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    scheduler = build_scheduler(optimizer, opt_cfg, args.warmup + args.steps)
    batches = ShardedBatches(x_all, y_all, args.batch_size, rank, world, 0)
    loss_sum = torch.zeros((), device=device)

    def step(i: int):
        for _ in range(args.accum):
            x, y = batches.next_batch()
            out = engine.train_step(ddp, optimizer, criterion, x, y, scheduler)
            loss_sum.add_(torch.nan_to_num(out["loss"].float(), nan=0.0))
        if args.report_every and (i + 1) % args.report_every == 0:
            # What a worker does at a report, less handing it to Ray: the loss read back (a sync) and
            # the engine's records turned into the report's dict.
            report_metrics(engine, i + 1, rank, world, loss_sum.item() / (args.report_every * args.accum), 0)
            loss_sum.zero_()
        return out["loss"]

    return step


if __name__ == "__main__":
    main()
