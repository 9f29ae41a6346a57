"""`ampray train` with scaling.strategy fsdp against ddp, same model, batch and precision, in one process:
the steady step time (the last report interval's) and each rank's peak GPU memory.

    python benchmarks/bench_fsdp.py --preset small --batch 8 --dtypes bf16,fp16 --steps 40 --out OUT.json

Runs on the embedded cluster (one worker per GPU); with one GPU FSDP shards over one rank, so the figures
show what the sharded path costs, not what it saves (that needs several GPUs: issue 20). `--offload`
adds an fsdp run with the parameters, gradients and optimizer state in CPU memory; `--checkpointing` adds
activation checkpointing to it. `--strategies` picks the runs: "ddp,fsdp" (default), "ddp" alone, or "none"
(only the offload run). A run that fails (out of GPU memory, say) is recorded with its error, and the
others go on: that is how a preset too large for DDP at a batch shows.

    python benchmarks/bench_fsdp.py --preset xl --batch 16 --dtypes bf16 --steps 6 --offload --checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(strategy: str, dtype: str, args, storage: str, offload: bool = False) -> dict:
    from ampray.job import JobConfig
    from ampray.orchestrator.train import run_training

    overrides = {"model.kind": "gpt", "model.options": {"preset": args.preset}, "precision.dtype": dtype,
                 "run.name": f"{strategy}{'-offload' if offload else ''}-{dtype}", "run.storage_path": storage,
                 "run.steps": args.steps, "run.report_every": args.steps // 2, "run.checkpoint_every": args.steps,
                 "data.batch_size": args.batch, "data.num_samples": args.batch * args.steps * 2,
                 "scaling.strategy": strategy}
    if offload:
        overrides["scaling.fsdp_cpu_offload"] = True
        overrides["scaling.activation_checkpointing"] = args.checkpointing
    if args.steps < 10:  # a short run: one report at the end (its interval is every step after the first)
        overrides.update({"run.report_every": 1, "run.checkpoint_every": args.steps})
    overrides["precision.oom_policy"] = "raise"  # an out-of-memory run fails at once instead of skipping
    try:
        outcome = run_training(JobConfig.load(None, overrides))
    except Exception as err:  # noqa: BLE001 - recorded: a configuration that does not fit is a result
        return {"strategy": strategy, "offload": offload, "dtype": dtype, "failed": f"{type(err).__name__}: "
                f"{str(err)[-400:]}", "out_of_memory": "out of memory" in str(err).lower()}
    rank0 = outcome.final[0]
    return {"strategy": strategy, "offload": offload, "dtype": dtype, "workers": outcome.num_workers,
            "step_ms": 1e3 * rank0["perf/interval_step_time_s"],
            "tokens_per_s": rank0.get("perf/interval_tokens_per_s"), "mfu": rank0.get("perf/mfu"),
            "peak_gib": rank0["memory/peak_allocated_bytes"] / 2**30, "loss": rank0["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the offload run")
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for dtype in args.dtypes.split(","):
            for strategy in [s for s in args.strategies.split(",") if s in ("ddp", "fsdp")]:
                rows.append(one(strategy, dtype, args, storage))
                print(json.dumps(rows[-1]), flush=True)
            if args.offload:
                rows.append(one("fsdp", dtype, args, storage, offload=True))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
