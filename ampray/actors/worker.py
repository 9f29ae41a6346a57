"""The Ray Train worker loop: set-up (model spec, data shard, engine, DDP), restore, then the loop.

`train_loop_per_worker(config)` takes plain data ({"job": JobConfig.to_dict(), "run_dir": str, ...}) so that
Tune can replace any value; the first thing it does is turn the job back into a typed JobConfig. Every
`report_every` optimizer steps each rank reports its own records (scaler state, counters, memory,
throughput, loss and, every `eval_every` steps, held-out loss and accuracy) through `ray.train.report`;
the aggregator callback on the controller receives all ranks. Every `checkpoint_every` steps and at the
end, rank 0 writes the full state and every rank its RNG and engine state into one checkpoint (Ray merges
the ranks' folders). A divergence of the engine stops the run or, with run.on_divergence = "rollback",
rolls every rank back to the newest verified checkpoint (`rollback.py`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ampray.actors.checkpoint import restore_folder, rng_state, save_checkpoint
from ampray.actors.manifest import Files
from ampray.actors.data import build_train_batches, build_val_batches, load_train_and_val, load_val
from ampray.actors.evaluate import evaluate
from ampray.actors.reporting import (CHECKPOINT_TMP_PREFIX, Reporter, optimizer_records,
                                     remove_stale_checkpoint_copies, write_progress)
from ampray.actors.rollback import DIVERGENCE, Rollback, event_counts
from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.bench import StepProfiler
from ampray.amp.flops import peak_flops
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.job import JobConfig, OptimizerSection
from ampray.models.registry import ModelSpec, model_flops_per_sample, resolve_spec

__all__ = ["CHECKPOINT_TMP_PREFIX", "IntervalLoss", "Reporter", "build_engine", "build_scheduler",
           "compress_allreduce", "live_setting_changes", "remove_stale_checkpoint_copies", "report_metrics",
           "train_loop_per_worker"]


def build_scheduler(optimizer, opt: OptimizerSection, total_steps: int):
    """Linear warm-up, then constant or cosine decay to min_lr_ratio."""
    warmup, floor = opt.warmup_steps, opt.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if opt.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(job: JobConfig, device: torch.device) -> MixedPrecisionTrainer:
    cls = AdaptiveMixedPrecisionTrainer if job.run.adaptive else MixedPrecisionTrainer
    return cls(job.precision, device)


def compress_allreduce(model: torch.nn.Module, dtype: str) -> None:
    """Register DDP's bf16/fp16 compression hook: gradients travel in half precision, are averaged,
    and come back in fp32. Nothing to do for fp32 or a model that is not DDP-wrapped (one worker)."""
    if dtype == "fp32" or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}[dtype]
    model.register_comm_hook(None, hook)


def report_metrics(engine: MixedPrecisionTrainer, step: int, rank: int, world: int, loss: float,
                   tokens_per_sample: int) -> dict[str, Any]:
    """One rank's records as a flat dict: the names become TensorBoard tags and Parquet columns."""
    stats, scaler, memory = engine.records()
    out: dict[str, Any] = {"step": step, "rank": rank, "world_size": world, "loss": loss}
    out.update({f"scaler/{k}": v for k, v in scaler.to_dict().items()})
    out.update({f"perf/{k}": v for k, v in stats.to_dict().items() if k != "loss"})
    out.update({f"memory/{k}": v for k, v in memory.to_dict().items()})
    if tokens_per_sample:
        out["perf/tokens_per_s"] = stats.samples_per_s * tokens_per_sample
    out.update(event_counts(engine.events))
    return out


def interval_throughput(engine: MixedPrecisionTrainer, step_time_s: float, samples_per_step: int,
                        tokens_per_sample: int, flops_per_sample: int) -> dict[str, float]:
    """One rank's throughput over a report interval (the steady state: no start-up or compilation in it):
    samples/s, tokens/s for a language model, and with the model's flops per sample known TFLOP/s and, on a
    device whose peak is known for the precision in use, `perf/mfu` (achieved / peak, 0-1)."""
    if not (step_time_s > 0 and math.isfinite(step_time_s)):
        return {}
    samples = samples_per_step / step_time_s
    out = {"perf/interval_samples_per_s": samples}
    if tokens_per_sample:
        out["perf/interval_tokens_per_s"] = samples * tokens_per_sample
    if flops_per_sample:
        out["perf/tflops_per_s"] = samples * flops_per_sample / 1e12
        peak = peak_flops(engine.device, engine.amp_dtype)
        if peak:
            out["perf/mfu"] = samples * flops_per_sample / peak
    return out


class IntervalLoss:
    """The loss a report carries: the mean of the interval's finite micro-batch losses, NaN when none was
    finite (a diverged run must not read as loss 0). Summed on the device: a micro-step makes no sync."""

    def __init__(self, device: torch.device) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        self._sum += torch.where(finite, loss, 0.0)
        self._count += finite

    def take(self) -> float:
        """The interval's mean (one sync), and a fresh interval."""
        total, count = torch.stack([self._sum, self._count]).tolist()
        self._sum.zero_()
        self._count.zero_()
        return total / count if count else math.nan


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process: one per compiled frame (DDP's split of the model at
    its buckets stays one), more after a graph break, and one or two more when the OOM policy first splits
    a batch into smaller chunks (new shapes). A count that keeps growing means recompilations, each a
    stall of seconds; 0 means nothing was compiled."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def placement() -> dict[str, str]:
    """Where this rank runs: its node's host name and the physical GPU ids Ray gave it ("cpu" without).
    Strings: they travel in every report (TensorBoard keeps numbers only) into the final table and a
    search's results."""
    import socket

    import ray

    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return {"placement/node": socket.gethostname(), "placement/gpu": ",".join(map(str, gpus)) or "cpu"}


def _resumed() -> bool:
    """Whether this session restored the run's own checkpoint (then a rollback has one to return to)."""
    import ray.train

    return ray.train.get_checkpoint() is not None


def _log_start(run_dir: Path, rank: int, step: int) -> None:
    """One line per worker start: a restart shows where it resumed from."""
    folder = run_dir / "progress"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "starts.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "start_step": step}) + "\n")


@dataclass
class Worker:
    """What set-up builds for one rank: everything the loop, the restore and a checkpoint touch."""

    job: JobConfig
    spec: ModelSpec
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    engine: MixedPrecisionTrainer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Any
    """ShardedBatches (in memory) or StreamBatches (Ray Data): next_batch, state_dict, load_state_dict."""
    val: Any
    """EvalBatches of this rank's held-out rows, or None."""
    placement: dict[str, str]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    worker = setup(JobConfig.from_dict(config["job"]), Path(config["run_dir"]), config.get("streaming", False),
                   config.get("objects"), config.get("cwd"))
    step, saved = restore_latest(worker, config.get("init_checkpoint"))
    train(worker, step, saved, config)


def setup(job: JobConfig, run_dir: Path, streaming: bool = False, objects: dict[str, Any] | None = None,
          cwd: str | None = None) -> Worker:
    """Build this rank's model, engine, optimizer, schedule and data; the model is DDP-wrapped when world > 1.
    `streaming`: the training rows come from Ray Data's shard of the TorchTrainer's "train" dataset.
    `objects`: the user's factory and loss by value ({"model.factory": fn}), instead of importing them;
    `cwd`: the folder the user started ampray in, where the model is built (see `in_user_folder`)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if job.scaling.bind_cpus:
        from ampray.actors.affinity import bind_local_rank

        bind_local_rank(ctx.get_local_rank(), ctx.get_local_world_size())
    spec, engine, model = build_model_and_engine(job, device, objects, cwd)
    if job.scaling.strategy == "fsdp":
        model = shard(model, job, engine)  # every rank, one worker too: the checkpoints hold shards
    else:
        if job.model.compile:
            model.compile()  # in place, inside DDP's wrapper: dynamo splits the graph at DDP's buckets
        # DDP when world > 1; one that must look for parameters without a gradient (resolved on the driver).
        ddp = {"find_unused_parameters": True} if job.scaling.find_unused_parameters == "true" else None
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp)
        compress_allreduce(model, job.scaling.allreduce_dtype)
    opt = job.optimizer
    optimizer = engine.build_optimizer(model, opt.name, lr=opt.lr, weight_decay=opt.weight_decay)
    scheduler = build_scheduler(optimizer, opt, job.run.steps)
    if streaming:
        train_rows, val_rows = None, load_val(job, spec)
    else:
        train_rows, val_rows = load_train_and_val(job, spec)
    batches = build_train_batches(job, spec, train_rows, rank, world, device)
    val = build_val_batches(job, val_rows, rank, world)
    torch.manual_seed(job.run.seed * 1000 + rank + 1)  # dropout differs across ranks
    return Worker(job, spec, run_dir, rank, world, device, engine, model, optimizer, scheduler, batches, val,
                  placement())


def build_model_and_engine(job: JobConfig, device: torch.device, objects: dict[str, Any] | None = None,
                           cwd: str | None = None) -> tuple[ModelSpec, MixedPrecisionTrainer, torch.nn.Module]:
    """The job's spec (a loss module's buffers on `device`), engine and prepared model, built in the user's
    folder (`in_user_folder`: their module, loss and factory may open paths relative to it) from the run's
    seed, so every rank starts from the same weights; lazy modules materialised (`materialize_lazy`)."""
    with in_user_folder(cwd):
        spec = resolve_spec(job.model.kind, job.model.factory, job.model.loss, objects)  # imports the user's code
        if isinstance(spec.loss, torch.nn.Module):
            spec = replace(spec, loss=spec.loss.to(device))
        torch.manual_seed(job.run.seed)
        engine = build_engine(job, device)
        model = engine.prepare_model(materialize_lazy(spec.build_model(job.model.options), job, spec))
    return spec, engine, model


def materialize_lazy(model: torch.nn.Module, job: JobConfig, spec: ModelSpec) -> torch.nn.Module:
    """A model with lazy modules (nn.LazyLinear, nn.LazyConv2d) learns its shapes from a first forward,
    which DDP, FSDP and the optimizer need done: run one, without gradients, on the first two rows of the
    training data, the same rows and seed on every rank (the same initial weights)."""
    from torch.nn.parameter import is_lazy

    if not any(is_lazy(t) for t in (*model.parameters(), *model.buffers())):
        return model
    from ampray.actors.data import one_batch

    x, _ = one_batch(job, spec, 2)
    training = model.training
    model.eval()  # no running statistics from these rows (BatchNorm), no dropout
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(training)
    return model


@contextlib.contextmanager
def in_user_folder(cwd: str | None):
    """Run the block in `cwd`, the folder the user started ampray in, when this node has it (a local
    cluster, a shared file system): a factory that opens a relative path (pretrained weights named in
    model.options) finds it as it did on the driver. Ray starts workers in a folder of their own."""
    here = os.getcwd()
    if not cwd or cwd == here or not os.path.isdir(cwd):
        yield
        return
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(here)


def shard(model: torch.nn.Module, job: JobConfig, engine: MixedPrecisionTrainer) -> torch.nn.Module:
    """scaling.strategy = "fsdp": FSDP2 over every worker of the run (a 1-D mesh over the default group),
    each of `fsdp_blocks` sharded on its own and then the root, parameters computed in precision.dtype,
    gradients reduce-scattered in scaling.allreduce_dtype (`ampray.amp.sharding`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ampray.amp.config import parse_dtype
    from ampray.amp.sharding import build_mp_policy, shard_model

    device = next(model.parameters()).device
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = build_mp_policy(engine.config, reduce_dtype=parse_dtype(job.scaling.allreduce_dtype))
    offload = job.scaling.fsdp_cpu_offload
    # One worker without offload: freeing each block's gathered parameters after forward saves nothing worth
    # a second gather in backward (GPT-2 small on an H100: 62.4 ms a step kept, 71.6 ms resharded;
    # benchmarks/profile_fsdp.py, BENCHMARKS.md). With offload the point is to keep them off the GPU.
    blocks = block_selector(fsdp_blocks(model, job), "scaling.fsdp_blocks")
    # Parameters some rank may leave unused (found on the driver, or said by the job): FSDP reduce-scatters
    # zero gradients for them, and checks that every rank ran the same blocks.
    return shard_model(model, mesh, policy, blocks=blocks, offload=offload,
                       checkpoint=job.scaling.activation_checkpointing,
                       reshard_after_forward=not (world == 1 and not offload),
                       unused_params=job.scaling.find_unused_parameters == "true",
                       fp32=engine.config.fp32_modules)


def block_selector(entries, field: str = "blocks"):
    """`shard_model`'s `blocks` test from a job's entries: class names, and "package.module:function" import
    paths of wrap policies, function(module) -> bool; a module is a block when any entry selects it. The
    import paths are imported here (ImportPathError names `field`)."""
    from ampray.amp.sharding import _block_test
    from ampray.models.registry import import_object

    entries = list(entries)
    policies = [import_object(e, field) for e in entries if ":" in e]
    by_name = _block_test([e for e in entries if ":" not in e])
    return lambda m: by_name(m) or any(bool(policy(m)) for policy in policies)


def fsdp_blocks(model: torch.nn.Module, job: JobConfig, tied: list[str] | None = None) -> list[str]:
    """The modules sharded one by one: scaling.fsdp_blocks (class names, and import paths of wrap policies),
    else the built-in gpt's Block, else the classes of the modules an nn.ModuleList holds (a transformer's
    layers; the outermost such lists: an MoE layer's experts stay in their layer, which every rank runs)
    except those sharing a parameter with a module outside them (tied weights stay in the root), else none
    (the root only). `tied` receives the classes left out for tied weights."""
    from ampray.amp.sharding import shared_outside

    if job.scaling.fsdp_blocks:
        return list(job.scaling.fsdp_blocks)
    if job.model.kind == "gpt" and not job.model.factory:
        return ["Block"]
    found: list[str] = []
    inside: set[int] = set()  # modules within a block found: a list there (an MoE layer's experts) is not one
    for module in model.modules():  # outer modules first
        if isinstance(module, torch.nn.ModuleList) and id(module) not in inside:
            for child in module:
                # A block: a module of modules that holds parameters (not a lone Linear, ReLU or Dropout).
                composite = any(True for _ in child.children()) and any(True for _ in child.parameters())
                name = type(child).__name__
                if composite:
                    inside.update(id(m) for m in child.modules())
                    if name not in found:
                        found.append(name)
    shares = [name for name in found if shared_outside(model, lambda m, name=name: type(m).__name__ == name)]
    if tied is not None:
        tied.extend(shares)
    return [name for name in found if name not in shares]


def restore_latest(w: Worker, init_checkpoint=None) -> tuple[int, dict[str, Any] | None]:
    """Continue from this run's latest checkpoint, else from `init_checkpoint` (a ray Checkpoint: PBT's
    clone of another trial), else start at step 0. Returns the step to continue from and this rank's
    report saved with the checkpoint (None when there is none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or init_checkpoint
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as folder:
        step = _restore_from(Path(folder), w.rank, w.job, world=w.world, model=w.model, optimizer=w.optimizer,
                             scheduler=w.scheduler, engine=w.engine, batches=w.batches)
        own = Path(folder) / f"report_rank{w.rank}.json"
        return step, json.loads(own.read_text()) if own.is_file() else None


def train(w: Worker, step: int, saved: dict[str, Any] | None, config: dict[str, Any]) -> None:
    """The loop from `step` to run.steps: train_step per micro-batch, a report every report_every steps
    (with an evaluation every eval_every), a checkpoint every checkpoint_every steps and at the end."""
    run, k = w.job.run, w.engine.config.gradient_accumulation_steps
    hparams = config.get("hparams", {}) if w.rank == 0 else None
    interval_loss = IntervalLoss(w.device)
    last = step  # the step the report interval started after
    write_progress(w.run_dir, w.rank, step)
    _log_start(w.run_dir, w.rank, step)
    remove_stale_checkpoint_copies()
    reporter = Reporter(w.run_dir, w.rank)
    # AMPRAY_PROFILE=START:COUNT profiles those steps of this session into run_dir/profile/rank<r>.txt.
    profiler = StepProfiler(os.environ.get("AMPRAY_PROFILE", ""), w.run_dir / "profile" / f"rank{w.rank}.txt")
    criterion, tokens, flops = w.spec.loss, 0, None
    if step >= run.steps:
        # Restored from the final checkpoint (a rerun whose caller never saw the end, such as a resumed
        # search): nothing to train, but the final records are reported again for the caller to see.
        # Each rank's own final report was saved with the checkpoint: the caller sees the same figures.
        metrics = saved or report_metrics(w.engine, step, w.rank, w.world, w.engine.records()[0].loss, 0)
        metrics["final"] = True
        if w.val is not None:
            # The held-out figures of this rerun's data.val_path (which may have changed: a finished model
            # evaluated on another set), from the restored final weights; the same set gives the same figures.
            metrics = {key: value for key, value in metrics.items() if not key.startswith("val/")}
            metrics.update(evaluate(w.model, w.engine, criterion, w.val, run.eval_batches,
                                    lockstep=w.job.scaling.strategy == "fsdp").to_dict())
            metrics["reevaluated"] = True  # the aggregator writes these held-out figures at the final step again
        for key, value in w.placement.items():  # the run's own placement when its report has one
            metrics.setdefault(key, value)
        if hparams is not None:
            metrics["hparams"] = hparams
        reporter.submit(metrics, None, "")
    eval_every = run.eval_every or run.report_every
    rollback = Rollback(w, step, restored=_resumed())
    w.engine.counters.begin_interval()  # after the set-up above (a rollback's snapshot): not step time
    while step < run.steps:
        try:
            for _ in range(k):
                x, y = w.batches.next_batch()
                out = w.engine.train_step(w.model, w.optimizer, criterion, x, y, w.scheduler)
                interval_loss.add(out["loss"])
            done = step + 1
            if done % run.report_every == 0 or done % run.checkpoint_every == 0 or done == run.steps:
                w.engine.stepper.settle()  # a policy raising at a deferred booking does so here, not in a report
        except DIVERGENCE as err:
            step = rollback.recover(w, err, step, reporter)  # every rank, at the same step; or raises
            reporter, interval_loss = Reporter(w.run_dir, w.rank), IntervalLoss(w.device)
            last = step
            w.engine.counters.begin_interval()
            continue
        if not tokens and w.spec.tokens_per_sample is not None:
            tokens = w.spec.tokens_per_sample(x)
        if flops is None:
            flops = model_flops_per_sample(w.spec, w.model, x) or 0
        step += 1
        profiler.step()
        final = step == run.steps
        checkpoint = step % run.checkpoint_every == 0 or final
        if not (step % run.report_every == 0 or checkpoint):
            continue
        metrics = report_metrics(w.engine, step, w.rank, w.world, interval_loss.take(), tokens)
        metrics.update(w.placement)
        metrics.update(optimizer_records(w.scheduler, out))
        if w.job.model.compile:
            metrics["compile/graphs"] = compiled_graphs()
        # Step time over this report interval alone: the steady-state figure (no warm-up in it, and nothing of
        # the report, evaluation or checkpoint before it).
        metrics["perf/interval_step_time_s"] = w.engine.counters.interval_time_s() / max(step - last, 1)
        metrics.update(interval_throughput(w.engine, metrics["perf/interval_step_time_s"], k * len(y), tokens,
                                           flops))
        if w.val is not None and (step % eval_every == 0 or final):
            metrics.update(evaluate(w.model, w.engine, criterion, w.val, run.eval_batches,
                                    lockstep=w.job.scaling.strategy == "fsdp").to_dict())
        metrics["final"] = final
        if final and hparams is not None:
            metrics["hparams"] = hparams
        if checkpoint:
            _submit_checkpoint(w, reporter, metrics, step, config)
        else:
            reporter.submit(metrics, None, "")
        last = step
        w.engine.counters.begin_interval()  # the report, evaluation and checkpoint are not step time
    profiler.close()
    reporter.close()


def _restore_from(folder: Path, rank: int, job: JobConfig, *, model, optimizer, scheduler, engine, batches,
                  world: int = 1) -> int:
    step, state = restore_folder(folder, rank, model=model, optimizer=optimizer, scheduler=scheduler,
                                 engine=engine, batches=batches, world=world)
    # Settings the job changed since the checkpoint was written (a PBT mutation, an edited job file)
    # take effect through the engine's setters; unchanged ones keep what the run adapted them to.
    engine.retune(live_setting_changes(state["job"]["precision"], job.precision.to_dict()),
                  reason="the job's settings differ from the checkpoint's")
    return step


def live_setting_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The live-changeable precision settings that differ between two precision sections."""
    from ampray.amp import settings

    return settings.changes(before, after)


def _submit_checkpoint(w: Worker, reporter: Reporter, metrics: dict[str, Any], step: int,
                       config: dict[str, Any]) -> None:
    # The state is written now (it is this step's); only handing it to Ray happens in the background.
    folder = tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_TMP_PREFIX}{os.getpid()}-")
    # Every file is hashed as it is written; the rank's manifest goes in last (manifest.py).
    files = Files(folder.name, w.rank)
    sharded = w.job.scaling.strategy == "fsdp"
    if w.rank == 0:
        save_checkpoint(folder.name, model=w.model, optimizer=w.optimizer, scheduler=w.scheduler, engine=w.engine,
                        step=step, data_state=w.batches.state_dict(), job=w.job.to_dict(),
                        job_toml=config.get("job_toml", ""), files=files, sharded_world=w.world if sharded else 0)
    else:
        files.save(f"engine_rank{w.rank}.pt", w.engine.state_dict())
    if sharded:  # every rank its own shards of the model and optimizer (after the engine state: settled)
        from ampray.actors.sharded_state import save_shards

        save_shards(files, w.model, w.optimizer, w.rank, w.world)
    files.save(f"rng_rank{w.rank}.pt", rng_state())
    # This rank's report, kept with the state: a rerun that finds the run complete reports it again.
    files.text(f"report_rank{w.rank}.json", json.dumps({k: v for k, v in metrics.items() if k != "hparams"}))
    files.seal(world=w.world if w.rank == 0 else None)
    reporter.submit(metrics, folder, f"checkpoint_{step:06d}")
