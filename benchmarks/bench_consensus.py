"""What consensus costs under DDP: the engine with each OOM policy against a plain DDP loop, same run.

Two ranks (gloo on CPU; NCCL with --device cuda and two GPUs) train copies of one initialisation of
ampray's GPT (preset micro by default) in alternating blocks, the order reversed every other round:
  plain         DDP + torch.autocast (+ GradScaler for fp16) + AdamW, nanoGPT-style;
  engine_raise  MixedPrecisionTrainer, oom_policy="raise": nothing exchanged beyond DDP's own all-reduce;
  engine_skip   oom_policy="skip": the ranks agree after each piece's forward and backward, backward
                runs under no_sync and the engine all-reduces the gradients at the optimizer step.
Prints one JSON line (rank 0): median step time per loop and the ratios to plain.

    python benchmarks/bench_consensus.py --dtype bf16 --batch 8 --rounds 6 --iters 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ampray.amp.config import MixedPrecisionConfig  # noqa: E402
from ampray.amp.trainer import MixedPrecisionTrainer  # noqa: E402
from ampray.models import build_criterion, build_model, example_batch  # noqa: E402

LOOPS = ("plain", "engine_raise", "engine_skip")


def _loop(name: str, args, device: torch.device, x, y, crit):
    torch.manual_seed(0)
    model = build_model("gpt", preset=args.preset).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if name == "plain":
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = crit(ddp(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        return step
    policy = name.removeprefix("engine_")
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=args.dtype, oom_policy=policy,
                                                     nonfinite_loss_policy="ignore"), device)
    eng._attach(ddp)
    return lambda: eng.train_step(ddp, opt, crit, x, y)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(rank: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    x, y = example_batch("gpt", {"preset": args.preset}, args.batch, torch.Generator().manual_seed(rank))
    x, y, crit = x.to(device), y.to(device), build_criterion("gpt")
    steps = {name: _loop(name, args, device, x, y, crit) for name in LOOPS}
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    for r in range(args.rounds):
        for name in (LOOPS if r % 2 == 0 else LOOPS[::-1]):
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                steps[name]()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / args.iters)
    if rank == 0:
        med = {name: statistics.median(v) for name, v in times.items()}
        result = {"device": args.device, "dtype": args.dtype, "preset": args.preset, "batch": args.batch,
                  "median_step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
                  "ratio_to_plain": {k: round(v / med["plain"], 4) for k, v in med.items()},
                  "blocks_ms": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()}}
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--preset", default="micro")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_consensus_{os.getpid()}.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, args, port, str(tmp))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(1800)
    if any(proc.exitcode != 0 for proc in procs):
        raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
    line = tmp.read_text()
    tmp.unlink()
    print(line)
    if args.out:
        args.out.write_text(line)


if __name__ == "__main__":
    main()
