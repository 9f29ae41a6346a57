"""Where a training step's time goes: torch.profiler over a few steps of the plain loop and of the engine
(as bench_engine.py builds them), one table of the top operators per loop, and kernel launches per step.

    python benchmarks/profile_step.py --model gpt2 --dtype bf16 --policy skip --steps 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import build_case, make_engine, make_plain  # noqa: E402

from ampray.amp.config import MixedPrecisionConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    p.add_argument("--policy", default="skip", help="nonfinite_loss_policy of the engine loop")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    ns = argparse.Namespace(smoke=False, tiny=False, gpt_batch=8, cnn_batch=128, seed=0, lr=3e-4, fused=True)
    device = torch.device("cuda")
    case = build_case(args.model, ns)
    case["x_dev"], case["y_dev"] = case["x"].to(device), case["y"].to(device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    loops = {"plain": make_plain(case, dtype, ns, device),
             "engine": make_engine(case, MixedPrecisionConfig(dtype=dtype, nonfinite_loss_policy=args.policy), ns,
                                   device)}
    for name, loop in loops.items():
        for _ in range(10):
            loop["step"]()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                loop["step"]()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        cuda_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"\n## {name}: {kernels / args.steps:.0f} kernels per step, {cuda_us / args.steps / 1e3:.2f} ms of "
              "kernel time per step")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
        syncs = [e for e in events if "synchronize" in e.key.lower() or e.key in ("aten::item", "aten::_local_scalar_dense")]
        print("host syncs:", {e.key: e.count for e in syncs})


if __name__ == "__main__":
    main()
