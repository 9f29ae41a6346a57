"""The engine's host time per optimizer step on the CPU, where a tiny model makes the step all host work:
148 parameters (as GPT-2 small has) in 74 small Linear layers, bf16 autocast, the NaN-loss check on
("skip", the default) and off ("ignore"). Run it from two checkouts to compare versions of the engine:

    (cd OLD && PYTHONPATH=$PWD python benchmarks/host_overhead.py); python benchmarks/host_overhead.py
"""

import time

import torch

import ampray
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer


def main() -> None:
    print(ampray.__file__)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(74)])
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    for policy in ("skip", "ignore"):
        eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", nonfinite_loss_policy=policy), device="cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        for _ in range(20):
            eng.train_step(model, opt, torch.nn.functional.mse_loss, x, y)
        blocks = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(100):
                eng.train_step(model, opt, torch.nn.functional.mse_loss, x, y)
            blocks.append((time.perf_counter() - t) / 100 * 1e6)
        print(f"bf16 nonfinite_loss_policy={policy}: us/step min {min(blocks):.0f}, median {sorted(blocks)[2]:.0f}")


if __name__ == "__main__":
    main()
