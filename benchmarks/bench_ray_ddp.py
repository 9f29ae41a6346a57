"""`ampray train` (Ray Train, DDP) against plain torchrun DDP: the same GPT, batch and precision.

    python benchmarks/bench_ray_ddp.py --workers 1,2 --dtypes fp16,bf16 --preset small --out ray_ddp.json
    python benchmarks/bench_ray_ddp.py --smoke          # CPU, gloo, tiny model: checks the script

Per configuration, one after the other on the same host: torchrun runs benchmarks/plain_ddp.py; then
`ampray train` runs on an embedded Ray with the same settings, and its steady-state step time is the
mean of rank 0's `perf/interval_step_time_s` over the report intervals after warm-up, read back from
the run's TensorBoard events (mean over the timed window; torchrun's figure is the same mean,
measured with CUDA events from the first timed step's start to the last one's end). Reports the Ray/plain step-time ratio and the 2-worker scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain(n: int, dtype: str, args, runner: str = "plain") -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / "benchmarks" / "plain_ddp.py"), "--preset", args.preset, "--dtype", dtype,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps - args.warmup),
           "--warmup", str(args.warmup), "--runner", runner, "--accum", str(args.accum),
           "--allreduce-dtype", args.allreduce_dtype]
    if runner == "engine":  # the worker's report cadence too: only handing reports to Ray is left out
        cmd += ["--report-every", str(args.report_every)]
    if args.bind_cpus:
        cmd += ["--bind-cpus"]
    if args.compile:
        cmd += ["--compile"]
    if args.profile:
        cmd += ["--profile", args.profile, "--profile-out", str(args.profile_dir / f"{dtype}-{n}w-r{args.rep}")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200,
                         env=_nccl_env(args, f"{runner}-{dtype}-{n}w"))
    if out.returncode:
        raise SystemExit(f"torchrun failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


ANCHOR_CODE = """
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("anchor_gpt", sys.argv[1]); a = importlib.util.module_from_spec(spec)
spec.loader.exec_module(a)
B, steps, warmup, prec, comp = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
gen = lambda: (torch.randint(0, 50304, (B, 1024), device="cuda"), torch.randint(0, 50304, (B, 1024), device="cuda"))
print(json.dumps(a.run_case("gpt2-124M", a.GPT, gen, steps, warmup, prec, compile_=comp)))
"""


def anchor(n: int, dtype: str, args) -> dict:
    """The plain-PyTorch reference (`../shared/gpu/anchor_gpt.py`, imported from --anchor, not copied): its
    nanoGPT-style GPT-2 124M and loop at the same batch and precision, one GPU, in its own process."""
    if n != 1 or args.accum != 1 or args.preset != "small":
        raise SystemExit("--runners anchor: one worker, --accum 1 and --preset small only (the reference is "
                         "GPT-2 124M on one GPU)")
    cmd = [sys.executable, "-c", ANCHOR_CODE, str(args.anchor), str(args.batch_size), str(args.steps - args.warmup),
           str(args.warmup), dtype, "1" if args.compile else "0"]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    if out.returncode:
        raise SystemExit(f"the reference failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    r = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return {"runner": "anchor", "world_size": 1, "dtype": dtype, "mean_step_s": r["step_s"],
            "peak_gib": r["peak_gib"], "samples_per_s": args.batch_size / r["step_s"], "wall_s": time.time() - t0,
            "final_loss": r["loss"]}


def _nccl_env(args, tag: str) -> dict | None:
    """With --nccl-debug DIR: NCCL's INFO log of every rank into DIR/<tag>-<host>-<pid>.log (transport,
    channels, algorithm and protocol choices), the same for torchrun and for Ray's workers, which inherit
    the environment of the driver that starts the embedded cluster."""
    if not args.nccl_debug:
        return None
    args.nccl_debug.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,GRAPH,TUNING,ENV",
                NCCL_DEBUG_FILE=str(args.nccl_debug.resolve() / f"{tag}-%h-%p.log"))


def ray(n: int, dtype: str, args, storage: Path, runner: str = "ray") -> dict:
    from ampray.actors.aggregator import read_scalars

    name = f"bench-{n}w-{dtype}-{int(time.time())}"
    cmd = [sys.executable, "-m", "ampray.orchestrator.cli", "train", "--name", name,
           "--run.storage_path", str(storage), "--model.kind", "gpt", "--model.options.preset", args.preset,
           "--precision.dtype", dtype, "--data.batch_size", str(args.batch_size * args.accum),
           "--precision.gradient_accumulation_steps", str(args.accum), "--scaling.allreduce_dtype", args.allreduce_dtype, "--data.num_samples", "512",
           "--scaling.num_workers", str(n), "--run.steps", str(args.steps), "--run.report_every",
           str(args.report_every), "--run.checkpoint_every", str(10**6), "--optimizer.lr", "3e-4",
           "--optimizer.schedule", "constant", "--run.adaptive", "false",
           "--scaling.bind_cpus", "true" if args.bind_cpus else "false",
           "--model.compile", "true" if args.compile else "false"]
    if args.smoke:
        cmd += ["--scaling.use_gpu", "false"]
    t0 = time.time()
    env = _nccl_env(args, f"{runner}-{dtype}-{n}w") or dict(os.environ)
    if runner == "rayvar":  # `ampray train` again, with --variant-env's variables set for the whole cluster
        env.update(kv.split("=", 1) for kv in args.variant_env.split(",") if kv)
    if args.profile:
        env["AMPRAY_PROFILE"] = args.profile
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    if out.returncode:
        raise SystemExit(f"ampray train failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    if args.profile:
        for f in (storage / name / "profile").glob("rank*.txt"):
            dest = args.profile_dir / f"{dtype}-{n}w-r{args.rep}" / f"{runner}-{f.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    scalars = read_scalars(str(storage / name / "tensorboard"))
    points = [(s, v) for s, v in scalars["rank0/perf/interval_step_time_s"] if s > args.warmup]
    mean = statistics.fmean(v for _, v in points)  # equal intervals: the mean over the timed window
    return {"runner": runner, "world_size": n, "dtype": dtype, "mean_step_s": mean,
            "median_interval_s": statistics.median(v for _, v in points), "intervals": points,
            "samples_per_s": args.batch_size * args.accum * n / mean, "wall_s": time.time() - t0,
            "final_loss": scalars["all/loss/mean"][-1][1],
            "mfu": statistics.fmean(v for s, v in scalars.get("rank0/perf/mfu", []) if s > args.warmup)
            if any(s > args.warmup for s, _ in scalars.get("rank0/perf/mfu", [])) else None,
            "peak_gib": max((v for _, v in scalars.get("rank0/memory/peak_allocated_bytes", [])), default=0) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", default="1,2")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--allreduce-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--runners", default="plain,engine,ray",
                   help="engine: the worker's step and reports under torchrun; rayvar: ray with --variant-env; "
                        "anchor: the plain-PyTorch reference model and loop (one GPU)")
    p.add_argument("--variant-env", default="", help="KEY=VAL,...: the environment of runner 'rayvar' "
                   "(`ampray train` with these set), e.g. RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2")
    p.add_argument("--repeats", type=int, default=1, help="runs of every configuration, interleaved")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--warmup", type=int, default=50, help="steps left out of the means (a multiple of report_every)")
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--bind-cpus", action="store_true", help="every runner binds each rank to its own physical cores")
    p.add_argument("--compile", action="store_true", help="every runner torch.compiles the model (model.compile)")
    p.add_argument("--profile", default="", help="START:COUNT: profile those steps in every runner")
    p.add_argument("--profile-dir", type=Path, default=Path("profiles"))
    p.add_argument("--nccl-debug", type=Path, default=None, help="write NCCL's INFO logs of every rank here")
    p.add_argument("--smi", type=Path, default=None,
                   help="an nvidia-smi --query-gpu=timestamp,index,utilization.gpu,clocks.sm,power.draw "
                        "--format=csv,noheader -lms 200 log taken during the run: each run's GPU conditions")
    p.add_argument("--anchor", type=Path, default=ROOT / ".gpukit" / "anchor_gpt.py",
                   help="the plain-PyTorch reference that runner 'anchor' imports (the kit copies it there)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.smoke:
        args.preset, args.batch_size, args.steps, args.warmup, args.report_every = "nano", 4, 40, 20, 10
        args.dtypes = "bf16"
    runners = args.runners.split(",")
    if "rayvar" in runners and not args.variant_env:
        p.error("--runners rayvar needs --variant-env KEY=VAL[,KEY=VAL]")
    bad = [kv for kv in args.variant_env.split(",") if kv and "=" not in kv]
    if bad:
        p.error(f"--variant-env={args.variant_env!r}: {bad} not KEY=VAL")
    rows = []  # one per (repeat, dtype, workers): {"plain": ..., "engine": ..., "ray": ...}
    with tempfile.TemporaryDirectory() as storage:
        for rep in range(args.repeats):
            args.rep = rep  # names the profile folders
            for dtype in args.dtypes.split(","):
                for n in map(int, args.workers.split(",")):
                    # Alternate which runner goes first: a host that drifts favours neither side.
                    order = runners if rep % 2 == 0 else runners[::-1]
                    r = {}
                    for runner in order:
                        t0 = time.time()
                        r[runner] = (ray(n, dtype, args, Path(storage), runner) if runner.startswith("ray")
                                     else anchor(n, dtype, args) if runner == "anchor"
                                     else plain(n, dtype, args, runner))
                        r[runner]["window"] = (t0, time.time())
                    rows.append({k: r[k] for k in runners} | {"repeat": rep})
                    print(f"[{rep}] {dtype} x{n}: " + ", ".join(f"{k} {r[k]['mean_step_s'] * 1e3:.2f} ms"
                                                                 for k in runners), flush=True)
                    save(rows, args)  # after every row: a run cut short keeps what it measured
    if args.smi:
        gpu_conditions(rows, runners, args)
    summarise(rows, runners, args)


def gpu_conditions(rows: list[dict], runners: list[str], args) -> None:
    """Each run's GPU conditions from an `nvidia-smi ... -lms` log taken alongside (--smi): mean SM clock,
    utilisation and power of the GPUs it used over the samples where they were busy at all (util >= 10%:
    start-up and teardown left out, a host-bound run at 30% kept), so a run that drew a slower GPU state
    or left the GPU waiting shows itself."""
    from datetime import datetime

    samples = []  # (unix time, gpu index, util %, sm MHz, W)
    for line in args.smi.read_text().splitlines():
        try:
            ts, idx, util, sm, power = [v.strip() for v in line.split(",")][:5]
            t = datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, int(idx), float(util.split()[0]), float(sm.split()[0]), float(power.split()[0])))
        except ValueError:
            continue
    for row in rows:
        for k in runners:
            run = row[k]
            lo, hi = run["window"]
            busy = [s for s in samples if lo <= s[0] <= hi and s[1] < run["world_size"] and s[2] >= 10]
            if busy:
                run["gpu"] = {"samples": len(busy), "util_pct": statistics.fmean(s[2] for s in busy),
                              "sm_mhz": statistics.fmean(s[3] for s in busy),
                              "power_w": statistics.fmean(s[4] for s in busy)}
                print(f"[{row['repeat']}] {run['dtype']} x{run['world_size']} {k}: {run['mean_step_s'] * 1e3:.2f} ms; "
                      f"GPU util {run['gpu']['util_pct']:.0f}%, SM {run['gpu']['sm_mhz']:.0f} MHz, "
                      f"{run['gpu']['power_w']:.0f} W over {len(busy)} samples", flush=True)
    save(rows, args)


def save(rows: list[dict], args) -> None:
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))


def summarise(rows: list[dict], runners: list[str], args) -> None:
    """Median over repeats of each runner's mean step time, with the range, and the ratios to the first
    runner named (plain when it ran)."""
    base = "plain" if "plain" in runners else runners[0]

    def med(dtype, n, runner):
        vals = [r[runner]["mean_step_s"] for r in rows if r[base]["dtype"] == dtype and r[base]["world_size"] == n]
        return statistics.median(vals), min(vals), max(vals)

    others = [k for k in runners if k != base]
    print("| dtype | workers | " + "".join(f"{k} ms/step (min..max) | " for k in runners)
          + "".join(f"{k}/{base} | " for k in others).rstrip())
    print("|---|---|" + "---|" * (len(runners) + len(others)))
    samples = {}
    for dtype in args.dtypes.split(","):
        for n in map(int, args.workers.split(",")):
            stats = {k: med(dtype, n, k) for k in runners}
            samples[dtype, n] = {k: args.batch_size * args.accum * n / v[0] for k, v in stats.items()}
            cells = [f"{m * 1e3:.2f} ({lo * 1e3:.2f}..{hi * 1e3:.2f})" for m, lo, hi in stats.values()]
            ratios = [f"{stats[k][0] / stats[base][0]:.3f}" for k in others]
            print((f"| {dtype} | {n} | " + "".join(f"{c} | " for c in cells + ratios)).rstrip())
    for dtype in args.dtypes.split(","):
        for n in map(int, args.workers.split(",")):
            peaks = {k: max((r[k].get("peak_gib") or 0) for r in rows
                            if r[base]["dtype"] == dtype and r[base]["world_size"] == n) for k in runners}
            mfus = [r[k]["mfu"] for r in rows for k in runners if r[k].get("mfu")
                    and r[base]["dtype"] == dtype and r[base]["world_size"] == n]
            if mfus:
                print(f"{dtype} x{n} MFU reported by `ampray train` (rank 0): median {statistics.median(mfus):.3f}")
            if any(peaks.values()):
                print(f"{dtype} x{n} peak GiB (rank 0): " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items() if v))
            if n > 1 and (dtype, 1) in samples:
                for k in runners:
                    speedup = samples[dtype, n][k] / samples[dtype, 1][k]
                    print(f"{dtype} {k}: {n}-worker throughput = {speedup:.2f}x one worker "
                          f"(scaling efficiency {speedup / n:.3f})")

if __name__ == "__main__":
    main()
