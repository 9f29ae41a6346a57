"""What the checkpoint manifest costs: GPT-2 small's full state (model + AdamW moments, ~1.5 GB) written by
plain torch.save and by ampray's hashing writer (SHA-256 while writing, no second read), alternating, same
run; and the time a resume spends verifying it (one read and hash).

    python benchmarks/bench_checkpoint.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ampray.actors.manifest import Files, verify  # noqa: E402
from ampray.models import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    model = build_model("gpt", preset=args.preset)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    state = {"model": params, "exp_avg": {k: torch.randn_like(v) for k, v in params.items()},
             "exp_avg_sq": {k: torch.rand_like(v) for k, v in params.items()}}
    size = sum(t.numel() * t.element_size() for d in state.values() for t in d.values())
    times: dict[str, list[float]] = {"torch.save": [], "hashed": [], "verify": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for r in range(args.repeats):
            for name in (("torch.save", "hashed") if r % 2 == 0 else ("hashed", "torch.save")):
                folder = Path(root) / f"{name}-{r}"
                folder.mkdir()
                t0 = time.perf_counter()
                if name == "torch.save":
                    with open(folder / "state.pt", "wb") as f:
                        torch.save(state, f)
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    files = Files(folder, 0)
                    files.save("state.pt", state)
                    files.seal(world=1)
                times[name].append(time.perf_counter() - t0)
                if name == "hashed":
                    t0 = time.perf_counter()
                    assert verify(folder) is None
                    times["verify"].append(time.perf_counter() - t0)
                (folder / "state.pt").unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"preset": args.preset, "state_bytes": size, "median_s": {k: round(v, 3) for k, v in med.items()},
                      "hashed_over_torch_save": round(med["hashed"] / med["torch.save"], 3),
                      "verify_GB_per_s": round(size / med["verify"] / 1e9, 2), "all_s": times}))


if __name__ == "__main__":
    main()
