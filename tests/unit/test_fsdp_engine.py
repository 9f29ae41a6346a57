"""The engine under FSDP2 (`fully_shard`): two real processes (gloo, CPU, a 1-D mesh over both), a small
transformer-block model sharded per block and at the root. Each rank reports its losses, scales, flags,
norms, counters and digests of the gathered (full) parameters; the two must agree (bitwise where the
decision is a skip), and match DDP of the same init and data where the arithmetic is the same. Each run
ends within a deadline, so a hung collective fails the test instead of the suite.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from tests.unit.helpers import free_port, mesh_rank_main, spawn_ranks

DEADLINE_S = 120
FAULT_STEP = 2  # the step at which rank 1 misbehaves
FAULT_RANK = 1
POISONED = "blocks.0.fc1.weight"  # the parameter whose shard overflows on rank 1 only
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6  # FSDP vs DDP in fp32: other reduction orders, same arithmetic


class Fault:
    kind: str | None = None
    step = -1

    @classmethod
    def now(cls, kind: str) -> bool:
        return cls.kind == kind and cls.step == FAULT_STEP


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def criterion(out, y):
    loss = F.cross_entropy(out.float(), y)
    if Fault.now("nan_loss"):
        loss = loss + float("nan")
    return loss


# name: (engine config, "fsdp"|"ddp", FSDP policy from the config?, optimizer, steps, fault, same batch each step)
SCENARIOS = {
    "fp32_fsdp": ({"dtype": "fp32"}, "fsdp", False, "sgd", 5, None, False),
    "fp32_ddp": ({"dtype": "fp32"}, "ddp", False, "sgd", 5, None, False),
    "clip_fsdp": ({"dtype": "fp32", "max_grad_norm": 0.05}, "fsdp", False, "sgd", 4, None, False),
    "clip_ddp": ({"dtype": "fp32", "max_grad_norm": 0.05}, "ddp", False, "sgd", 4, None, False),
    "overflow_fsdp": ({"dtype": "fp16", "init_scale": 2.0**10}, "fsdp", False, "sgd", 4, "grad_inf", False),
    "overflow_fsdp_fused": ({"dtype": "fp16", "init_scale": 2.0**10}, "fsdp", False, "adamw_fused", 4, "grad_inf",
                            False),
    "accum_fsdp": ({"dtype": "fp32", "gradient_accumulation_steps": 2}, "fsdp", False, "sgd", 6, None, False),
    "accum_ddp": ({"dtype": "fp32", "gradient_accumulation_steps": 2}, "ddp", False, "sgd", 6, None, False),
    # the user's own loop turns FSDP's gradient sync off on the window's first micro-batch (Lightning's
    # no_backward_sync): FSDP accumulates unsharded gradients and reduce-scatters once, at the last one
    "accum_nosync_fsdp": ({"dtype": "fp32", "gradient_accumulation_steps": 2}, "fsdp", False, "sgd", 6, None, False),
    "nan_loss_fsdp": ({"dtype": "fp32"}, "fsdp", False, "sgd", 4, "nan_loss", False),
    "nan_loss_raise_fsdp": ({"dtype": "fp32", "nonfinite_loss_policy": "raise"}, "fsdp", False, "sgd", 4, "nan_loss",
                            False),
    "bf16_fsdp": ({"dtype": "bf16"}, "fsdp", True, "adamw", 8, None, True),
    "bf16_ddp": ({"dtype": "bf16"}, "ddp", False, "adamw", 8, None, True),
    # fp16 parameters (MixedPrecisionPolicy) and a scale far too large: fp16 gradients overflow until it
    # has backed off enough, then the run steps and grows it again
    "fp16_backoff_fsdp": ({"dtype": "fp16", "init_scale": 2.0**30, "max_scale": 2.0**32, "backoff_factor": 2.0**-8,
                           "growth_interval": 2}, "fsdp", True, "sgd", 6, None, False),
}


def _batch(rank: int, step: int, rows: int = 8):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(rows, 8, generator=g), torch.randint(0, 4, (rows,), generator=g)


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _optimizer(kind: str, model: nn.Module):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=kind == "adamw_fused")


def _poison_shard(param: torch.Tensor) -> None:
    """Rank 1's shard of `param` becomes inf after FSDP's reduce-scatter, at the fault step (rank 0's
    shard of the same parameter stays finite: only a collective decision can skip both)."""
    def hook(p):
        if Fault.now("grad_inf"):
            p.grad.to_local().fill_(float("inf"))
    param.register_post_accumulate_grad_hook(hook)


def run_scenario(name: str, rank: int, mesh) -> dict:
    from ampray.amp.sharding import build_mp_policy, shard_model

    if name == "hsdp_refused":
        return _hsdp_refused()
    cfg, wrap, policy, opt_kind, steps, fault, same_batch = SCENARIOS[name]
    Fault.kind = fault if rank == FAULT_RANK else None
    eng = MixedPrecisionTrainer(MixedPrecisionConfig(**cfg), "cpu")
    torch.manual_seed(0)
    model = eng.prepare_model(Net())
    if wrap == "fsdp":
        model = shard_model(model, mesh, build_mp_policy(eng.config) if policy else None, blocks=("Block",))
        if fault == "grad_inf" and rank == FAULT_RANK:
            _poison_shard(dict(model.named_parameters())[POISONED])
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(opt_kind, model)
    rec: dict = {k: [] for k in ("loss", "skipped", "scale", "scale_used", "grad_norm", "full", "local")}
    for step in range(steps):
        Fault.step = step
        x, y = _batch(rank, 0 if same_batch else step)
        if name == "accum_nosync_fsdp":
            model.set_requires_gradient_sync(step % cfg["gradient_accumulation_steps"] == 1)
        out = eng.train_step(model, opt, criterion, x, y)
        rec["loss"].append(out.loss.item())
        rec["skipped"].append(bool(out.skipped))
        rec["scale"].append(out.scale.item())
        rec["scale_used"].append(float(out.scale_used))
        rec["grad_norm"].append(None if out.grad_norm is None else out.grad_norm.item())
        rec["full"].append(_digest(_full(p) for p in model.parameters()))
        rec["local"].append(_digest(p.detach().to_local() if hasattr(p, "to_local") else p.detach()
                                    for p in model.parameters()))
    state = eng.state_dict()
    again = MixedPrecisionTrainer(MixedPrecisionConfig(**cfg), "cpu")
    again.load_state_dict(state)
    perf, scaler = eng.get_performance_summary()["performance"], eng.scaler.read()
    names = [n.removeprefix("module.") for n, _ in model.named_parameters()]
    return {**rec, "params": {n: _full(p).flatten().tolist() for n, p in zip(names, model.parameters())},
            "scaler": scaler.to_dict(), "offenders": dict(eng.offenders), "reloaded_offenders": dict(again.offenders),
            "reloaded_scale": again.scaler.read().scale, "optimizer_steps": perf["optimizer_steps"],
            "skipped_steps": perf["skipped_steps"], "nonfinite_losses": perf["nonfinite_losses"],
            "sharded": eng.consensus.sharded, "state_keys": sorted(state)}


def _hsdp_refused() -> dict:
    """A 2-D mesh (HSDP: replicate x shard) is refused with a ConfigError, before any step."""
    from torch.distributed.device_mesh import init_device_mesh

    from ampray.amp.sharding import shard_model

    eng = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp32"), "cpu")
    model = shard_model(eng.prepare_model(Net()), init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")), blocks=("Block",))
    x, y = _batch(0, 0)
    eng.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, x, y)
    return {"error": "none"}


def run_ranks(tmp_path: Path, names: list[str], world: int = 2, target=None) -> list[dict]:
    target = target or functools.partial(mesh_rank_main, run_scenario)
    port = free_port()
    codes, hung = spawn_ranks(target, lambda r: (r, world, port, names, str(tmp_path)), world, DEADLINE_S)
    assert not hung, f"rank(s) {hung} did not finish within {DEADLINE_S} s: a collective hung"
    assert codes == [0] * world, f"exit codes {codes}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario in one pair of processes (one start-up for the lot)."""
    return run_ranks(tmp_path_factory.mktemp("fsdp"), list(SCENARIOS) + ["hsdp_refused"])


def both(ranks, name) -> tuple[dict, dict]:
    a, b = ranks[0][name], ranks[1][name]
    assert "error" not in a and "error" not in b, (a.get("trace"), b.get("trace"))
    return a, b


def assert_agree(a: dict, b: dict) -> None:
    """The decisions and the full parameters are the same on both ranks, to the bit."""
    for key in ("skipped", "scale", "scale_used", "grad_norm", "full", "scaler", "offenders", "optimizer_steps",
                "skipped_steps"):
        assert a[key] == b[key], f"{key}: rank 0 {a[key]!r} != rank 1 {b[key]!r}"
    assert a["sharded"] and b["sharded"]


def assert_params_close(fsdp: dict, ddp: dict, rtol: float, atol: float) -> None:
    assert fsdp["params"].keys() == ddp["params"].keys()
    for name in fsdp["params"]:
        torch.testing.assert_close(torch.tensor(fsdp["params"][name]), torch.tensor(ddp["params"][name]),
                                   rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def test_fp32_fsdp_matches_ddp_of_the_same_init_and_data(ranks):
    for rank in (0, 1):
        fsdp, ddp = ranks[rank]["fp32_fsdp"], ranks[rank]["fp32_ddp"]
        assert "error" not in fsdp and "error" not in ddp, (fsdp.get("trace"), ddp.get("trace"))
        torch.testing.assert_close(torch.tensor(fsdp["loss"]), torch.tensor(ddp["loss"]), rtol=FP32_RTOL, atol=FP32_ATOL)
        assert_params_close(fsdp, ddp, FP32_RTOL, FP32_ATOL)
        assert fsdp["skipped_steps"] == 0 and fsdp["optimizer_steps"] == 5
    assert_agree(*both(ranks, "fp32_fsdp"))
    assert ranks[0]["fp32_fsdp"]["loss"] != ranks[1]["fp32_fsdp"]["loss"]  # each rank had its own data


def test_gradient_accumulation_under_fsdp_matches_ddp(ranks):
    assert_agree(*both(ranks, "accum_fsdp"))
    for rank in (0, 1):
        fsdp, ddp = ranks[rank]["accum_fsdp"], ranks[rank]["accum_ddp"]
        assert fsdp["optimizer_steps"] == 3 and fsdp["full"][1] == fsdp["full"][2] != fsdp["full"][3]
        torch.testing.assert_close(torch.tensor(fsdp["loss"]), torch.tensor(ddp["loss"]), rtol=FP32_RTOL, atol=FP32_ATOL)
        assert_params_close(fsdp, ddp, FP32_RTOL, FP32_ATOL)


def test_accumulation_with_fsdp_gradient_sync_off_on_early_micro_batches_matches_ddp(ranks):
    assert_agree(*both(ranks, "accum_nosync_fsdp"))
    for rank in range(2):
        nosync, ddp = ranks[rank]["accum_nosync_fsdp"], ranks[rank]["accum_ddp"]
        assert nosync["optimizer_steps"] == 3 and not any(nosync["skipped"])
        assert_params_close(nosync, ddp, FP32_RTOL, FP32_ATOL)


def test_a_2d_mesh_is_refused_on_both_ranks(ranks):
    a, b = ranks[0]["hsdp_refused"], ranks[1]["hsdp_refused"]
    assert a["error"] == b["error"]
    assert a["error"].startswith("ConfigError: fully_shard mesh=") and "expected a 1-D mesh" in a["error"]


@pytest.mark.parametrize("name", ["overflow_fsdp", "overflow_fsdp_fused"])
def test_an_inf_in_one_shard_on_rank_1_skips_the_step_on_both_ranks(ranks, name):
    a, b = both(ranks, name)
    assert_agree(a, b)
    for r in (a, b):
        assert r["skipped"] == [False, False, True, False]
        # bitwise unchanged by the skipped step: the gathered parameters and this rank's own shard
        assert r["full"][FAULT_STEP] == r["full"][FAULT_STEP - 1]
        assert r["local"][FAULT_STEP] == r["local"][FAULT_STEP - 1]
        assert r["full"][FAULT_STEP + 1] != r["full"][FAULT_STEP]
        assert r["scale"] == [2.0**10, 2.0**10, 2.0**9, 2.0**9]
        assert r["scaler"]["overflows"] == 1 and r["scaler"]["backoffs"] == 1 and r["skipped_steps"] == 1
        assert r["offenders"] == {POISONED: 1}  # by FQN, counted once, on both ranks
        assert r["reloaded_offenders"] == r["offenders"] and r["reloaded_scale"] == 2.0**9
    assert a["local"] != b["local"]  # each rank really holds another shard


def test_a_nan_loss_on_rank_1_only_skips_the_step_on_both_ranks(ranks):
    a, b = both(ranks, "nan_loss_fsdp")
    assert_agree(a, b)
    for r in (a, b):
        assert r["skipped"] == [False, False, True, False]
        assert r["full"][FAULT_STEP] == r["full"][FAULT_STEP - 1]
        assert r["local"][FAULT_STEP] == r["local"][FAULT_STEP - 1]
        assert r["offenders"] == {}  # every gradient was NaN: no parameter singled out
    assert (a["nonfinite_losses"], b["nonfinite_losses"]) == (0, 1)  # each rank counts the loss it saw


def test_a_nan_loss_with_policy_raise_raises_the_same_error_on_both_ranks(ranks):
    a, b = ranks[0]["nan_loss_raise_fsdp"], ranks[1]["nan_loss_raise_fsdp"]
    assert a["error"] == b["error"]
    assert a["error"].startswith("NonFiniteLossError: non-finite loss on rank(s) [1] at training step 3")


def test_clipping_uses_the_global_norm_of_every_shard(ranks):
    a, b = both(ranks, "clip_fsdp")
    assert_agree(a, b)  # grad_norm bitwise equal on both ranks
    for rank in (0, 1):
        fsdp, ddp = ranks[rank]["clip_fsdp"], ranks[rank]["clip_ddp"]
        assert all(n > 0.05 for n in ddp["grad_norm"])  # every step was clipped
        torch.testing.assert_close(torch.tensor(fsdp["grad_norm"]), torch.tensor(ddp["grad_norm"]),
                                   rtol=FP32_RTOL, atol=0.0)
        assert_params_close(fsdp, ddp, FP32_RTOL, FP32_ATOL)


def test_bf16_with_fsdp_mixed_precision_policy_trains_close_to_ddp(ranks):
    a, b = both(ranks, "bf16_fsdp")
    assert_agree(a, b)
    for rank in (0, 1):
        fsdp, ddp = ranks[rank]["bf16_fsdp"], ranks[rank]["bf16_ddp"]
        assert fsdp["loss"][-1] < 0.8 * fsdp["loss"][0]  # it learns its (fixed) batch
        assert fsdp["skipped_steps"] == 0 and fsdp["scale"] == [1.0] * 8  # bf16: no loss scaling
        # bf16 parameters all-gathered by FSDP vs autocast's bf16 copies of fp32 ones: same forward
        # precision, rounded at other places
        torch.testing.assert_close(torch.tensor(fsdp["loss"]), torch.tensor(ddp["loss"]), rtol=0.0, atol=0.01)


def test_fp16_overflow_backoff_trajectory_is_the_same_on_both_ranks(ranks):
    a, b = both(ranks, "fp16_backoff_fsdp")
    assert_agree(a, b)
    assert a["skipped"][0] and not a["skipped"][-1]  # overflowed at first, stepped in the end
    assert a["scaler"]["backoffs"] >= 1 and a["scaler"]["growths"] >= 1
    assert a["scale_used"][0] == 2.0**30 and a["scale"][0] == 2.0**22
    assert all(lo < 2.0**16 for lo in a["scale_used"][-2:])  # fp16 gradients fit once it has backed off


# -- one rank: the policy builder, shard_model, and what the engine refuses --------------------------
def test_build_mp_policy_follows_the_engine_config():
    from ampray.amp.sharding import build_mp_policy

    fp16 = build_mp_policy(MixedPrecisionConfig(dtype="fp16"))
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.float32)
    bf16 = build_mp_policy(MixedPrecisionConfig(dtype="bf16"), reduce_dtype=torch.bfloat16)
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    for cfg in (MixedPrecisionConfig(dtype="fp32"), MixedPrecisionConfig(dtype="fp16", enabled=False)):
        off = build_mp_policy(cfg)
        assert (off.param_dtype, off.reduce_dtype) == (None, None)


def _one_rank_main(rank: int, world: int, port: int, names: list[str], out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from ampray.amp.sharding import build_mp_policy, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}

    def shard(cfg, **kwargs):
        eng = MixedPrecisionTrainer(cfg, "cpu")
        torch.manual_seed(0)
        model = shard_model(eng.prepare_model(Net()), mesh, kwargs.pop("policy", build_mp_policy(cfg)), **kwargs)
        return eng, model

    def train(eng, model, steps=3):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = _batch(0, 0)
        return [eng.train_step(model, opt, criterion, x, y).loss.item() for _ in range(steps)]

    for key, kwargs in {"by_name": dict(blocks=("Block",)), "by_callable": dict(blocks=lambda m: isinstance(m, Block)),
                        "checkpointed": dict(blocks=("Block",), checkpoint=True),
                        "offloaded": dict(blocks=("Block",), offload=True)}.items():
        try:
            eng, model = shard(MixedPrecisionConfig(dtype="bf16"), **kwargs)
            out[key] = {"losses": train(eng, model), "fsdp": [n for n, m in model.named_modules()
                                                             if isinstance(m, FSDPModule)],
                        "names": list(eng.stepper.attribution.names),
                        "dtensors": all(hasattr(p, "to_local") for p in model.parameters()),
                        "state_keys": sorted(model.state_dict())}
        except Exception as err:
            out[key] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    refused = {"oom_skip": (MixedPrecisionConfig(dtype="bf16", oom_policy="skip"), None),
               "dtype_mismatch": (MixedPrecisionConfig(dtype="fp16"), MixedPrecisionConfig(dtype="bf16")),
               "fp16_params_fp32_engine": (MixedPrecisionConfig(dtype="fp32"), MixedPrecisionConfig(dtype="fp16")),
               "fallback_with_fp16_params": (MixedPrecisionConfig(dtype="fp16", stall_policy="fallback_bf16"), None)}
    for key, (cfg, policy_cfg) in refused.items():
        try:
            eng, model = shard(cfg, blocks=("Block",), policy=build_mp_policy(policy_cfg or cfg))
            train(eng, model, 1)
            out[key] = {"error": "none"}
        except Exception as err:
            out[key] = {"error": f"{type(err).__name__}: {err}"}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("fsdp1"), [], world=1, target=_one_rank_main)[0]


@pytest.mark.parametrize("key", ["by_name", "by_callable", "checkpointed", "offloaded"])
def test_shard_model_on_a_one_rank_mesh_shards_each_block_and_the_root(one_rank, key):
    r = one_rank[key]
    assert "error" not in r, r.get("trace")
    assert r["fsdp"] == ["", "blocks.0", "blocks.1"] and r["dtensors"]
    # the engine names parameters by their FQNs (checkpoint wrapper's prefix removed), once each
    assert r["names"] == [n for n, _ in Net().named_parameters()]
    assert r["state_keys"] == sorted(Net().state_dict())
    assert r["losses"][-1] < r["losses"][0]


def test_shard_model_results_agree_with_or_without_checkpointing(one_rank):
    torch.testing.assert_close(torch.tensor(one_rank["checkpointed"]["losses"]),
                               torch.tensor(one_rank["by_name"]["losses"]), rtol=0, atol=0)


@pytest.mark.parametrize("key, words", [
    ("oom_skip", "MixedPrecisionConfig.oom_policy='skip' is not allowed for a model sharded with FSDP"),
    ("dtype_mismatch", "MixedPrecisionConfig.dtype='float16' is not allowed with FSDP's MixedPrecisionPolicy("
                       "param_dtype=bfloat16)"),
    ("fp16_params_fp32_engine", "MixedPrecisionConfig.dtype='float32' is not allowed with FSDP's "
                                "MixedPrecisionPolicy(param_dtype=float16)"),
    ("fallback_with_fp16_params", "MixedPrecisionConfig.stall_policy='fallback_bf16' is not allowed"),
])
def test_what_the_engine_cannot_do_under_fsdp_is_a_config_error(one_rank, key, words):
    assert one_rank[key]["error"].startswith(f"{ConfigError.__name__}: {words}"), one_rank[key]["error"]
