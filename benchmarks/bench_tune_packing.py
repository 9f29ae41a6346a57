"""`ampray tune`: trials packed on one GPU (fractional GPUs) against the same trials one at a time.

    python benchmarks/bench_tune_packing.py --trials 8 --gpus-per-trial 0.25 --out tune_packing.json
    python benchmarks/bench_tune_packing.py --smoke        # CPU: checks the script

Runs the same search twice, one after the other, on the same host and an embedded Ray: the same sampled
trials (same space, seed and FIFO scheduler, so every trial runs its whole step budget), first with
`--gpus-per-trial 0.25` and as many trials at once as fit, then with a whole GPU per trial and one trial
at a time. Reports both wall times (the whole command, Ray start-up included, and Tune's own run time),
the packing speed-up, and each trial's throughput, objective and placement (node:GPU) read back from
results.parquet, with the number of trials each GPU ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def search(args, storage: Path, name: str, gpus: float, concurrent: int) -> dict:
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "ampray.orchestrator.cli", "tune", "--name", name, "--samples", str(args.trials),
           "--scheduler", "fifo", "--space", args.space, "--seed", "0", "--max-concurrent", str(concurrent),
           "--gpus-per-trial", str(gpus), "--run.storage_path", str(storage), "--model.kind", "gpt",
           "--data.batch_size", str(args.batch_size), "--data.num_samples", str(args.num_samples),
           "--run.steps", str(args.steps), "--run.report_every", str(args.steps // 4),
           "--run.checkpoint_every", str(args.steps), "--run.num_to_keep", "1"]
    if args.preset:
        cmd += ["--model.options.preset", args.preset]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(f"ampray tune failed:\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}")
    rows = pq.read_table(storage / name / "results.parquet").to_pylist()
    keep = ("trial", "status", "objective", "samples_per_s", "peak_memory_bytes", "step", "placement")
    run = {"gpus_per_trial": gpus, "max_concurrent": concurrent, "wall_s": wall,
           "trials": [{k: r.get(k) for k in keep} | {p: r[p] for p in r if p.startswith("precision.")}
                      for r in rows]}
    # How evenly the trials were spread: trials per node:GPU (a trial of several workers counts on each).
    spread: dict[str, int] = {}
    for t in run["trials"]:
        for where in (t.get("placement") or "?").split(";"):
            spread[where] = spread.get(where, 0) + 1
    run["trials_per_gpu"] = dict(sorted(spread.items()))
    sps = [t["samples_per_s"] for t in run["trials"] if t["samples_per_s"]]
    print(f"{name}: {args.trials} trials at {gpus} GPU each, {concurrent or 'as many as fit'} at once: "
          f"{wall:.1f} s; statuses {sorted({t['status'] for t in run['trials']})}"
          + (f"; samples/s per trial {min(sps):.0f}..{max(sps):.0f}" if sps else "")
          + f"; trials per node:GPU {run['trials_per_gpu']}", flush=True)
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--gpus-per-trial", type=float, default=0.25)
    p.add_argument("--space", default="scaler")
    p.add_argument("--preset", default="", help="GPT preset; empty: the default GPT (GPT-2 small, 124M)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="CPU workers, tiny GPT, 2 trials")
    p.add_argument("--packed-only", action="store_true",
                   help="the packed search alone (wall time and placement over every GPU of the host)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.smoke:
        args.trials, args.preset, args.steps, args.gpus_per_trial = 2, "nano", 20, 0.0
    packed_n = args.trials if args.gpus_per_trial else 0
    with tempfile.TemporaryDirectory() as tmp:
        packed = search(args, Path(tmp), "packed", args.gpus_per_trial, packed_n)
        if args.packed_only:
            if args.out:
                args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "packed": packed},
                                               indent=2, default=str))
            return
        serial = search(args, Path(tmp), "serial", 1.0 if args.gpus_per_trial else 0.0, 1)
    speedup = serial["wall_s"] / packed["wall_s"]
    print(f"{args.trials} trials: packed ({args.gpus_per_trial} GPU each) {packed['wall_s']:.1f} s, "
          f"one at a time {serial['wall_s']:.1f} s: packing {speedup:.2f}x faster")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "packed": packed,
                                        "serial": serial, "speedup": speedup}, indent=2, default=str))


if __name__ == "__main__":
    main()
