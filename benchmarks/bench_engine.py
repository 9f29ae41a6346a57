"""Engine overhead against a hand-written AMP loop: GPT-2 small and ResNet-50 in fp32, tf32, fp16 and bf16.

For every model and precision, three loops train copies of one initialisation on the same batch:
  plain           torch.autocast + torch.amp.GradScaler (enabled for fp16 only) + AdamW, nanoGPT-style;
  engine          MixedPrecisionTrainer.train_step with a config that mirrors GradScaler's defaults;
  engine_default  MixedPrecisionTrainer.train_step with MixedPrecisionConfig's defaults (NaN-loss check on).
After a warm-up of each, they run in alternating blocks (order reversed every other round) so clock and
thermal drift fall on all three alike. Per-step times come from CUDA events (perf_counter on CPU).

    python benchmarks/bench_engine.py --out results.json          # an H200 (or any CUDA GPU)
    python benchmarks/bench_engine.py --smoke                     # tiny sizes, runs on a CPU in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ampray.amp.bench import available_precisions, time_steps, tf32_mode  # noqa: E402
from ampray.amp.config import MixedPrecisionConfig  # noqa: E402
from ampray.amp.trainer import MixedPrecisionTrainer  # noqa: E402
from ampray.models import build_criterion, build_model, example_batch  # noqa: E402

LOOPS = ("plain", "engine", "engine_default")
EXTRA = ("engine_eager",)  # --eager-scaler: the engine loop with the scale update not captured as a CUDA graph
TIGHT = ("engine_default_tight",)  # --tight: engine_default booking each device-side step before the next
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="gpt2,resnet50", help="comma list of gpt2, resnet50")
    p.add_argument("--precisions", default="fp32,tf32,fp16,bf16", help="those the device lacks are skipped")
    p.add_argument("--gpt-batch", type=int, default=8, help="GPT-2 sequences per step (seq 1024)")
    p.add_argument("--cnn-batch", type=int, default=64, help="ResNet-50 images per step (224x224)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each loop first")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of timed blocks")
    p.add_argument("--iters", type=int, default=10, help="timed steps per block")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--fused", action="store_true", help="fused AdamW in ALL loops (default: fused=False in all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager-scaler", action="store_true",
                   help="also time the engine loop with the eager scale update (AMPRAY_SCALER_GRAPHS=0)")
    p.add_argument("--tight", action="store_true",
                   help="also time engine_default with AMPRAY_DEFER_DEPTH=1 (host waits for the last step's flags)")
    p.add_argument("--tiny", action="store_true",
                   help="the smoke test's tiny models at full rounds: a step bound by kernel launches, not the GPU")
    p.add_argument("--smoke", action="store_true", help="tiny models, 2 steps: checks the script end to end")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.gpt_batch, args.cnn_batch, args.warmup, args.rounds, args.iters = 2, 2, 1, 2, 2
    return args


def build_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model factory (seeded: every loop starts from the same weights), batch, criterion and units."""
    if name == "gpt2":
        kwargs = dict(preset="nano") if args.smoke or args.tiny else dict(preset="small")
        kind, batch = "gpt", args.gpt_batch
    elif name == "resnet50":
        kwargs = dict(arch="resnet50", num_classes=10, width=8, image_size=32) if args.smoke or args.tiny else \
            dict(arch="resnet50", num_classes=1000, image_size=224)
        kind, batch = "cnn", args.cnn_batch
    else:
        raise SystemExit(f"--models: {name!r} is not allowed; expected gpt2 or resnet50")
    torch.manual_seed(args.seed)
    model = build_model(kind, **kwargs)
    x, y = example_batch(kind, model.config, batch, generator=torch.Generator().manual_seed(args.seed))
    tokens = x.shape[1] if kind == "gpt" else None
    return {"name": name, "model": model, "x": x, "y": y, "criterion": build_criterion(kind),
            "batch": batch, "tokens_per_sample": tokens, "config": dict(kwargs)}


def _is_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def make_plain(case: dict[str, Any], dtype: torch.dtype, args, device: torch.device) -> dict[str, Any]:
    """nanoGPT's loop: a ctx that is a null context or autocast, a scaler enabled for fp16 only."""
    model = copy.deepcopy(case["model"]).to(device)
    if device.type == "cuda" and _is_conv(model):
        model = model.to(memory_format=torch.channels_last)  # what the engine's prepare_model does too
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=args.fused)
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x, y, criterion = case["x_dev"], case["y_dev"], case["criterion"]

    def step() -> None:
        with ctx:
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return {"step": step, "model": model, "opt": opt}


def make_engine(case: dict[str, Any], config: MixedPrecisionConfig, args, device: torch.device,
                graphs: bool = True) -> dict[str, Any]:
    trainer = MixedPrecisionTrainer(config, device=device)
    trainer.scaler.use_graphs = trainer.scaler.use_graphs and graphs
    model = trainer.prepare_model(copy.deepcopy(case["model"]))
    # Built directly rather than by trainer.build_optimizer, which would pick fused=True on CUDA: the
    # optimizer must be identical in all loops so that only the step logic differs.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=args.fused)
    x, y, criterion = case["x_dev"], case["y_dev"], case["criterion"]
    return {"step": lambda: trainer.train_step(model, opt, criterion, x, y), "model": model, "opt": opt,
            "trainer": trainer}


def engine_configs(dtype: torch.dtype) -> dict[str, MixedPrecisionConfig]:
    # Like for like: GradScaler's growth_interval (2000, also our default) and no NaN-loss check, because
    # the plain loop has none; with "skip" (the default) fp32/bf16 steps read a loss flag each step (one
    # host-device sync the plain loop does not make). The default config is timed too, so both are visible.
    return {"engine": MixedPrecisionConfig(dtype=dtype, growth_interval=2000, nonfinite_loss_policy="ignore"),
            "engine_default": MixedPrecisionConfig(dtype=dtype)}


def _persistent_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    return params + state


def run_block(loop: dict[str, Any], n: int, device: torch.device) -> list[float]:
    """n timed steps; on CUDA also the transient peak (activations, grads, temporaries) above the start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(loop["step"], n, device)
    if device.type == "cuda":
        loop["transient"] = max(loop.get("transient", 0), torch.cuda.max_memory_allocated(device) - start)
    return times


def bench_precision(case: dict[str, Any], precision: str, args, device: torch.device) -> dict[str, Any]:
    """Warm up the three loops, then alternate timed blocks; the TF32 flags hold for this precision only."""
    dtype = _DTYPES[precision]
    with tf32_mode(precision == "tf32"):
        loops = {"plain": make_plain(case, dtype, args, device)}
        loops.update({k: make_engine(case, c, args, device) for k, c in engine_configs(dtype).items()})
        names = LOOPS + (EXTRA if args.eager_scaler else ()) + (TIGHT if args.tight else ())
        if args.eager_scaler:
            loops["engine_eager"] = make_engine(case, engine_configs(dtype)["engine"], args, device, graphs=False)
        if args.tight:
            loops["engine_default_tight"] = make_engine(case, engine_configs(dtype)["engine_default"], args, device)
            loops["engine_default_tight"]["trainer"].stepper.depth = 1
        for loop in loops.values():
            for _ in range(args.warmup):
                loop["step"]()
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.rounds):
            # Reversing the order every other round puts each loop first and last equally often.
            for k in (names if r % 2 == 0 else names[::-1]):
                times[k] += run_block(loops[k], args.iters, device)
        out = {k: _loop_record(loops[k], times[k], case, device) for k in names}
    del loops
    gc.collect()  # three models and their optimizer states go before the next precision is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _loop_record(loop: dict[str, Any], times: list[float], case: dict[str, Any], device) -> dict[str, Any]:
    median = statistics.median(times)
    tokens = case["tokens_per_sample"]
    # Peak of this loop alone: its weights and optimizer state plus the largest transient of its blocks
    # (the allocator's global peak would also count the other two loops' resident weights).
    peak = _persistent_bytes(loop["model"], loop["opt"]) + loop["transient"] if device.type == "cuda" else None
    return {"median_step_s": median, "mean_step_s": statistics.fmean(times), "min_step_s": min(times),
            "steps": len(times), "samples_per_s": case["batch"] / median,
            "tokens_per_s": case["batch"] * tokens / median if tokens else None, "peak_memory_bytes": peak,
            "step_times_s": times}


def summarise(name: str, precision: str, loops: dict[str, dict[str, Any]],
              fp32_plain_s: float | None) -> dict[str, Any]:
    plain = loops["plain"]["median_step_s"]
    base = fp32_plain_s or float("nan")
    # On a host shared with others the slow phases land on any loop; the lower quartile of the 5-step
    # blocks' medians shows what the code costs when the host is quiet.
    p25 = {k: statistics.quantiles(_blocks(v["step_times_s"]), n=4)[0] if len(v["step_times_s"]) >= 10
           else v["median_step_s"] for k, v in loops.items()}
    return {"model": name, "precision": precision, "loops": loops,
            "engine_over_plain": loops["engine"]["median_step_s"] / plain,
            "engine_default_over_plain": loops["engine_default"]["median_step_s"] / plain,
            "p25_over_plain": {k: v / p25["plain"] for k, v in p25.items()},
            "speedup_vs_fp32_plain": {k: base / v["median_step_s"] for k, v in loops.items()}}


def _blocks(times: list[float], size: int = 5) -> list[float]:
    return [statistics.median(times[i:i + size]) for i in range(0, len(times), size)]


def _x(row: dict[str, Any], loop: str) -> str:
    v = row["speedup_vs_fp32_plain"][loop]
    return "-" if v != v else f"{v:.2f}x"  # NaN: fp32 was not measured in this run


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| model | precision | plain ms | engine ms | engine/plain | engine-default ms | default/plain "
            "| plain samples/s | plain tokens/s | peak GiB plain / engine | speedup vs fp32 plain: plain / engine |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    for r in rows:
        lp = r["loops"]
        tok = lp["plain"]["tokens_per_s"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {lp['plain']['median_step_s'] * 1e3:.2f} "
            f"| {lp['engine']['median_step_s'] * 1e3:.2f} | {r['engine_over_plain']:.3f} "
            f"| {lp['engine_default']['median_step_s'] * 1e3:.2f} | {r['engine_default_over_plain']:.3f} "
            f"| {lp['plain']['samples_per_s']:.1f} | {'-' if tok is None else f'{tok:,.0f}'} "
            f"| {gib(lp['plain']['peak_memory_bytes'])} / {gib(lp['engine']['peak_memory_bytes'])} "
            f"| {_x(r, 'plain')} / {_x(r, 'engine')} |")
    lines += ["", "Lower quartile of the 5-step blocks' medians, over plain's (the cost on a quiet host):", ""]
    for r in rows:
        lines.append(f"- {r['model']} {r['precision']}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in r["p25_over_plain"].items() if k != "plain"))
    return "\n".join(lines)


def environment(args, device: torch.device) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "device": str(device), "gpu": gpu, "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "notes": [f"AdamW(lr={args.lr}, fused={args.fused}) built identically in all loops",
                      "conv nets in channels_last on CUDA in all loops (the engine's prepare_model does it)",
                      "engine: growth_interval=2000, nonfinite_loss_policy='ignore' (GradScaler-like); "
                      "engine_default: MixedPrecisionConfig defaults (nonfinite_loss_policy='skip')",
                      "peak memory per loop = its weights + optimizer state + largest transient of its blocks"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.backends.cudnn.benchmark = True  # autotuned conv algorithms, chosen during the warm-up
    wanted = [p.strip() for p in args.precisions.split(",") if p.strip()]
    precisions = [p for p in wanted if p in available_precisions(device)]
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        case = build_case(name, args)
        x = case["x"].to(device)
        if device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        case.update(x_dev=x, y_dev=case["y"].to(device))
        fp32_plain = None
        # fp32 first when asked for: it is the baseline of the speed-up column (left out: no speed-up).
        for precision in sorted(precisions, key=lambda p: p != "fp32"):
            loops = bench_precision(case, precision, args, device)
            if precision == "fp32":
                fp32_plain = loops["plain"]["median_step_s"]
            rows.append(summarise(name, precision, loops, fp32_plain))
            print(f"done {name} {precision}: " + ", ".join(f"{k} {v['median_step_s'] * 1e3:.2f} ms"
                                                          for k, v in loops.items()), flush=True)
        del case
    result = {"meta": environment(args, device), "skipped_precisions": sorted(set(wanted) - set(precisions)),
              "results": rows}
    print(f"\n# bench_engine: torch {torch.__version__}, {result['meta']['gpu'] or result['meta']['cpu']}, "
          f"{result['meta']['date_utc']}\n")
    print(markdown(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
