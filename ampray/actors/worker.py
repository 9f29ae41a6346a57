"""The Ray Train worker loop: build model, data and engine, wrap in DDP, train, report every rank, checkpoint.

`train_loop_per_worker(config)` takes plain data ({"job": JobConfig.to_dict(), "run_dir": str}) so that
Tune can replace any value. Every `report_every` optimizer steps each rank reports its own records
(scaler state, counters, memory, throughput, loss) through `ray.train.report`; the aggregator callback on
the controller receives all ranks. Every `checkpoint_every` steps and at the end, rank 0 writes the full
state and every rank its RNG state into one checkpoint (Ray merges the ranks' folders).
"""

from __future__ import annotations

import json
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ampray.actors.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, set_rng_state
from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.bench import StepProfiler
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.data.synthetic import SyntheticConfig, make_dataset
from ampray.models import build_config, build_criterion, build_model


def build_data(job: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's dataset as tensors: a Parquet folder, or the built-in corpus shaped for the model."""
    kind, data = job["model"]["kind"], job["data"]
    if data["path"]:
        from ampray.data.parquet import read_dataset

        return read_dataset(Path(data["path"]).expanduser(), kind)
    cfg = build_config(kind, **job["model"]["options"])
    shape = {"mlp": lambda: dict(in_features=cfg.in_features, num_classes=cfg.num_classes),
             "cnn": lambda: dict(in_channels=cfg.in_channels, image_size=cfg.image_size,
                                 num_classes=cfg.num_classes),
             "gpt": lambda: dict(vocab_size=cfg.vocab_size, seq_len=cfg.block_size)}[kind]()
    return make_dataset(kind, SyntheticConfig(num_samples=data["num_samples"], seed=data["seed"], **shape))


def build_scheduler(optimizer, opt: dict[str, Any], total_steps: int):
    """Linear warm-up, then constant or cosine decay to min_lr_ratio."""
    warmup, floor = opt["warmup_steps"], opt["min_lr_ratio"]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if opt["schedule"] == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(job: dict[str, Any], device: torch.device) -> MixedPrecisionTrainer:
    cls = AdaptiveMixedPrecisionTrainer if job["run"]["adaptive"] else MixedPrecisionTrainer
    return cls(MixedPrecisionConfig.from_dict(job["precision"]), device)


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


def _write_progress(run_dir: Path, rank: int, step: int) -> None:
    """Where a rank is, and its pid: read by people and by the fault tests."""
    folder = run_dir / "progress"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "step": step}))
    os.replace(tmp, folder / f"rank{rank}.json")


def _log_start(run_dir: Path, rank: int, step: int) -> None:
    """One line per worker start: a restart shows where it resumed from."""
    folder = run_dir / "progress"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "starts.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "pid": os.getpid(), "start_step": step}) + "\n")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ampray.data.parquet import ShardedBatches

    job, run_dir = config["job"], Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if job["scaling"].get("bind_cpus"):
        from ampray.actors.affinity import bind_local_rank

        bind_local_rank(ctx.get_local_rank(), ctx.get_local_world_size())
    run, kind = job["run"], job["model"]["kind"]
    torch.manual_seed(run["seed"])  # the same initial weights on every rank
    engine = build_engine(job, device)
    model = engine.prepare_model(build_model(kind, **job["model"]["options"]))
    if job["model"].get("compile"):
        model.compile()  # in place, inside DDP's wrapper: dynamo splits the graph at DDP's buckets
    model = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world > 1
    compress_allreduce(model, job["scaling"]["allreduce_dtype"])
    opt_cfg = job["optimizer"]
    optimizer = engine.build_optimizer(model, opt_cfg["name"], lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
    scheduler = build_scheduler(optimizer, opt_cfg, run["steps"])
    criterion = build_criterion(kind)
    inputs, targets = build_data(job)
    if device.type == "cuda":
        # The built-in corpora are small: keeping them on the GPU takes the host copy out of each step.
        inputs, targets = inputs.to(device), targets.to(device)
    k = engine.config.gradient_accumulation_steps
    batches = ShardedBatches(inputs, targets, job["data"]["batch_size"] // k, rank, world, job["data"]["seed"])
    torch.manual_seed(run["seed"] * 1000 + rank + 1)  # dropout differs across ranks
    step, saved = _maybe_restore(rank, job, config.get("init_checkpoint"), model=model, optimizer=optimizer,
                                 scheduler=scheduler, engine=engine, batches=batches)
    tokens = inputs.shape[1] if kind == "gpt" else 0
    where = placement()
    interval_loss = IntervalLoss(device)
    last = (step, engine.counters.wall_time_s())
    _write_progress(run_dir, rank, step)
    _log_start(run_dir, rank, step)
    remove_stale_checkpoint_copies()
    reporter = Reporter(run_dir, rank)
    # AMPRAY_PROFILE=START:COUNT profiles those steps of this session into run_dir/profile/rank<r>.txt.
    profiler = StepProfiler(os.environ.get("AMPRAY_PROFILE", ""), run_dir / "profile" / f"rank{rank}.txt")
    if step >= run["steps"]:
        # Restored from the final checkpoint (a rerun whose caller never saw the end, such as a resumed
        # search): nothing to train, but the final records are reported again for the caller to see.
        # Each rank's own final report was saved with the checkpoint: the caller sees the same figures.
        metrics = saved or report_metrics(engine, step, rank, world, engine.records()[0].loss, tokens)
        metrics["final"] = True
        for key, value in where.items():  # the run's own placement when its report has one
            metrics.setdefault(key, value)
        if rank == 0:
            metrics["hparams"] = config.get("hparams", {})
        reporter.submit(metrics, None, "")
    while step < run["steps"]:
        for _ in range(k):
            x, y = batches.next_batch()
            out = engine.train_step(model, optimizer, criterion, x, y, scheduler)
            interval_loss.add(out["loss"])
        step += 1
        profiler.step()
        final = step == run["steps"]
        if step % run["report_every"] == 0 or step % run["checkpoint_every"] == 0 or final:
            metrics = report_metrics(engine, step, rank, world, interval_loss.take(), tokens)
            metrics.update(where)
            if job["model"].get("compile"):
                metrics["compile/graphs"] = compiled_graphs()
            wall = engine.counters.wall_time_s()
            # Step time over this report interval alone: the steady-state figure (no warm-up in it).
            metrics["perf/interval_step_time_s"] = (wall - last[1]) / max(step - last[0], 1)
            last = (step, wall)
            metrics["final"] = final
            if final and rank == 0:
                metrics["hparams"] = config.get("hparams", {})
            _report(reporter, metrics, step, rank, run, job, config, model=model, optimizer=optimizer,
                    scheduler=scheduler, engine=engine, batches=batches, final=final)
    profiler.close()
    reporter.close()


def _maybe_restore(rank: int, job: dict[str, Any], init_checkpoint, *, model, optimizer, scheduler, engine,
                   batches) -> tuple[int, dict[str, Any] | None]:
    """Continue from this run's latest checkpoint, else from `init_checkpoint` (a ray Checkpoint: PBT's
    clone of another trial), else start at step 0. Returns the step to continue from and this rank's
    report saved with the checkpoint (None when there is none)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        checkpoint = init_checkpoint
    if checkpoint is None:
        return 0, None
    with checkpoint.as_directory() as folder:
        step = _restore_from(Path(folder), rank, job, model=model, optimizer=optimizer, scheduler=scheduler,
                             engine=engine, batches=batches)
        own = Path(folder) / f"report_rank{rank}.json"
        return step, json.loads(own.read_text()) if own.is_file() else None


def _restore_from(folder: Path, rank: int, job: dict[str, Any], *, model, optimizer, scheduler, engine,
                  batches) -> int:
    state = load_checkpoint(folder)
    step = restore(state, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine)
    batches.load_state_dict(state["data"])
    own = folder / f"rng_rank{rank}.pt"
    if own.is_file():
        set_rng_state(torch.load(own, weights_only=True))
    # The engine's state is each rank's own: the scale and hysteresis agree across ranks under DDP, but the
    # counters, the OOM policy's learned chunk size and the adaptation's measurements are the rank's.
    own = folder / f"engine_rank{rank}.pt"
    if own.is_file():
        engine.load_state_dict(torch.load(own, weights_only=True))
    # Settings the job changed since the checkpoint was written (a PBT mutation, an edited job file)
    # take effect through the engine's setters; unchanged ones keep what the run adapted them to.
    engine.retune(live_setting_changes(state["job"]["precision"], job["precision"]),
                  reason="the job's settings differ from the checkpoint's")
    return step


def live_setting_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The live-changeable precision settings that differ between two precision sections."""
    from ampray.amp.scaler import SETTINGS

    changes: dict[str, Any] = {k: after[k] for k in SETTINGS if after.get(k) != before.get(k)}
    adaptation = {k: v for k, v in after.get("adaptation", {}).items()
                  if before.get("adaptation", {}).get(k) != v}
    if adaptation:
        changes["adaptation"] = adaptation
    return changes


# Local copies of checkpoints waiting for upload: <tmp>/ampray-ckpt-<pid>-*. A worker killed meanwhile
# leaves its copy behind; the next worker on the node removes those of processes that no longer exist.
CHECKPOINT_TMP_PREFIX = "ampray-ckpt-"


def remove_stale_checkpoint_copies(tmp: str | None = None) -> list[Path]:
    import shutil

    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{CHECKPOINT_TMP_PREFIX}*-*"):
        try:
            pid = int(path.name.removeprefix(CHECKPOINT_TMP_PREFIX).split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:
            continue  # alive, someone else's
    return removed


class Reporter:
    """Calls `ray.train.report` from a background thread, in order, so that training never waits for it.

    Ray Train V2 hands each report to the controller through a queue of size one that the controller
    polls (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and synchronises a checkpoint name across ranks:
    done inline, a report every few steps can stall a fast GPU loop for most of a poll interval. Every
    rank submits the same reports in the same order, so the cross-rank barrier inside stays aligned.
    """

    def __init__(self, run_dir: Path, rank: int, report: Callable[..., None] | None = None) -> None:
        self.run_dir, self.rank = run_dir, rank
        self._report = report or _ray_report
        self._queue: queue.Queue = queue.Queue()
        # One checkpoint in flight at most: each holds a full copy of the state on local disk until Ray has
        # uploaded it, so a storage slower than checkpoint_every makes training wait instead of filling it.
        self._checkpoint_slot = threading.BoundedSemaphore(1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ampray-reporter", daemon=True)
        self._thread.start()

    def submit(self, metrics: dict[str, Any], folder: tempfile.TemporaryDirectory | None, name: str) -> None:
        """Queue one report (and the checkpoint folder that goes with it, which the thread deletes once Ray
        has it). Raises the thread's error, if it stopped on one; the folder is deleted then too."""
        try:
            self._raise_if_stopped()
            if folder is not None:
                while not self._checkpoint_slot.acquire(timeout=1.0):
                    self._raise_if_stopped()
        except BaseException:
            if folder is not None:
                folder.cleanup()
            raise
        self._queue.put((metrics, folder, name))

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("the report thread has stopped")

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                metrics, folder, name = item
                try:
                    self._report(metrics, folder.name if folder is not None else None, name)
                    # Progress means "handed to Ray": a checkpoint named here is one a restart can use.
                    _write_progress(self.run_dir, self.rank, metrics["step"])
                finally:
                    if folder is not None:
                        try:
                            folder.cleanup()
                        finally:
                            self._checkpoint_slot.release()
        except BaseException as err:  # surfaced by the training thread at its next submit or close
            self._error = err
            while True:  # what is still queued will not be reported: delete its checkpoint copies
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[1] is not None:
                    item[1].cleanup()

    def close(self) -> None:
        """Wait until every report has been handed over (the run must not end before)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _ray_report(metrics: dict[str, Any], folder: str | None, name: str) -> None:
    import ray.train

    if folder is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def _report(reporter, metrics, step, rank, run, job, config, *, model, optimizer, scheduler, engine, batches,
            final):
    if not (step % run["checkpoint_every"] == 0 or final):
        reporter.submit(metrics, None, "")
        return
    # The state is written now (it is this step's); only handing it to Ray happens in the background.
    folder = tempfile.TemporaryDirectory(prefix=f"{CHECKPOINT_TMP_PREFIX}{os.getpid()}-")
    if rank == 0:
        save_checkpoint(folder.name, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine,
                        step=step, data_state=batches.state_dict(), job=job, job_toml=config.get("job_toml", ""))
    else:
        torch.save(engine.state_dict(), Path(folder.name) / f"engine_rank{rank}.pt")
    torch.save(rng_state(), Path(folder.name) / f"rng_rank{rank}.pt")
    # This rank's report, kept with the state: a rerun that finds the run complete reports it again.
    (Path(folder.name) / f"report_rank{rank}.json").write_text(
        json.dumps({k: v for k, v in metrics.items() if k != "hparams"}))
    reporter.submit(metrics, folder, f"checkpoint_{step:06d}")
