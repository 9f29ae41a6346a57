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
    job = JobConfig.load(None, {**fields, "precision.dtype": "bf16", "precision.fp32_modules": ["head"]})
    with pytest.raises(ConfigError, match=r"precision.fp32_modules=\['head'\] selects 'head' \(Linear\), which shares "
                                          r"its parameter 'head.weight' with 'shared.weight' outside it"):
        check_fsdp_blocks(job, resolve_model(job))  # each fp32 module is a unit of its own: refused before Ray
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


class ConvBlock(nn.Module):
    def __init__(self, ch: int = 4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    """A user's conv net: BatchNorm in the stem and in each block, a head to keep in fp32."""

    def __init__(self, ch: int = 4):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, ch, 3, padding=1), nn.BatchNorm2d(ch)
        self.blocks = nn.ModuleList([ConvBlock(ch), ConvBlock(ch)])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * 36, 3))

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _image_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def bn_scenario(name: str, rank: int, mesh) -> dict:
    """The conv net in bf16 for 4 AdamW steps, sharded (FSDP's policy casting to bf16, `fp32=("head",)`)
    and under DDP (autocast only, fp32_modules=("head",)): per-unit parameter dtypes, the head's output
    dtype, the clipping norms and the weights of both."""
    from ampray.amp.sharding import build_mp_policy, shard_model, unit_param_dtypes

    out: dict = {}
    for kind in ("fsdp", "ddp"):
        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", fp32_modules=("head",), max_grad_norm=1.0),
                                       "cpu")
        torch.manual_seed(0)
        model = engine.prepare_model(ConvNet())
        if kind == "fsdp":
            model = shard_model(model, mesh, build_mp_policy(engine.config), blocks=("ConvBlock",),
                                checkpoint=name == "checkpointed", fp32=engine.config.fp32_modules)
            held = unit_param_dtypes(model)
            out["dtypes"] = {n.replace("_checkpoint_wrapped_module.", ""): str(held[id(p)])
                             for n, p in model.named_parameters()}
        else:
            model = nn.parallel.DistributedDataParallel(model)
        seen = []
        (model.module if kind == "ddp" else model).head.register_forward_hook(lambda m, a, o: seen.append(str(o.dtype)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        norms = []
        for step in range(4):
            x, y = _image_batch(step, rank)
            norms.append(float(engine.train_step(model, opt, nn.functional.cross_entropy, x, y).grad_norm))
        out[kind] = {"norms": norms, "head_out": sorted(set(seen)),
                     "params": {n.replace("_checkpoint_wrapped_module.", "").removeprefix("module."):
                                (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
                                for n, p in model.named_parameters()}}
    return out


@pytest.fixture(scope="module")
def bn_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("bn")
    port = free_port()
    main = functools.partial(mesh_rank_main, bn_scenario)
    codes, hung = spawn_ranks(main, lambda r: (r, 2, port, ["plain", "checkpointed"], str(out)), 2, DEADLINE_S)
    assert not hung, f"rank(s) {hung} did not finish within {DEADLINE_S} s: a collective hung"
    assert codes == [0, 0], f"exit codes {codes}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("name", ["plain", "checkpointed"])
def test_batchnorm_and_fp32_modules_stay_fp32_units_under_a_casting_policy(bn_ranks, name):
    """FSDP's bf16 policy would cast BatchNorm's weights beside its fp32 running statistics, which torch's
    kernels refuse ("expected scalar type BFloat16 but found Float", seen with a user's conv net under
    `ampray train`): shard_model makes each BatchNorm, and each module of fp32_modules, a unit whose
    parameters stay fp32, so the conv net trains as under DDP, its head in fp32 on both."""
    a, b = bn_ranks[0][name], bn_ranks[1][name]
    assert "error" not in a and "error" not in b, (a.get("trace"), b.get("trace"))
    dtypes = a["dtypes"]
    assert {k for k, v in dtypes.items() if v == "None"} == {
        "bn.weight", "bn.bias", "blocks.0.bn.weight", "blocks.0.bn.bias", "blocks.1.bn.weight", "blocks.1.bn.bias",
        "head.1.weight", "head.1.bias"}, dtypes
    assert dtypes["stem.weight"] == dtypes["blocks.0.conv.weight"] == "torch.bfloat16"
    for rank in (a, b):
        assert rank["fsdp"]["head_out"] == rank["ddp"]["head_out"] == ["torch.float32"]
        assert rank["fsdp"]["norms"] == pytest.approx(rank["ddp"]["norms"], rel=2e-2)
        for key, want in rank["ddp"]["params"].items():
            got = rank["fsdp"]["params"][key]
            assert max(abs(g - w) for g, w in zip(got, want)) < 2e-2, key
    assert a["fsdp"]["norms"] == b["fsdp"]["norms"]  # one clipping norm on both ranks
    assert a["fsdp"]["params"] == b["fsdp"]["params"]


def test_fp32_modules_tied_outside_are_refused_and_a_cast_fp32_module_is_a_config_error(monkeypatch):
    from ampray.amp.sharding import build_mp_policy, fp32_units, shard_model

    model = Seq2Seq()
    with pytest.raises(ConfigError, match=r"precision.fp32_modules=\['head'\] selects 'head' \(Linear\), which "
                                          r"shares its parameter 'head.weight' with 'shared.weight'"):
        fp32_units(model, ("head",), "precision.fp32_modules")
    net = ConvNet()
    assert [type(m).__name__ for m in fp32_units(net)] == ["BatchNorm2d", "BatchNorm2d", "BatchNorm2d"]
    assert fp32_units(net, ("head", "Linear")) == [net.bn, net.blocks[0].bn, net.blocks[1].bn, net.head]
    # A ModuleList has no forward for FSDP to wrap: its members are the units.
    assert fp32_units(net, ("blocks",)) == [net.bn, net.blocks[0], net.blocks[1]]

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:  # the user's own fully_shard of the whole model casts the head the engine must run in fp32
        from torch.distributed.fsdp import fully_shard

        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", fp32_modules=("head",)), "cpu")
        torch.manual_seed(0)
        model = fully_shard(engine.prepare_model(ConvNet()), mp_policy=build_mp_policy(engine.config))
        x, y = _image_batch(0, 0)
        with pytest.raises(ConfigError, match=r"fp32_modules=\['head'\]: 'head' is inside an FSDP unit whose "
                                              r"MixedPrecisionPolicy casts its parameters to bfloat16"):
            engine.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, x, y)
        # A class name still matches once fully_shard has renamed a unit's class (Linear -> FSDPLinear).
        by_class = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", fp32_modules=("Linear",)), "cpu")
        torch.manual_seed(0)
        net = by_class.prepare_model(ConvNet())
        fully_shard(net.head[1], mp_policy=build_mp_policy(by_class.config))
        model = fully_shard(net, mp_policy=build_mp_policy(by_class.config))
        with pytest.raises(ConfigError, match=r"fp32_modules=\['Linear'\]: 'head.1' is inside an FSDP unit"):
            by_class.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy, x, y)
        ok = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16", fp32_modules=("head",)), "cpu")
        torch.manual_seed(0)
        model = shard_model(ok.prepare_model(ConvNet()), policy=build_mp_policy(ok.config), fp32=("head",))
        assert ok.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy,
                             x, y).loss.isfinite()
    finally:
        dist.destroy_process_group()


def test_the_built_in_cnn_trains_under_fsdp_in_bf16(monkeypatch):
    """`ampray train --model cnn --scaling.strategy fsdp` in bf16: the worker's own sharding (`shard`, the
    job's default blocks) keeps the cnn's BatchNorms fp32, where they used to crash the first forward."""
    from ampray.actors.worker import build_engine, shard
    from ampray.amp.sharding import unit_param_dtypes
    from ampray.models import build_criterion, build_model

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        job = JobConfig.load(None, {"model.kind": "cnn", "model.options": {"width": 8}, "precision.dtype": "bf16",
                                    "scaling.strategy": "fsdp"})
        engine = build_engine(job, torch.device("cpu"))
        torch.manual_seed(0)
        model = shard(engine.prepare_model(build_model("cnn", width=8)), job, engine)
        held = unit_param_dtypes(model)
        kinds = {(type(m).__name__, str(held[id(p)])) for m in model.modules() for p in m.parameters(recurse=False)}
        assert ("FSDPBatchNorm2d", "None") in kinds and ("Conv2d", "torch.bfloat16") in kinds, kinds
        opt = engine.build_optimizer(model, "adamw", lr=1e-2)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        losses = [float(engine.train_step(model, opt, build_criterion("cnn"), x, y).loss) for _ in range(6)]
        assert losses[-1] < losses[0], losses
    finally:
        dist.destroy_process_group()
