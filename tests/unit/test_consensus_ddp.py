"""Every decision of the engine is the same on every rank: two real processes (gloo, CPU, DDP), a fault
injected on one rank only, for each policy. Each rank reports a digest of its parameters, its scale and
its counters; the two must be equal (bitwise for the parameters), and each run ends within a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer, OutOfMemoryError
from tests.unit.helpers import free_port, run_scenarios, spawn_ranks

DEADLINE_S = 120
STEPS = 6
FAULT_STEP = 2   # the optimizer step (0-based micro-batch index) at which rank 1 misbehaves
FAULT_RANK = 1


class Fault:
    """What rank FAULT_RANK does wrong, and when (set per scenario in the rank's process)."""

    kind: str | None = None
    step = -1           # the current micro-batch index
    at: set[int] = set()
    above_rows = 0      # OOM only for pieces larger than this (so that a split can succeed)

    @classmethod
    def now(cls, kind: str, rows: int) -> bool:
        return cls.kind == kind and cls.step in cls.at and rows > cls.above_rows


class _OOMInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rows = x.shape[0]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if Fault.now("oom_backward", ctx.rows):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in backward)")
        return grad


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        if Fault.now("oom_forward", x.shape[0]):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in forward)")
        h = torch.tanh(self.a(x))
        h = _OOMInBackward.apply(h)
        out = self.b(h)
        if Fault.now("grad_inf", x.shape[0]):
            out.register_hook(lambda g: torch.full_like(g, float("inf")))
        return out


def criterion(out, y):
    loss = F.cross_entropy(out.float(), y)
    if Fault.now("oom_loss", out.shape[0]):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected in the loss)")
    if Fault.now("nan_loss", out.shape[0]):
        loss = loss + float("nan")  # the gradients stay finite: only the loss is bad
    return loss


# name: (config, fault kind, fault micro-steps, rows above which the OOM fires, trainer class)
SCENARIOS = {
    "clean": ({}, None, set(), 0, MixedPrecisionTrainer),
    "overflow": ({}, "grad_inf", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "nan_loss_skip": ({"nonfinite_loss_policy": "skip"}, "nan_loss", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "nan_loss_skip_bf16": ({"dtype": "bf16"}, "nan_loss", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "nan_loss_raise": ({"nonfinite_loss_policy": "raise"}, "nan_loss", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "oom_forward_skip": ({"oom_policy": "skip"}, "oom_forward", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "oom_loss_skip": ({"oom_policy": "skip"}, "oom_loss", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "oom_backward_skip": ({"oom_policy": "skip"}, "oom_backward", {FAULT_STEP}, 0, MixedPrecisionTrainer),
    "oom_forward_split": ({"oom_policy": "split"}, "oom_forward", {FAULT_STEP}, 4, MixedPrecisionTrainer),
    # two splits in a row (8 rows -> 4 -> 2): with uneven batches every rank must still cut alike
    "oom_forward_split_twice": ({"oom_policy": "split"}, "oom_forward", {FAULT_STEP}, 2, MixedPrecisionTrainer),
    "oom_loss_split": ({"oom_policy": "split"}, "oom_loss", {FAULT_STEP}, 4, MixedPrecisionTrainer),
    "oom_backward_split": ({"oom_policy": "split"}, "oom_backward", {FAULT_STEP}, 4, MixedPrecisionTrainer),
    # the second micro-batch of a window fails in backward after the first added its gradients: dropped
    "oom_backward_split_accum": ({"oom_policy": "split", "gradient_accumulation_steps": 2}, "oom_backward",
                                 {2 * FAULT_STEP + 1}, 4, MixedPrecisionTrainer),
    "collapse_fallback": ({"init_scale": 4.0, "collapse_patience": 2, "collapse_policy": "fallback_bf16"},
                          "grad_inf", {1, 2, 3, 4}, 0, MixedPrecisionTrainer),
    "collapse_raise": ({"init_scale": 4.0, "collapse_patience": 2}, "grad_inf", {1, 2, 3, 4}, 0,
                       MixedPrecisionTrainer),
    "adaptation": ({"growth_interval": 2, "adaptation": {"window": 2, "cooldown": 0, "overflow_rate_high": 0.3,
                                                         "clean_steps_to_increase": 3}},
                   "grad_inf", {1, 2}, 0, AdaptiveMixedPrecisionTrainer),
}


def _batch(rank: int, step: int, rows: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def run_scenario(name: str, rank: int, rows: int = 8) -> dict:
    cfg, kind, at, above, cls = SCENARIOS[name]
    Fault.kind, Fault.at, Fault.above_rows = (kind if rank == FAULT_RANK else None), at, above
    torch.manual_seed(0)
    eng = cls(MixedPrecisionConfig(**{"dtype": "fp16", "init_scale": 2.0**10, **cfg}), "cpu")
    model = nn.parallel.DistributedDataParallel(eng.prepare_model(Net()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    k = eng.config.gradient_accumulation_steps
    for step in range(STEPS * k):
        Fault.step = step
        x, y = _batch(rank, step, rows[rank] if isinstance(rows, tuple) else rows)
        eng.train_step(model, opt, criterion, x, y)
    perf, scaler = eng.get_performance_summary()["performance"], eng.scaler.read()
    return {
        "params": _digest(model), "flat": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist(),
        "scale": scaler.scale, "hysteresis_left": scaler.hysteresis_left, "overflows": scaler.overflows,
        "dtype": str(eng.amp_dtype), "events": [e["kind"] + ":" + e.get("action", "") for e in eng.events],
        "settings": eng.scaler.settings(), "pieces": eng.counters.pieces,
        **{key: perf[key] for key in ("optimizer_steps", "skipped_steps", "oom_skipped_batches",
                                      "oom_split_retries")},
        "oom_events": perf["oom_events"], "nonfinite_losses": perf["nonfinite_losses"],
    }


def _rank_main(rank: int, world: int, port: int, names: list[str], out_dir: str, rows) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    run_scenarios(names, lambda name: run_scenario(name, rank, rows), rank, out_dir)
    dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, names: list[str], rows=8, target=_rank_main) -> tuple[list, list[dict]]:
    """Run `names` in two spawned ranks; returns their exit codes and their results (kills on deadline)."""
    port = free_port()
    codes, hung = spawn_ranks(target, lambda r: (r, 2, port, names, str(tmp_path), rows), 2, DEADLINE_S)
    assert not hung, f"rank(s) {hung} did not finish within {DEADLINE_S} s: a collective hung"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) if (tmp_path / f"rank{r}.json").exists()
               else {} for r in range(2)]
    return codes, results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """All scenarios in one pair of processes (one start-up for the lot)."""
    codes, results = run_two_ranks(tmp_path_factory.mktemp("consensus"), list(SCENARIOS))
    assert codes == [0, 0], f"exit codes {codes}"
    return results


def both(ranks, name) -> tuple[dict, dict]:
    a, b = ranks[0][name], ranks[1][name]
    assert "trace" not in a or "error" in b, a.get("trace")
    return a, b


def assert_agree(a: dict, b: dict) -> None:
    assert "error" not in a and "error" not in b, (a.get("trace"), b.get("trace"))
    for key in ("params", "scale", "hysteresis_left", "overflows", "dtype", "events", "settings", "pieces",
                "optimizer_steps", "skipped_steps", "oom_skipped_batches", "oom_split_retries"):
        assert a[key] == b[key], f"{key}: rank 0 {a[key]!r} != rank 1 {b[key]!r}"


def test_clean_run_agrees_and_steps_every_time(ranks):
    a, b = both(ranks, "clean")
    assert_agree(a, b)
    assert a["skipped_steps"] == 0 and a["optimizer_steps"] == STEPS


def test_overflow_on_one_rank_is_skipped_by_both(ranks):
    a, b = both(ranks, "overflow")
    assert_agree(a, b)
    assert a["skipped_steps"] == 1 and a["overflows"] == 1 and a["scale"] == 2.0**9


def test_nan_loss_on_one_rank_with_finite_gradients_is_skipped_by_both(ranks):
    a, b = both(ranks, "nan_loss_skip")
    assert_agree(a, b)
    assert a["skipped_steps"] == 1 and a["scale"] == 2.0**9  # carried as non-finite gradients: an overflow
    assert (a["nonfinite_losses"], b["nonfinite_losses"]) == (0, 1)  # each rank counts what it saw


def test_nan_loss_on_one_rank_without_loss_scaling_is_skipped_by_both(ranks):
    a, b = both(ranks, "nan_loss_skip_bf16")
    assert_agree(a, b)
    assert a["skipped_steps"] == 1 and a["dtype"] == "torch.bfloat16"


def test_nan_loss_raise_ends_both_ranks_with_the_same_error(ranks):
    a, b = both(ranks, "nan_loss_raise")
    assert a["error"] == b["error"]
    assert a["error"].startswith("NonFiniteLossError: non-finite loss on rank(s) [1] at training step 3")


@pytest.mark.parametrize("where", ["forward", "loss", "backward"])
def test_oom_skip_on_one_rank_drops_the_window_on_both(ranks, where):
    a, b = both(ranks, f"oom_{where}_skip")
    assert_agree(a, b)
    assert a["skipped_steps"] == 1 and a["oom_skipped_batches"] == 1 and a["scale"] == 2.0**10  # no overflow
    assert (a["oom_events"], b["oom_events"]) == (0, 1)


@pytest.mark.parametrize("where", ["forward", "loss", "backward"])
def test_oom_split_on_one_rank_retries_halves_on_both_and_matches_the_clean_run(ranks, where):
    a, b = both(ranks, f"oom_{where}_split")
    assert_agree(a, b)
    assert a["skipped_steps"] == 0 and a["oom_split_retries"] == 1 and a["pieces"] == 2
    clean = ranks[0]["clean"]["flat"]
    torch.testing.assert_close(torch.tensor(a["flat"]), torch.tensor(clean), rtol=1e-3, atol=1e-4)


def test_oom_in_backward_after_accumulated_gradients_drops_the_window_on_both(ranks):
    a, b = both(ranks, "oom_backward_split_accum")
    assert_agree(a, b)
    assert a["skipped_steps"] == 1 and a["oom_skipped_batches"] == 1 and a["pieces"] == 2


def test_scale_collapse_falls_back_to_bf16_on_both(ranks):
    a, b = both(ranks, "collapse_fallback")
    assert_agree(a, b)
    assert a["dtype"] == "torch.bfloat16" and a["events"] == ["scale_collapse:fallback_bf16"]


def test_scale_collapse_raise_ends_both_ranks_with_the_same_error(ranks):
    a, b = both(ranks, "collapse_raise")
    assert a["error"] == b["error"] and a["error"].startswith("ScaleCollapseError: loss scale collapsed")


def test_adaptation_changes_the_same_settings_on_both(ranks):
    a, b = both(ranks, "adaptation")
    assert_agree(a, b)
    assert a["settings"]["growth_interval"] != 2  # it did adapt


def test_uneven_batches_split_the_same_number_of_pieces(tmp_path):
    # rank 1 has 3 rows, rank 0 has 8: an OOM on rank 1 splits both into as many pieces
    codes, results = run_two_ranks(tmp_path, ["oom_forward_split", "oom_backward_skip"], rows=(8, 3))
    assert codes == [0, 0]
    for name in ("oom_forward_split", "oom_backward_skip"):
        assert_agree(results[0][name], results[1][name])
    # rank 1's 3 rows never exceed the 4-row limit of the split scenario: nothing to retry
    assert results[0]["oom_forward_split"]["oom_split_retries"] == 0
    assert results[0]["oom_backward_skip"]["oom_skipped_batches"] == 1


def _raise_main(rank: int, world: int, port: int, names: list[str], out_dir: str, rows) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    SCENARIOS["oom_raise"] = ({"oom_policy": "raise"}, "oom_loss", {FAULT_STEP}, 0, MixedPrecisionTrainer)
    try:
        run_scenario("oom_raise", rank)
        message = "finished"
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"oom_raise": {"error": message}}))
    os._exit(1 if message != "finished" else 0)  # as a launcher ends a failed worker: no clean shutdown


def test_two_splits_with_uneven_batches_cut_the_same_pieces_on_both(tmp_path):
    # rank 0 has 2 rows, rank 1 has 8 and runs out of memory above 2: 8 -> 4 -> 2, and rank 0's rows are
    # cut into as many pieces (some empty), so the two ranks make the same collectives
    codes, results = run_two_ranks(tmp_path, ["oom_forward_split_twice"], rows=(2, 8))
    assert codes == [0, 0]
    a, b = results[0]["oom_forward_split_twice"], results[1]["oom_forward_split_twice"]
    assert_agree(a, b)
    assert a["oom_split_retries"] == 2 and a["pieces"] == 4 and a["skipped_steps"] == 0


def test_oom_raise_on_one_rank_ends_both_within_the_deadline(tmp_path):
    codes, results = run_two_ranks(tmp_path, [], target=_raise_main)
    assert codes[FAULT_RANK] == 1
    assert results[FAULT_RANK]["oom_raise"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    # the peer was waiting in DDP's all-reduce: the broken connection ends it (no hang)
    assert codes[0] == 1 and results[0]["oom_raise"]["error"] != "finished"
