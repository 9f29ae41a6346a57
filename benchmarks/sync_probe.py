"""Find where a training step synchronises with the GPU: runs steps with torch's sync debug mode set to
"error", so the first synchronising call raises with its traceback.

    python benchmarks/sync_probe.py [--dtype fp16] [--policy skip] [--fused]
"""

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ampray.amp.config import MixedPrecisionConfig  # noqa: E402
from ampray.amp.trainer import MixedPrecisionTrainer  # noqa: E402
from ampray.models import build_criterion, build_model, example_batch  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--dtype", default="fp16")
p.add_argument("--policy", default="skip")
p.add_argument("--fused", action="store_true")
p.add_argument("--accum", type=int, default=4)
args = p.parse_args()
eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=args.dtype, nonfinite_loss_policy=args.policy,
                                                 gradient_accumulation_steps=args.accum), "cuda")
model = eng.prepare_model(build_model("gpt", preset="micro"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=args.fused)
x, y = example_batch("gpt", {"preset": "micro"}, 8, torch.Generator().manual_seed(0))
x, y, crit = x.cuda(), y.cuda(), build_criterion("gpt")
for _ in range(2 * args.accum):
    eng.train_step(model, opt, crit, x, y)
torch.cuda.set_sync_debug_mode("error")
try:
    for i in range(2 * args.accum):
        eng.train_step(model, opt, crit, x, y)
    print(f"{args}: no synchronising call in {2 * args.accum} steps")
except RuntimeError:
    print(f"{args}: synchronising call at step {i} (micro {eng.counters.micro_in_window})")
    traceback.print_exc(limit=-6)
finally:
    torch.cuda.set_sync_debug_mode("default")
