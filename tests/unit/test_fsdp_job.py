"""scaling.strategy = "fsdp" as a job field: its settings checked, what it cannot do refused before any
worker starts, the blocks it shards by default."""

import sys

import pytest
from torch import nn

from ampray.actors.worker import fsdp_blocks
from ampray.job import ConfigError, JobConfig, choose_compile
from ampray.models import build_model


@pytest.mark.parametrize("overrides,expected", [
    ({"scaling.strategy": "zero"}, "scaling.strategy='zero' is not allowed: expected one of ['ddp', 'fsdp']"),
    ({"scaling.fsdp_cpu_offload": True}, "scaling.fsdp_cpu_offload=True is not allowed: expected its default unless "
                                         "scaling.strategy = 'fsdp'"),
    ({"scaling.strategy": "fsdp", "scaling.fsdp_blocks": [""]}, "scaling.fsdp_blocks=[''] is not allowed"),
    ({"scaling.strategy": "fsdp", "precision.oom_policy": "split"},
     "precision.oom_policy='split' is not allowed: expected 'raise' with scaling.strategy='fsdp'"),
    ({"scaling.strategy": "fsdp", "model.compile": True}, "model.compile=True is not allowed"),
    ({"scaling.strategy": "fsdp", "data.fill_gpu": True}, "data.fill_gpu=True is not allowed: expected false with "
                                                          "scaling.strategy='fsdp'"),
    ({"scaling.strategy": "fsdp", "precision.stall_policy": "fallback_bf16"},
     "precision.stall_policy='fallback_bf16' is not allowed: expected 'raise' with scaling.strategy='fsdp' and fp16"),
])
def test_fsdp_settings_and_refusals_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        JobConfig.load(None, overrides)
    assert expected in str(err.value)


def test_fsdp_with_bf16_takes_the_fallback_policies_and_compile_is_never_chosen():
    job = JobConfig.load(None, {"scaling.strategy": "fsdp", "precision.dtype": "bf16",
                                "precision.stall_policy": "fallback_bf16", "model.kind": "gpt", "run.steps": 10**6})
    assert job.scaling.strategy == "fsdp"
    assert choose_compile(job, True, set()) == (job, None)


def test_the_blocks_sharded_by_default():
    gpt = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt"})
    assert fsdp_blocks(build_model("gpt", preset="nano"), gpt) == ["Block"]

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.layers = nn.ModuleList([Layer(), Layer()])

    mlp = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "mlp"})
    assert fsdp_blocks(Net(), mlp) == ["Layer"]  # a user's model: what its ModuleList holds
    assert fsdp_blocks(nn.Sequential(nn.Linear(4, 4)), mlp) == []  # nothing to split: the root only

    class Flat(nn.Module):  # a ModuleList of plain layers is no list of blocks
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])

    assert fsdp_blocks(Flat(), mlp) == []
    given = JobConfig.load(None, {"scaling.strategy": "fsdp", "scaling.fsdp_blocks": ["Layer", "Other"]})
    assert fsdp_blocks(Net(), given) == ["Layer", "Other"]


@pytest.fixture
def world_of_one(monkeypatch):
    """A gloo process group of one rank in this process, for FSDP on the CPU (destroyed afterwards)."""
    import torch.distributed as dist

    from tests.unit.helpers import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_worker_without_offload_keeps_the_gathered_parameters_and_trains_the_same(world_of_one):
    """worker.shard on a world of one: each block's parameters stay gathered after forward (no second gather
    in backward), unless they are offloaded to the CPU; the weights after three fp32 steps are the same
    either way, bit for bit."""
    import copy

    import torch
    from torch.distributed.tensor import DTensor

    from ampray.actors.worker import build_engine, shard
    from ampray.models import build_criterion, example_batch

    torch.manual_seed(0)
    base = build_model("gpt", preset="nano")
    x, y = example_batch("gpt", base.config, 4, generator=torch.Generator().manual_seed(0))
    weights, gathered = {}, {}
    for offload in (False, True):
        job = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt", "precision.dtype": "fp32",
                                    "scaling.fsdp_cpu_offload": offload})
        engine = build_engine(job, torch.device("cpu"))
        model = shard(engine.prepare_model(copy.deepcopy(base)), job, engine)
        opt = engine.build_optimizer(model, "adamw", lr=1e-3)
        model(x)  # a forward alone: what each block holds after it
        gathered[offload] = not isinstance(next(model.blocks[0].parameters()), DTensor)
        model.zero_grad(set_to_none=True)
        model.reshard()
        for _ in range(3):
            engine.train_step(model, opt, build_criterion("gpt"), x, y)
        weights[offload] = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    assert gathered == {False: True, True: False}
    for name, value in weights[False].items():
        assert torch.equal(value, weights[True][name]), name


def test_the_rollback_snapshot_of_a_sharded_model_restores_it_bitwise(world_of_one):
    """run.on_divergence = "rollback" before the run's first checkpoint returns to the session's initial
    state, kept in memory: for an FSDP model its sharded parameters and optimizer state (DTensors) come back
    bit for bit, and training on from there repeats the same steps."""
    import copy

    import torch

    from ampray.actors.checkpoint import restore, snapshot
    from ampray.actors.worker import build_engine, shard
    from ampray.models import build_criterion, example_batch

    torch.manual_seed(0)
    x, y = example_batch("gpt", build_model("gpt", preset="nano").config, 4,
                         generator=torch.Generator().manual_seed(0))
    job = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt", "precision.dtype": "bf16",
                                "run.on_divergence": "rollback"})
    engine = build_engine(job, torch.device("cpu"))
    model = shard(engine.prepare_model(build_model("gpt", preset="nano")), job, engine)
    opt = engine.build_optimizer(model, "adamw", lr=1e-3)
    crit = build_criterion("gpt")

    def weights():
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}

    def moments():
        return [s["exp_avg"].full_tensor().clone() for s in opt.state.values()]

    engine.train_step(model, opt, crit, x, y)  # optimizer state exists
    kept = snapshot(model=model, optimizer=opt, scheduler=None, engine=engine, step=1)
    before, state_before = weights(), moments()
    losses = [engine.train_step(model, opt, crit, x, y).loss.item() for _ in range(3)]
    after = weights()
    assert any(not torch.equal(after[n], before[n]) for n in before)  # the three steps changed them
    assert restore(copy.deepcopy(kept), model=model, optimizer=opt, scheduler=None, engine=engine) == 1
    for name, value in weights().items():
        assert torch.equal(value, before[name]), name
    for a, b in zip(moments(), state_before):
        assert torch.equal(a, b)
    again = [engine.train_step(model, opt, crit, x, y).loss.item() for _ in range(3)]
    assert again == losses


POLICIES = '''
import torch


def linears(module):
    # Not the gpt's head: it has no bias, and its weight is the embedding's (tied weights stay in the root).
    return isinstance(module, torch.nn.Linear) and module.bias is not None


def nothing(module):
    return False


def broken(module):
    raise RuntimeError("no rule for " + type(module).__name__)
'''


@pytest.fixture
def wraps(tmp_path, monkeypatch):
    """The user's module `wraps` of wrap policies, importable while the test runs."""
    (tmp_path / "wraps.py").write_text(POLICIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("wraps", None)


def test_each_fsdp_blocks_entry_must_select_a_module_and_wrap_policies_import(wraps):
    from ampray.orchestrator.preflight import check_fsdp_blocks, resolve_model


    def check(*entries):
        job = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt", "model.options.preset": "xl",
                                    "scaling.fsdp_blocks": list(entries)})
        check_fsdp_blocks(job, resolve_model(job))  # xl: built on the meta device, in no time

    check("Block")
    check("wraps:linears", "Block")
    with pytest.raises(ConfigError, match=r"scaling.fsdp_blocks entry 'Blocks' selects no module of the model; "
                                          r"expected a class name of its modules \(Block, CausalSelfAttention"):
        check("Block", "Blocks")
    with pytest.raises(ConfigError, match="entry 'wraps:nothing' selects no module"):
        check("wraps:nothing")
    with pytest.raises(ConfigError, match="entry 'wraps:broken' raised RuntimeError on the model's modules: no "
                                          "rule for"):
        check("wraps:broken")
    with pytest.raises(ConfigError, match="scaling.fsdp_blocks='wraps:absent'"):
        check("wraps:absent")


def test_a_wrap_policy_shards_the_modules_it_selects(wraps, world_of_one):
    import torch

    from ampray.actors.worker import build_engine, shard
    from ampray.amp.sharding import fsdp_modules

    job = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt", "precision.dtype": "fp32",
                                "scaling.fsdp_blocks": ["wraps:linears"]})
    model = build_model("gpt", preset="nano")
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)
    assert linears == sum(1 for m in model.modules() if isinstance(m, nn.Linear)) - 1  # all but the head
    engine = build_engine(job, torch.device("cpu"))
    sharded = shard(engine.prepare_model(model), job, engine)
    kinds = [type(m).__name__ for m in fsdp_modules(sharded)]
    assert sorted(kinds) == ["FSDPGPT"] + ["FSDPLinear"] * linears  # each Linear, and the root


def test_restoring_state_saved_before_the_first_step_drops_the_optimizer_state_made_since(world_of_one):
    """A rollback to a state saved before the optimizer's first step (every step so far skipped, or the
    session's start): the sharded optimizer's state made since is dropped and its groups' settings come
    back, in memory and from a shard file alike."""
    import torch

    from ampray.actors.checkpoint import restore, snapshot
    from ampray.actors.sharded_state import load_local_state, local_state
    from ampray.actors.worker import build_engine, shard
    from ampray.models import build_criterion, example_batch

    torch.manual_seed(0)
    model0 = build_model("gpt", preset="nano")
    x, y = example_batch("gpt", model0.config, 4, generator=torch.Generator().manual_seed(0))
    job = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "gpt", "precision.dtype": "fp32"})
    engine = build_engine(job, torch.device("cpu"))
    model = shard(engine.prepare_model(model0), job, engine)
    opt = engine.build_optimizer(model, "adamw", lr=1e-3)
    kept, saved = snapshot(model=model, optimizer=opt, scheduler=None, engine=engine, step=0), \
        local_state(model, opt, 0, 1)
    for restore_it in (lambda: restore(kept, model=model, optimizer=opt, scheduler=None, engine=engine),
                       lambda: load_local_state(saved, model, opt)):
        for _ in range(2):
            engine.train_step(model, opt, build_criterion("gpt"), x, y)
        opt.param_groups[0]["lr"] = 0.5
        assert opt.state
        restore_it()
        assert not opt.state and opt.param_groups[0]["lr"] == 1e-3
