"""What FSDP2 asks of a user's model, under the engine: parameters that some ranks leave unused (routing
in the root) train as under DDP with find_unused_parameters, and so do blocks that every rank runs alike
(two real processes, gloo, CPU); weights tied between a block and a module outside it are refused before
sharding, by class-name entries and wrap policies alike, and left to the root by the default choice of
blocks, which also keeps an MoE layer's experts inside their layer; "auto" asks FSDP for no reduction
of unused parameters; an optimizer parameter that FSDP does not shard is refused at the first step."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.job import JobConfig
from tests.unit.helpers import free_port, mesh_rank_main, spawn_ranks

DEADLINE_S = 120


class Expert(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Routed(nn.Module):
    """Two experts of the same shapes; `route(step, rank)` says which one a batch goes through."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.inp, self.head = nn.Linear(4, d), nn.Linear(d, 3)
        self.experts = nn.ModuleList([Expert(d), Expert(d)])
        self.choice = 0

    def forward(self, x):
        return self.head(self.experts[self.choice](self.inp(x)))


ROUTES = {"by_rank": lambda step, rank: rank, "by_step": lambda step, rank: step % 2}


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model, sharded: bool, route, rank: int, steps: int = 3) -> list[float]:
    engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp32", max_grad_norm=1.0), "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inner = model.module if hasattr(model, "module") else model
    norms = []
    for step in range(steps):
        inner.choice = route(step, rank)
        x, y = _batch(step, rank)
        norms.append(float(engine.train_step(model, opt, nn.functional.cross_entropy, x, y).grad_norm))
    return norms


def _full(model) -> dict[str, list[float]]:
    return {n.replace("module.", ""): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
            for n, p in model.named_parameters()}


def scenario(name: str, rank: int, mesh) -> dict:
    from ampray.amp.sharding import shard_model

    route, blocks = {"root_by_rank": ("by_rank", ()), "blocks_by_step": ("by_step", ("Expert",))}[name]
    torch.manual_seed(0)
    model = shard_model(Routed(), mesh, blocks=blocks, unused_params=True)
    norms = _train(model, True, ROUTES[route], rank)
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Routed(), find_unused_parameters=True)
    ref = _train(ddp, False, ROUTES[route], rank)
    full, want = _full(model), _full(ddp)
    diff = max(max(abs(a - b) for a, b in zip(full[n], want[n])) for n in want)
    return {"norms": norms, "ddp_norms": ref, "max_diff": diff}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from ampray.amp.sharding import reduces_unused_params

    if not reduces_unused_params():
        # torch 2.11 (the GPU host's, seen 2026-12-06) has no set_reduce_scatter_unused_params: refused there.
        pytest.skip(f"torch {torch.__version__} cannot reduce-scatter unused parameters (refused: see below)")
    out = tmp_path_factory.mktemp("routed")
    port = free_port()
    names = ["root_by_rank", "blocks_by_step"]
    main = functools.partial(mesh_rank_main, scenario)
    codes, hung = spawn_ranks(main, lambda r: (r, 2, port, names, str(out)), 2, DEADLINE_S)
    assert not hung, f"rank(s) {hung} did not finish within {DEADLINE_S} s: a collective hung"
    assert codes == [0, 0], f"exit codes {codes}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", ["root_by_rank", "blocks_by_step"])
def test_parameters_some_ranks_leave_unused_train_as_under_ddp(ranks, name):
    """The experts in the root, each rank through its own (MoE-like routing): FSDP reduce-scatters zero
    gradients for the one a rank did not use, so the sums, the global norm and the weights are DDP's.
    Experts as blocks, every rank through the same one (which changes with the step): the same. (A block
    that some ranks skip cannot work: its all-gather in forward already has no partner there.)"""
    a, b = ranks[0][name], ranks[1][name]
    assert "error" not in a and "error" not in b, (a, b)
    assert a["norms"] == b["norms"]  # one clipping norm on both ranks
    assert a["norms"] == pytest.approx(a["ddp_norms"], rel=1e-5)
    assert a["max_diff"] < 1e-6 and b["max_diff"] < 1e-6


class Stack(nn.Module):
    def __init__(self, embed: nn.Embedding, d: int = 6):
        super().__init__()
        self.embed, self.fc = embed, nn.Linear(d, d)

    def forward(self, idx):
        return torch.tanh(self.fc(self.embed(idx)))


class Seq2Seq(nn.Module):
    """An encoder and a decoder stack that share one embedding, which the output head reuses (T5-like)."""

    def __init__(self, vocab: int = 10, d: int = 6):
        super().__init__()
        self.shared = nn.Embedding(vocab, d)
        self.stacks = nn.ModuleList([Stack(self.shared, d), Stack(self.shared, d)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, idx):
        return self.head(self.stacks[1](idx) + self.stacks[0](idx))


FACTORY = f'''
import sys

sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.unit.test_fsdp_models import Seq2Seq


def build(**options):
    return Seq2Seq()


def loss(out, target):
    import torch

    return torch.nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())


def stacks(module):
    return type(module).__name__ == "Stack"
'''


@pytest.fixture
def seq2seq(tmp_path, monkeypatch):
    (tmp_path / "seq2seq_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("seq2seq_factory", None)


def test_weights_tied_across_a_block_boundary_are_refused_or_left_to_the_root(seq2seq):
    from ampray.actors.worker import fsdp_blocks
    from ampray.amp.sharding import shard_model, shared_outside
    from ampray.orchestrator.preflight import check_fsdp_blocks, resolve_model

    model = Seq2Seq()
    assert shared_outside(model, lambda m: isinstance(m, Stack)) == [
        ("stacks.0", "stacks.0.embed.weight", "shared.weight"), ("stacks.1", "stacks.1.embed.weight", "shared.weight")]
    assert shared_outside(model, lambda m: isinstance(m, nn.Linear)) == [("head", "head.weight", "shared.weight")]
    assert shared_outside(model, lambda m: m is model.stacks[0].fc) == []  # its own weight only
    with pytest.raises(ConfigError, match=r"shard_model's blocks selects 'stacks.0' \(Stack\), which shares its "
                                          r"parameter 'stacks.0.embed.weight' with 'shared.weight' outside it"):
        shard_model(model, mesh=object(), blocks=("Stack",))  # refused before the mesh is used

    fields = {"scaling.strategy": "fsdp", "model.factory": "seq2seq_factory:build",
              "model.loss": "seq2seq_factory:loss"}
    for entry in ("Stack", "seq2seq_factory:stacks"):
        job = JobConfig.load(None, {**fields, "scaling.fsdp_blocks": [entry]})
        with pytest.raises(ConfigError, match=rf"scaling.fsdp_blocks entry '{entry}' selects 'stacks.0' \(Stack\), "
                                              r"which shares its parameter 'stacks.0.embed.weight' with 'shared.weight'"):
            check_fsdp_blocks(job, resolve_model(job))
    job = JobConfig.load(None, fields)
    assert fsdp_blocks(Seq2Seq(), job) == []  # the Stacks share the embedding: the root keeps them
    assert check_fsdp_blocks(job, resolve_model(job)) == [  # and the user is told, before Ray starts
        "fsdp: the default blocks Stack share weights with modules outside them, so the root holds them "
        "(gathered whole in each step); name the blocks to shard one by one in scaling.fsdp_blocks"]


def test_an_optimizer_parameter_fsdp_does_not_shard_is_refused(monkeypatch):
    from ampray.amp.sharding import shard_model

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = shard_model(Routed(), blocks=("Expert",))
        temperature = nn.Parameter(torch.ones(()))
        opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp32"), "cpu")
        x, y = _batch(0, 0)
        with pytest.raises(ConfigError, match=r"optimizer parameters \['a \(\) tensor'\] are not sharded by FSDP"):
            engine.train_step(model, opt, lambda out, t: nn.functional.cross_entropy(out, t) * temperature, x, y)
    finally:
        dist.destroy_process_group()


class MoE(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.experts = nn.ModuleList([Expert(d), Expert(d)])

    def forward(self, x):
        return self.experts[0](x)


class Layer(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.moe, self.norm = MoE(d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.moe(x))


class Outer(nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.inner, self.fc = Expert(d), nn.Linear(d, d)
        self.again = self.inner  # the same inner block under a second name, inside this block

    def forward(self, x):
        return self.fc(self.again(self.inner(x)))


def test_the_default_blocks_are_the_outermost_layers_and_nested_blocks_are_no_tie():
    from ampray.actors.worker import fsdp_blocks
    from ampray.amp.sharding import shared_outside

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

    job = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "mlp"})
    assert fsdp_blocks(Transformer(), job) == ["Layer"]  # not the experts every rank may not run
    model = nn.Sequential(Outer(), Outer())
    model.first_inner = model[0].inner  # the inner block held by the root as well: still one block
    assert shared_outside(model, lambda m: isinstance(m, (Outer, Expert))) == []  # inner: a unit of its own
    assert shared_outside(model, lambda m: isinstance(m, Expert)) == []
    assert shared_outside(model, lambda m: isinstance(m, Outer)) == [("0", "0.inner.up.weight",
                                                                      "first_inner.up.weight")]


def test_auto_asks_fsdp_for_no_reduction_of_unused_parameters_and_old_torch_refuses_true(monkeypatch):
    from types import SimpleNamespace

    from ampray.amp import sharding
    from ampray.orchestrator.preflight import check_fsdp_blocks, resolve_model
    from ampray.orchestrator.train import resolved

    plan = SimpleNamespace(unused_parameters=("pooler.weight",), pad_widths={})
    for strategy, expected in (("ddp", "true"), ("fsdp", "false")):
        job = JobConfig.load(None, {"scaling.strategy": strategy, "model.kind": "mlp"})
        assert resolved(job, 2, False, None, plan).scaling.find_unused_parameters == expected
    asked = JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "mlp",
                                  "scaling.find_unused_parameters": "true"})
    assert resolved(asked, 2, False, None, plan).scaling.find_unused_parameters == "true"
    check_fsdp_blocks(asked, resolve_model(asked))  # this torch has the reduction

    class OldFSDPModule:  # a torch whose FSDP2 lacks set_reduce_scatter_unused_params
        pass

    monkeypatch.setattr(sharding, "_fsdp_module_class", lambda: OldFSDPModule)
    with pytest.raises(ConfigError, match="scaling.find_unused_parameters='true' is not allowed with "
                                          "scaling.strategy='fsdp' on torch"):
        check_fsdp_blocks(asked, resolve_model(asked))
    check_fsdp_blocks(JobConfig.load(None, {"scaling.strategy": "fsdp", "model.kind": "mlp"}), resolve_model(asked))
