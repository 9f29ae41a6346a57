"""FSDP2 (`torch.distributed.fsdp.fully_shard`) under the engine: the mixed-precision policy built from a
`MixedPrecisionConfig`, `shard_model`, and the rules the engine checks when it first sees a sharded model.

Build order: `engine.prepare_model(model)` (device, fp32 master weights), then
`shard_model(model, mesh, build_mp_policy(engine.config), blocks=("Block",))`, then the optimizer over the
sharded parameters, then `engine.train_step(...)` as usual.

Autocast and FSDP's `param_dtype` together. FSDP's `MixedPrecisionPolicy(param_dtype=...)` casts each
block's parameters once, when it all-gathers them (half the bytes on the wire); autocast casts per op.
The engine keeps autocast on whenever its dtype is fp16/bf16, even when FSDP already casts:
- its weight casts are then no-ops (the unsharded parameters already have autocast's dtype), so it costs
  nothing there;
- what it still does is keep the ops on autocast's fp32 list in fp32 (softmax, log-softmax, layer/group
  norm, the losses, sums and norms): without it they would run in bf16/fp16 on bf16/fp16 weights.
- the loss scaling (fp16) is the engine's as without FSDP; `reduce_dtype=float32` (the default here)
  reduce-scatters the gradients in fp32, and the sharded gradients the optimizer sees are fp32, like the
  sharded master parameters.
With the engine at fp32 (`enabled=False` or dtype fp32) there is no autocast and no loss scaling: FSDP's
`param_dtype=bf16` alone is then allowed (module-level bf16), `param_dtype=fp16` is not (fp16 gradients
need loss scaling: set the engine's dtype to fp16). A `param_dtype` that is neither None/fp32 nor the
engine's autocast dtype is a ConfigError (`check_engine_config`). Where the policy casts, `shard_model`
leaves two kinds of module in fp32, each a unit of its own with `param_dtype=None`: norm layers with
running statistics (torch's batch-norm kernels refuse bf16/fp16 weights beside fp32 statistics; FSDP1 kept
them fp32 by itself, FSDP2 does not) and the engine's `fp32_modules` (its islands turn autocast off
there, which means nothing if FSDP has cast their weights: the engine checks they are not cast).

What the engine does differently under FSDP (one extra collective, nothing else):
- Each rank holds a shard of every gradient (a DTensor); the engine reads and scales `.to_local()`
  shards. Its per-parameter norms are all-reduced as sums of squares (float64) over the mesh's group at
  the optimizer step: one all-reduce gives the global norm of each parameter, so the overflow flag, the
  attribution (by FQN, a parameter counted once whichever rank's shard overflowed) and the clipping norm
  are the same on every rank, and so are the skip, the scale update, hysteresis, collapse and stall
  counts that follow from them. Without FSDP nothing of this runs.
- A non-finite loss on one rank makes that rank's gradients NaN (as under DDP); FSDP's reduce-scatter
  sums them into every rank's shard, and the norm all-reduce would carry it anyway.
- `oom_policy="skip"`/`"split"` are refused (ConfigError): FSDP's forward all-gathers every block's
  parameters, so a rank that runs out of memory mid-forward leaves the others waiting in the next
  all-gather, before any agreement can happen; `set_requires_gradient_sync(False)` does not change that.
- Micro-batches of an accumulation window reduce-scatter their gradients each (FSDP's default: memory
  stays sharded); there is no `no_sync()`. A loop of your own may call
  `model.set_requires_gradient_sync(False)` before a window's earlier micro-batches and `True` before its
  last: FSDP then accumulates unsharded gradients (a full copy per rank) and reduce-scatters once; the
  engine's step is the same either way.
- A 1-D mesh only (plain FSDP); HSDP's 2-D mesh is refused (the norm would count replicas twice).
- Every parameter the optimizers step must be sharded (a DTensor): FSDP reduces no other gradient, so a
  plain parameter would differ from rank to rank (a ConfigError at the first step names it).

What FSDP itself asks of the model (`shard_model` checks the first):
- A parameter lives in one unit: weights tied between a block and a module outside it (an embedding
  shared by an encoder and a decoder block) cannot be sharded block by block; `shard_model` refuses the
  block, naming both uses (leave it to the root, which holds every tie).
- Every rank runs every sharded block in each step, in the same order, and each block's output reaches the
  loss on every rank or on none: each block all-gathers its parameters as its forward starts and
  reduce-scatters its gradients when its backward ends, collectives that every rank must issue alike (a
  block one rank skips, or whose output one rank discards, leaves them mismatched: an abort on gloo, a
  hang or mis-summed gradients on NCCL). Routing belongs inside a block (the MoE layer as a whole) or in
  the root. Parameters that no rank uses in a step need nothing. Parameters inside a block (or the root)
  that some ranks use and others not: `unused_params=True` reduce-scatters zero gradients for them
  (DDP's `find_unused_parameters`); a parameter that no rank used then gets a zero gradient, not None as
  under DDP, so weight decay and momentum still move it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from ampray.amp.config import ConfigError, MixedPrecisionConfig, dtype_name

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy


def _fsdp_module_class():
    fsdp = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp is None and torch.distributed.is_available():
        try:
            from torch.distributed.fsdp import FSDPModule as fsdp
        except ImportError:  # pragma: no cover - a torch without FSDP2
            return None
    return fsdp


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that `fully_shard` was applied to (the root first if it was)."""
    fsdp = _fsdp_module_class()
    if fsdp is None:
        return []
    return [m for m in model.modules() if isinstance(m, fsdp)]


def is_sharded(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def sharded_mesh(model: nn.Module) -> "DeviceMesh | None":
    """The device mesh of the model's sharded parameters (None when nothing is sharded). A 2-D mesh (HSDP)
    is a ConfigError: the engine sums squared norms over one shard dimension."""
    if not is_sharded(model):
        return None
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            if mesh.ndim != 1:
                raise ConfigError(f"fully_shard mesh={mesh} is not allowed under the engine: expected a 1-D "
                                  "mesh (plain FSDP); HSDP's 2-D mesh is not supported")
            return mesh
    return None


def param_dtypes(model: nn.Module) -> set[torch.dtype | None]:
    """The `param_dtype` of each FSDP module's MixedPrecisionPolicy (None: its parameters' own dtype)."""
    out: set[torch.dtype | None] = set()
    for m in fsdp_modules(model):
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        policy = getattr(state, "_mp_policy", None)
        out.add(getattr(policy, "param_dtype", None))
    return out


def low_precision_params(model: nn.Module) -> torch.dtype | None:
    """fp16 or bf16 when FSDP computes with parameters cast to it (fp16 wins if both), else None."""
    dtypes = param_dtypes(model)
    return next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)


def check_engine_config(config: MixedPrecisionConfig, amp_dtype: torch.dtype, model: nn.Module) -> None:
    """What the engine cannot do with a sharded model, as ConfigErrors naming the field, the value and what
    is allowed (called once, when the engine first sees the model)."""
    owner = "MixedPrecisionConfig"
    if config.oom_policy != "raise":
        raise ConfigError(f"{owner}.oom_policy={config.oom_policy!r} is not allowed for a model sharded with "
                          "FSDP (fully_shard): its forward all-gathers parameters, so a rank out of memory "
                          "leaves the others waiting before the ranks can agree; expected 'raise'")
    sharded_mesh(model)  # a 2-D mesh raises
    cast = low_precision_params(model)
    if cast is None:
        return
    if amp_dtype == torch.float32 and cast == torch.float16:
        raise ConfigError(f"{owner}.dtype={dtype_name(amp_dtype)!r} is not allowed with FSDP's "
                          "MixedPrecisionPolicy(param_dtype=float16): fp16 gradients need loss scaling; expected "
                          "dtype='fp16' (or param_dtype bf16/None)")
    if amp_dtype != torch.float32 and cast != amp_dtype:
        raise ConfigError(f"{owner}.dtype={dtype_name(amp_dtype)!r} is not allowed with FSDP's "
                          f"MixedPrecisionPolicy(param_dtype={dtype_name(cast)}): expected the same dtype (or "
                          "param_dtype None/float32); build_mp_policy(config) makes them agree")
    if config.fp32_modules:
        from ampray.amp.autocast import _matches

        held, fsdp = unit_param_dtypes(model), _fsdp_module_class()
        for name, m in model.named_modules():
            name = name.replace("_checkpoint_wrapped_module.", "").removeprefix("module.")
            # fully_shard renames a unit's class (Linear -> FSDPLinear): match the user's own class.
            cls = type(m).__bases__[-1] if fsdp is not None and isinstance(m, fsdp) else type(m)
            if name and _matches(name, m, config.fp32_modules, cls) and any(
                    held.get(id(p)) in (torch.float16, torch.bfloat16) for p in m.parameters()):
                raise ConfigError(f"{owner}.fp32_modules={list(config.fp32_modules)!r}: {name!r} is inside an FSDP "
                                  f"unit whose MixedPrecisionPolicy casts its parameters to {dtype_name(cast)}; "
                                  "expected it sharded as a unit of its own with param_dtype None "
                                  "(shard_model(..., fp32=config.fp32_modules) does this)")
    if cast == torch.float16:
        for name in ("collapse_policy", "stall_policy"):
            if getattr(config, name) == "fallback_bf16":
                raise ConfigError(f"{owner}.{name}='fallback_bf16' is not allowed with FSDP's "
                                  "MixedPrecisionPolicy(param_dtype=float16): the parameters stay cast to fp16 "
                                  "(the policy cannot change in a live run); expected 'raise' (or build the "
                                  "policy with param_dtype None)")


def build_mp_policy(config: MixedPrecisionConfig, reduce_dtype: torch.dtype | None = torch.float32,
                    output_dtype: torch.dtype | None = None, cast_forward_inputs: bool = True) -> "MixedPrecisionPolicy":
    """FSDP's MixedPrecisionPolicy for the engine's config: parameters computed in the autocast dtype
    (fp16/bf16; none for fp32), gradients reduced in `reduce_dtype` (fp32 by default)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not config.autocast_enabled:  # fp32 compute; the gradients may still travel in another dtype
        return MixedPrecisionPolicy(reduce_dtype=None if reduce_dtype == torch.float32 else reduce_dtype,
                                    output_dtype=output_dtype, cast_forward_inputs=cast_forward_inputs)
    return MixedPrecisionPolicy(param_dtype=config.dtype, reduce_dtype=reduce_dtype, output_dtype=output_dtype,
                                cast_forward_inputs=cast_forward_inputs)


def _block_test(blocks: Iterable[str] | Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    if callable(blocks):
        return blocks
    names = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ConfigError(f"shard_model blocks={names!r} is not allowed: expected class names (strings) or a "
                          "callable (module) -> bool")
    return lambda m: type(m).__name__ in names or f"{type(m).__module__}.{type(m).__qualname__}" in names


def shared_outside(model: nn.Module, is_block: Callable[[nn.Module], bool]) -> list[tuple[str, str, str]]:
    """The blocks (modules other than `model` for which `is_block` is true) holding a parameter that is
    also reachable from outside the block: one (block's name, the parameter's name inside it, a name
    outside it) each. FSDP shards a parameter in one unit, so such a block cannot be a unit of its own."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    prefixes: dict[int, list[str]] = {}
    blocks: dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if m is not model and is_block(m):
            prefixes.setdefault(id(m), []).append(name + ".")  # a module held twice has two names
            blocks[id(m)] = m
    out = []
    for key, block in blocks.items():
        inside = tuple(prefixes[key])
        # A block nested in this one is a unit of its own (sharded first): its parameters are checked there.
        nested = {id(p) for k, b in blocks.items() if k != key and any(n.startswith(inside) for n in prefixes[k])
                  for p in b.parameters()}
        for p in block.parameters():
            if id(p) in nested:
                continue
            outside = [n for n in names_of[id(p)] if not n.startswith(inside)]
            if outside:
                mine = next(n for n in names_of[id(p)] if n.startswith(inside))
                out.append((inside[0][:-1], mine, outside[0]))
                break
    return out


def refuse_tied(model: nn.Module, is_block: Callable[[nn.Module], bool], what: str) -> None:
    """A ConfigError naming `what` (the setting that chose the blocks) when a block `is_block` selects
    shares a parameter with a module outside it (`shared_outside`)."""
    shared = shared_outside(model, is_block)
    if shared:
        block, inside, outside = shared[0]
        raise ConfigError(f"{what} selects {block!r} ({type(model.get_submodule(block)).__name__}), which shares "
                          f"its parameter {inside!r} with {outside!r} outside it: FSDP shards a parameter in one "
                          "unit, so weights tied across blocks must stay in one; expected blocks that hold every "
                          "use of their parameters (tied weights stay in the root)")


def keeps_running_stats(module: nn.Module) -> bool:
    """A norm layer with parameters beside fp32 running statistics (BatchNorm, SyncBatchNorm, InstanceNorm
    with track_running_stats): torch's kernels refuse its weights in bf16/fp16 next to fp32 statistics, as
    FSDP's param_dtype would cast them (FSDP1 left such layers in fp32 by itself; FSDP2 does not)."""
    from torch.nn.modules.batchnorm import _NormBase

    return isinstance(module, _NormBase) and module.track_running_stats and \
        any(True for _ in module.parameters(recurse=False))


def fp32_units(model: nn.Module, patterns: Iterable[str] = (),
               what: str = "MixedPrecisionConfig.fp32_modules") -> list[nn.Module]:
    """The modules `shard_model` shards as units of their own with parameters left in fp32 when its policy
    casts: norm layers with running statistics (`keeps_running_stats`; one tied to a module outside it
    is left to its parent) and the modules matching `patterns` (MixedPrecisionConfig.fp32_modules: name
    globs or class names, as the engine's fp32 islands match them). One inside another is not listed: the
    outer unit keeps it in fp32 already. A pattern-selected module tied to a module outside it is a
    ConfigError naming `what`."""
    from ampray.amp.autocast import _matches

    patterns = tuple(patterns)
    chosen = {id(m) for name, m in model.named_modules() if name and patterns and _matches(name, m, patterns)}
    refuse_tied(model, lambda m: id(m) in chosen, f"{what}={list(patterns)}")
    norms = {id(m) for m in model.modules() if m is not model and keeps_running_stats(m)}
    tied = {block for block, _, _ in shared_outside(model, lambda m: id(m) in norms)}
    norms -= {id(model.get_submodule(name)) for name in tied}
    keep = chosen | norms
    out: list[nn.Module] = []

    def walk(m: nn.Module, inside: bool) -> None:
        if id(m) in keep and not inside and m is not model:
            if isinstance(m, (nn.ModuleList, nn.ModuleDict)):  # no forward of its own: its members are units
                keep.update(id(c) for c in m.children())
            else:
                out.append(m)
                inside = True
        for child in m.children():
            walk(child, inside)

    walk(model, False)
    return out


def unit_param_dtypes(model: nn.Module) -> dict[int, torch.dtype | None]:
    """id(parameter) -> the param_dtype of the FSDP unit that holds it (None: not cast)."""
    fsdp, out = _fsdp_module_class(), {}

    def walk(m: nn.Module, dtype: torch.dtype | None) -> None:
        if fsdp is not None and isinstance(m, fsdp):
            state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
            dtype = getattr(getattr(state, "_mp_policy", None), "param_dtype", None)
        for p in m.parameters(recurse=False):
            out[id(p)] = dtype
        for child in m.children():
            walk(child, dtype)

    walk(model, None)
    return out


def reduces_unused_params() -> bool:
    """Whether this torch's FSDP2 can reduce-scatter zero gradients for parameters a rank left unused
    (`FSDPModule.set_reduce_scatter_unused_params`: torch 2.13 has it, 2.11 has not)."""
    return hasattr(_fsdp_module_class(), "set_reduce_scatter_unused_params")


def shard_model(model: nn.Module, mesh: "DeviceMesh | None" = None, policy: "MixedPrecisionPolicy | None" = None,
                blocks: Iterable[str] | Callable[[nn.Module], bool] = (), offload: bool = False,
                checkpoint: bool = False, reshard_after_forward: bool = True,
                unused_params: bool = False, fp32: Iterable[str] = ()) -> nn.Module:
    """`fully_shard` each block (modules whose class name is in `blocks`, or for which `blocks(module)` is
    true; innermost first) and then the root, on `mesh` (default: a 1-D mesh over the world on the model's
    device type) with `policy` (default: none: FSDP computes in the parameters' dtype). `offload` moves the
    sharded parameters, gradients and optimizer state to CPU (`CPUOffloadPolicy`); `checkpoint`
    recomputes each block's activations in backward (torch's checkpoint wrapper: parameter names and state
    dict keys stay the same). `reshard_after_forward` is the blocks' (False: each keeps its gathered
    parameters from forward to backward); the root keeps torch's default, which does not reshard it.
    `unused_params`: parameters some ranks use and others not get zero gradients reduce-scattered (see the
    module's docstring for what FSDP still asks). When `policy` casts the parameters, the modules of
    `fp32_units(model, fp32)` (norm layers with running statistics, and those matching `fp32`: pass the
    engine's fp32_modules) are units of their own whose parameters stay fp32, and so is every block inside
    such a module. A block sharing a parameter with a module outside it is a ConfigError. Returns the
    model, now an FSDPModule, sharded in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    is_block = _block_test(blocks)
    refuse_tied(model, is_block, "shard_model's blocks")
    casts = policy is not None and policy.param_dtype not in (None, torch.float32)
    kept = fp32_units(model, fp32) if casts else []
    in_fp32 = {id(m) for unit in kept for m in unit.modules()}  # a block in a kept module stays fp32 too
    if unused_params and not reduces_unused_params():
        raise ConfigError(f"shard_model unused_params=True is not allowed with torch {torch.__version__}: "
                          "its FSDP cannot reduce-scatter zero gradients for unused parameters "
                          "(FSDPModule.set_reduce_scatter_unused_params); expected a newer torch, or every "
                          "parameter used on every rank (unused_params=False)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    if checkpoint:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

        apply_activation_checkpointing(
            model, check_fn=is_block,
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
        wrapped = {id(m._checkpoint_wrapped_module) for m in model.modules()
                   if hasattr(m, "_checkpoint_wrapped_module")}
        matches = lambda m: id(getattr(m, "_checkpoint_wrapped_module", None)) in wrapped  # noqa: E731
    else:
        matches = is_block
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    kwargs: dict[str, Any] = dict(mesh=mesh, mp_policy=policy or MixedPrecisionPolicy(),
                                  offload_policy=offload_policy, reshard_after_forward=reshard_after_forward)
    fp32_kwargs = {**kwargs, "mp_policy": MixedPrecisionPolicy(
        reduce_dtype=policy.reduce_dtype, output_dtype=policy.output_dtype) if casts else kwargs["mp_policy"]}
    inner = lambda m: getattr(m, "_checkpoint_wrapped_module", m)  # noqa: E731
    modules = [m for m in model.modules() if m is not model]
    blocks_inner = {id(inner(m)) for m in modules if matches(m)}
    kept_ids = {id(m) for m in kept} - blocks_inner  # a kept module that is a block is sharded as the block
    units = [m for m in reversed(modules) if matches(m) or id(m) in kept_ids]  # innermost first
    for unit in units:
        fully_shard(unit, **(fp32_kwargs if id(inner(unit)) in in_fp32 else kwargs))
    # The root with torch's own default: it stays gathered from forward to backward, which begins with it.
    fully_shard(model, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    if unused_params:
        model.set_reduce_scatter_unused_params(True)
    return model
