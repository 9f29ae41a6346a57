"""What `model.compile` costs and saves for ampray's GPT on one GPU: the time of the first (compiling) steps,
the steady step time eager and compiled, and the run length from which compiling pays for itself
(`ampray.job.COMPILE_PAYS_AFTER_STEPS` is set from it).

    python benchmarks/bench_compile_cost.py --preset small --batch 16 --dtype bf16 --out OUT.json

The engine's train_step with its default config around the model, fused AdamW, as `ampray train` runs it
(the model compiled in place, as the worker does). One process: eager first, then a fresh copy compiled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ampray.amp.config import MixedPrecisionConfig  # noqa: E402
from ampray.amp.trainer import MixedPrecisionTrainer  # noqa: E402
from ampray.models.gpt import GPT, GPTConfig, lm_loss  # noqa: E402


def _timed(engine, model, opt, x, y, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.train_step(model, opt, lm_loss, x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def run(preset: str, batch: int, dtype: str, steady: int) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig.preset(preset)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
    out = {"preset": preset, "batch": batch, "dtype": dtype, "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        if mode == "compiled":
            torch._dynamo.reset()
            model.compile()
        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=dtype))
        opt = engine.build_optimizer(model, lr=3e-4)
        t0 = time.perf_counter()
        first = _timed(engine, model, opt, x, y, 3)  # compiles (and autotunes nothing: default mode)
        warm = time.perf_counter() - t0
        times = sorted(_timed(engine, model, opt, x, y, steady))
        out[mode] = {"first_3_steps_s": warm, "first_step_s": first[0], "median_step_ms": 1e3 * times[len(times) // 2]}
        del model, opt, engine
        torch.cuda.empty_cache()
    saved_s = (out["eager"]["median_step_ms"] - out["compiled"]["median_step_ms"]) / 1e3
    cost_s = out["compiled"]["first_3_steps_s"] - 3 * out["eager"]["median_step_ms"] / 1e3
    out["compile_cost_s"] = cost_s
    out["saved_per_step_ms"] = saved_s * 1e3
    out["pays_after_steps"] = int(cost_s / saved_s) if saved_s > 0 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--steady", type=int, default=40)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = run(args.preset, args.batch, args.dtype, args.steady)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
