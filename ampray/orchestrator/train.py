"""run_training(job): the TorchTrainer run, on an embedded local Ray or on an existing cluster.

The embedded cluster binds to 127.0.0.1 and starts no dashboard. Before any worker starts, the job is
checked against what the cluster has (an impossible request fails in seconds instead of waiting for
resources forever). Rerunning the same run name resumes from the latest checkpoint: Ray Train V2
restores its checkpoint list from `<storage_path>/<name>` and the workers continue from the newest one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ampray.job import ConfigError, JobConfig, absolute_paths

log = logging.getLogger(__name__)


class ResourceError(ConfigError):
    """The job asks for more than the cluster can ever give."""


@dataclass
class TrainingOutcome:
    run_dir: Path
    logdir: Path
    num_workers: int
    use_gpu: bool
    final: dict[int, dict[str, Any]]
    """The last report of each rank, as the aggregator saw it."""
    checkpoint: str | None
    aggregate: dict[str, float] = dataclasses.field(default_factory=dict)
    """The last cross-rank figures (the `all/` tags without the prefix: `loss/mean`, `val/loss/mean`, ...)."""


def bind_to_localhost() -> None:
    """Make an embedded Ray listen on 127.0.0.1 only. Ray maps "127.0.0.1" given as the node address to
    the machine's reachable IP (for multi-node clusters); with its single-machine switch off it keeps the
    loopback address for the GCS, raylet and workers. The switch is read when ray is imported, so it is
    set in the environment (for later imports and child processes) and on the loaded module."""
    import sys

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


# Ray Train V2's controller collects reports by polling the workers, every 2 s by default; a worker's
# next report waits for the previous one to be collected. A shorter poll keeps the reports of a fast
# loop flowing (the worker reports from a background thread, so training itself never waits).
RAY_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def init_ray(address: str, dashboard: bool = False, runtime_env: dict | None = None) -> bool:
    """Connect to `address`, or start an embedded cluster on this machine, bound to localhost. The
    dashboard (and with it Ray's state API) starts only when asked for, and then on 127.0.0.1 only.
    `runtime_env` (the user's modules) becomes the job's: every task and actor of it, on every node,
    inherits it. Returns False when Ray was already initialised in this process (a notebook, a test),
    whose job keeps its own runtime_env: then the caller passes `runtime_env` to the workers itself."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not address:
        bind_to_localhost()
    else:
        check_reachable(address)
    import ray

    if ray.is_initialized():
        return False
    if address:
        if _embedded_address and os.environ.get("RAY_ADDRESS") == _embedded_address:
            del os.environ["RAY_ADDRESS"]  # an earlier embedded cluster's, gone with ray.shutdown()
        try:
            ray.init(address=address, log_to_driver=False,
                     runtime_env={**(runtime_env or {}), "env_vars": dict(RAY_ENV)})
        except ConnectionError as err:  # no cluster there (a connection lost later is a failed run)
            raise ConfigError(f"run.address={address!r}: cannot connect: {err}") from None
        if not address.startswith("ray://"):  # what this driver looks up later goes to this cluster
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        return True
    with _own_address():
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False,
                 configure_logging=False, runtime_env=runtime_env or None)
    return True


_embedded_address = ""
"""The RAY_ADDRESS this process set for the embedded cluster it started last."""


@contextlib.contextmanager
def _own_address():
    """Start the embedded cluster's GCS on a port chosen here and name it in RAY_ADDRESS before any of
    its processes starts: the GCS, the raylet and every worker it spawns (Train's controller and its
    placement-group cleaner, Tune's trials) inherit the variable and find this cluster by address.
    Without it, Ray code that looks a cluster up (the cleaner asks the state API whether the controller
    is alive) picks one among those running on the host: with another user's or notebook's Ray beside
    this one it fails ("Found multiple active Ray instances") or asks the other cluster, learns that
    the controller is unknown there, and removes a live run's placement group. The variable stays set
    in this process while the cluster runs; the port choice is undone once the GCS has it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    previous = {key: os.environ.get(key) for key in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ.update({"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"})
    started = False
    try:
        yield
        started = True
    finally:
        for key, value in previous.items():
            if key == "RAY_ADDRESS" and started:
                continue
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    import ray

    global _embedded_address
    gcs = _embedded_address = ray.get_runtime_context().gcs_address
    if gcs != f"127.0.0.1:{port}":
        ray.shutdown()
        raise RuntimeError(f"the embedded Ray cluster's GCS is at {gcs}, not at 127.0.0.1:{port} as its "
                           "processes were told (RAY_ADDRESS): this Ray ignores RAY_GCS_SERVER_PORT")


def local_gpus_bf16() -> bool | None:
    """Whether every GPU of this machine runs bf16 at full speed (compute capability 8.0 or newer: Ampere,
    Hopper and later); None when that cannot be told here. Asks nvidia-smi rather than CUDA, so that the
    driver never creates a CUDA context on a GPU that a worker will use."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        caps = [float(line) for line in out.stdout.split() if line.strip()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        try:
            caps = [caps[int(i)] for i in visible.split(",") if i.strip()]
        except (ValueError, IndexError):
            pass  # GPU UUIDs or a mismatch: every GPU of the machine counts
    return bool(caps) and all(c >= 8.0 for c in caps) if out.returncode == 0 else None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port address (a cluster's GCS) must answer within seconds: Ray itself retries an address
    where nothing listens for minutes. `auto` and `ray://` fail fast in Ray on their own."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"run.address={address!r}: no Ray cluster answers there ({err}); expected auto, the "
                          "host:port of a running cluster's head (ray start --head; 6379 by default) or "
                          "ray://host:10001") from None


def resolve_scaling(job: JobConfig, resources: dict[str, float],
                    nodes: list[dict[str, float]] | None = None) -> tuple[int, bool]:
    """(num_workers, use_gpu) from the job and the cluster's total resources, and, given `nodes` (each
    live node's resources), whether that many workers fit on the nodes one by one: a worker's GPUs and
    CPUs must all come from one node. Raises ResourceError."""
    s = job.scaling
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    use_gpu = s.use_gpu == "true" or (s.use_gpu == "auto" and gpus > 0)
    if s.use_gpu == "true" and gpus == 0:
        raise ResourceError("scaling.use_gpu=true is not possible: the cluster has no GPU; expected auto (GPUs "
                            "where the cluster has them) or false")
    # -1: one worker per GPU (a fraction per worker does not put several workers on one GPU).
    n = s.num_workers if s.num_workers > 0 else (max(1, int(gpus // max(1.0, s.gpus_per_worker))) if use_gpu else 2)
    if use_gpu and n > 1 and s.gpus_per_worker < 1:
        # Two DDP ranks on one GPU: NCCL refuses them ("Duplicate GPU detected") after the workers start.
        raise ResourceError(f"scaling.gpus_per_worker={s.gpus_per_worker:g} is not allowed with {n} GPU workers: "
                            "expected >= 1 (DDP over NCCL needs a GPU per rank; fractions suit one-worker runs, "
                            "such as `ampray tune` trials)")
    if use_gpu and n * s.gpus_per_worker > gpus:
        raise ResourceError(f"scaling.num_workers={n} x gpus_per_worker={s.gpus_per_worker} needs "
                            f"{n * s.gpus_per_worker:g} GPUs; the cluster has {gpus:g}")
    if s.allreduce_dtype == "bf16" and not use_gpu and n > 1:
        raise ResourceError("scaling.allreduce_dtype=bf16 is not possible on CPU workers (gloo has no bf16 "
                            "all-reduce hook); use fp32 or fp16")
    if n * s.cpus_per_worker > cpus:
        raise ResourceError(f"scaling.num_workers={n} x cpus_per_worker={s.cpus_per_worker} needs "
                            f"{n * s.cpus_per_worker:g} CPUs; the cluster has {cpus:g}")
    if nodes:
        fit = sum(_workers_on(node, s.cpus_per_worker, s.gpus_per_worker if use_gpu else 0.0) for node in nodes)
        if fit < n:
            held = ", ".join(f"{node.get('GPU', 0):g} GPU/{node.get('CPU', 0):g} CPU" for node in nodes)
            raise ResourceError(
                f"scaling.num_workers={n} does not fit: a worker takes cpus_per_worker={s.cpus_per_worker:g}"
                + (f" and gpus_per_worker={s.gpus_per_worker:g}" if use_gpu else "")
                + f" from one node, and the cluster's nodes ({held}) hold at most {fit} such workers")
    return n, use_gpu


def streams_fit(job: JobConfig, num_workers: int, cpus: float, trials: int = 1, per_trial: float = 0.0) -> int:
    """How many of `trials` runs of `num_workers` workers (concurrent Tune trials; 1 for a run) can stream
    at once: Ray Data reads a streamed dataset in tasks of one CPU each, scheduled on the CPUs the workers
    leave free, so with none left it never reads a row and the workers wait forever (seen: 2 workers on a
    2-CPU machine hung at step 0). `per_trial`: CPUs each trial holds beside its workers. Raises
    ResourceError when not even one fits; `trials` when not streaming."""
    if job.data.streaming != "true":
        return trials
    need = num_workers * job.scaling.cpus_per_worker + per_trial
    fit = math.floor((cpus - 1.0) / need + 1e-9) if cpus >= 1.0 + need - 1e-9 else 0
    if fit < 1:
        raise ResourceError(
            f"data.streaming: the training rows stream through Ray Data, whose reads need a CPU the workers leave "
            f"free; scaling.num_workers={num_workers} x cpus_per_worker={job.scaling.cpus_per_worker:g} take "
            f"{need:g} of the cluster's {cpus:g} CPUs; expected at most {max(0.0, cpus - 1):g} CPUs for the "
            "workers (fewer workers or a smaller scaling.cpus_per_worker), or data.streaming = false (the rows "
            "loaded into each worker's memory)")
    return min(trials, fit)


def _workers_on(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) one node can hold (a tiny slack against float sums like 0.1 * 3)."""
    fits = [math.floor(node.get("CPU", 0.0) / cpus + 1e-9)]
    if gpus:
        fits.append(math.floor(node.get("GPU", 0.0) / gpus + 1e-9))
    return max(0, min(fits))


def live_nodes() -> list[dict[str, float]]:
    """Each live node's total resources."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


# Where the cluster launcher (`ray up`) leaves its config on the head node; `ray start --head
# --autoscaling-config` in cluster.yaml reads it from there.
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"


def autoscaler_nodes(path: str | Path = AUTOSCALER_CONFIG) -> list[dict[str, float]]:
    """The nodes an autoscaling cluster can grow to: the head plus, per node type, its max_workers, capped
    at the cluster's max_workers (the types with the most GPUs first). Empty where there is no launcher
    config (an embedded or manually started cluster): then only the live nodes count."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        return []
    try:
        config = yaml.safe_load(file.read_text()) or {}
        types = config.get("available_node_types") or {}
        head = dict(types[config["head_node_type"]].get("resources") or {})
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring the autoscaler config %s: %s", file, err)
        return []
    if any(not spec.get("resources") for spec in types.values() if int(spec.get("max_workers", 0) or 0) > 0):
        # The launcher fills in `resources` for the providers it knows (AWS, GCP); without them the config
        # says nothing of what a node it can add holds, and counting it as empty would refuse jobs that fit.
        log.warning("ignoring the autoscaler config %s: a worker node type without `resources`", file)
        return []
    workers = [dict(spec["resources"]) for spec in types.values()
               for _ in range(int(spec.get("max_workers", 0) or 0))]
    workers.sort(key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), reverse=True)
    limit = config.get("max_workers")
    return [head, *(workers[:int(limit)] if limit is not None else workers)]


def cluster_capacity(address: str) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(total resources, nodes) a job may count on: what is live, or, on a launcher-made cluster that can
    grow further, what it can grow to (workers that wait for the autoscaler to add nodes are fine; a
    request beyond its maximum would wait forever)."""
    import ray

    nodes = live_nodes()
    grown = autoscaler_nodes() if address else []
    if sum(n.get("GPU", 0) for n in grown) > sum(n.get("GPU", 0) for n in nodes) or len(grown) > len(nodes):
        nodes = grown
    else:
        return dict(ray.cluster_resources()), nodes
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals, nodes


def resolved(job: JobConfig, num_workers: int, use_gpu: bool, streaming: bool | None = None, plan=None) -> JobConfig:
    """The job with the worker count, device and data mode it will run with, its data paths made absolute, and
    what the pre-flight `plan` found (the padded width, whether DDP must look for unused parameters), as
    saved beside the run and in its checkpoints (-1 and "auto" would say nothing about what ran)."""
    scaling = dataclasses.replace(job.scaling, num_workers=num_workers, use_gpu="true" if use_gpu else "false")
    if plan is not None and scaling.find_unused_parameters == "auto":
        # DDP must look for parameters without a gradient. FSDP skips those alike on every rank by itself;
        # its reduce-scatter of zeros (for parameters some ranks use and others not) only when asked.
        found = bool(plan.unused_parameters) and scaling.strategy != "fsdp"
        scaling.find_unused_parameters = "true" if found else "false"
    job = dataclasses.replace(absolute_paths(job), scaling=scaling)
    data = job.data
    if streaming is not None:
        data = dataclasses.replace(data, streaming="true" if streaming else "false")
    if plan is not None and plan.pad_widths and not data.pad_to:
        data = dataclasses.replace(data, pad_widths={**plan.pad_widths, **data.pad_widths})
    return dataclasses.replace(job, data=data)


def make_run_dir(job: JobConfig) -> Path:
    """The run's folder, created now: a storage_path that cannot hold it fails here, not in Ray."""
    from ampray.orchestrator.preflight import check_storage

    return check_storage(job.run_dir(), "run.storage_path", job.run.storage_path)


LOCK_FILE = ".driver.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder for one driver: a second `ampray train` of the same run (same name and
    storage_path) would start a second set of workers that train, checkpoint and prune over the first's.
    The lock is the operating system's (flock), so a killed driver releases it with its last breath."""
    import fcntl

    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"run {run_dir.name!r} in {run_dir.parent} is already being trained ({holder}); "
                              "wait for it to end, or give this run a new --name") from None
        except OSError as err:  # a file system without flock (some FUSE or Lustre mounts): go on unlocked
            log.warning("cannot lock %s (%s): a second driver of this run would not be refused", handle.name, err)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def set_aside_stale_events(run_dir: Path) -> Path | None:
    """A rerun that finds event files but no checkpoint (the earlier attempt ended before its first one)
    starts at step 0: its events go into a fresh folder, and the earlier ones are moved beside it, so
    that the aggregator, which never writes a step at or below one already there, does not drop the new
    run's first steps or stitch two runs, perhaps of different settings, into one curve. Returns where
    the earlier events went (None when nothing was moved)."""
    import time

    from ampray.orchestrator.preflight import latest_checkpoint

    logdir = run_dir / "tensorboard"
    if latest_checkpoint(run_dir) is not None or not any(logdir.glob("events.out.tfevents.*")):
        return None
    base = run_dir / f"tensorboard.before-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = base, 1
    while target.exists():  # two reruns within one second
        target, n = base.with_name(f"{base.name}~{n}"), n + 1
    logdir.rename(target)
    (run_dir / "progress" / "all.json").unlink(missing_ok=True)
    return target


def save_resolved(job: JobConfig) -> Path:
    run_dir = job.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".job.toml.tmp"
    tmp.write_text(job.to_toml())
    os.replace(tmp, run_dir / "job.toml")
    return run_dir


def build_trainer(job: JobConfig, num_workers: int, use_gpu: bool, callbacks: list | None = None,
                  init_checkpoint=None, runtime_env: dict | None = None, stream=None,
                  objects: dict[str, Any] | None = None, cwd: str | None = None):
    """The TorchTrainer of a job; `init_checkpoint` (a ray Checkpoint) starts a new run from that state
    when the run has no checkpoint of its own (Train V2 passes such state through the loop config).
    `runtime_env` ships the user's modules to the workers; `stream`, a ray.data.Dataset, feeds training
    when the job streams (data.streaming = "true": read from data.path when not given); `cwd`: the folder
    the user started ampray in (default: this process's), where the workers build the model."""
    import ray.train

    from ampray.actors.aggregator import TensorBoardAggregator
    from ampray.actors.worker import train_loop_per_worker
    from ampray.orchestrator.backend import LoopbackTorchConfig, on_loopback
    from ampray.orchestrator.ray_trainer import InterruptibleTorchTrainer

    run_dir = job.run_dir()
    resources = {"CPU": job.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = job.scaling.gpus_per_worker
    loop_config = {"job": job.to_dict(), "run_dir": str(run_dir), "job_toml": job.to_toml(),
                   "hparams": {k: v for k, v in job.flat().items() if isinstance(v, (int, float, str, bool))},
                   "init_checkpoint": init_checkpoint, "streaming": job.data.streaming == "true",
                   "objects": objects or {}, "cwd": cwd or os.getcwd()}
    datasets = None
    if job.data.streaming == "true":
        from ampray.actors.data import TRAIN

        datasets = {TRAIN: stream if stream is not None else read_stream(job)}
    return InterruptibleTorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        torch_config=LoopbackTorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=str(run_dir.parent),
            callbacks=[TensorBoardAggregator(str(run_dir / "tensorboard")), *(callbacks or [])],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.num_to_keep),
            # Workers that do not start within RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) are retried
            # without end by default: right while an autoscaler adds nodes, a silent hang on a machine
            # of its own, where nothing is ever added (the resources are held by something else).
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures,
                                                   controller_failure_limit=0 if on_loopback() else -1),
            worker_runtime_env=runtime_env or {},
        ),
    )


@contextlib.contextmanager
def workers_must_start(num_workers: int, job: JobConfig):
    """Turn Ray Train's worker-group startup timeout (raised once retries are used up: at once on this
    machine's own cluster, see build_trainer) into a ResourceError that says what waited and for what."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    try:
        yield
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))
        s = job.scaling
        raise ResourceError(
            f"the run's {num_workers} worker(s) (cpus_per_worker={s.cpus_per_worker:g}"
            + (f", gpus_per_worker={s.gpus_per_worker:g}" if s.use_gpu == "true" else "")
            + f") did not start within {timeout:g} s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S): the cluster "
            "has the resources, but something else holds them now (another run or search on this cluster, "
            "or its leftover placement groups: `ray status`); the run stopped instead of waiting") from None


@contextlib.contextmanager
def _tidy_on_failure(run_dir: Path, notify: Callable[[str], None]):
    """A failed run leaves no checkpoint behind that Ray never registered and that does not verify (the
    part a full disk or a crash cut short): removed at once, with a note, so that what is on disk is what
    a rerun resumes from."""
    from ampray.orchestrator.checkpoints import remove_partial_checkpoints

    try:
        yield
    except BaseException:
        try:
            for note in remove_partial_checkpoints(run_dir):
                notify(note)
        except OSError:
            pass  # the run's own error says more than a failed tidy-up
        raise


def read_stream(job: JobConfig):
    """The training rows as a Ray Dataset (lazy: read as the workers consume them), only the named columns."""
    import ray.data

    return ray.data.read_parquet(str(Path(job.data.path).expanduser()),
                                 file_extensions=["parquet"]).select_columns(job.data.read_columns)


def node_memory() -> float:
    """The memory of the smallest live node (Ray's `memory` resource: what its workers may use)."""
    sizes = [node.get("memory", 0.0) for node in live_nodes()]
    return min(sizes) if sizes and min(sizes) > 0 else float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def user_code(job: JobConfig, objects: dict[str, Any] | None = None) -> dict[str, str]:
    """The job's import paths of the user's own code, by field (not those handed over by value): the model's
    factory and loss, and the wrap policies among scaling.fsdp_blocks."""
    code = {f"model.{name}": value for name in ("factory", "loss")
            if (value := getattr(job.model, name)) and f"model.{name}" not in (objects or {})}
    if job.scaling.strategy == "fsdp":
        code.update({f"scaling.fsdp_blocks[{i}]": entry for i, entry in enumerate(job.scaling.fsdp_blocks)
                     if ":" in entry})
    return code


def run_training(job: JobConfig, notify: Callable[[str], None] = log.warning, stream=None,
                 objects: dict[str, Any] | None = None,
                 choose_precision: Callable[[JobConfig, bool], JobConfig] | None = None) -> TrainingOutcome:
    """Validate, start (or join) Ray, train, and return every rank's final records. Everything that can
    be checked on the driver is checked before a worker starts; `notify` gets notes on allowed changes
    of a rerun (a longer cosine schedule) before training and on cross-rank disagreements after it.
    `stream`: a ray.data.Dataset of the training rows instead of data.path; `objects`: the user's factory
    and loss by value ({"model.factory": fn}) where they cannot be imported by path (the Python API's);
    `choose_precision(job, use_gpu)`: the job with the precision for the device found (the CLI's default)."""
    from ampray.actors.aggregator import read_scalars
    from ampray.orchestrator.preflight import (check_batch_fits, check_model_and_data, check_resume,
                                               keep_trained_padding, streaming_mode)

    plan = check_model_and_data(job, stream, objects)  # what needs no cluster fails before Ray starts
    for note in plan.notes:
        notify(note)
    if plan.data_check is not None:
        notify(plan.data_check.line())
    code = user_code(job, objects)
    runtime_env = {}
    if code:
        from ampray.orchestrator.shipping import probe_imports, worker_runtime_env

        runtime_env = worker_runtime_env(code)
    with run_lock(make_run_dir(job)):
        from ampray.orchestrator.checkpoints import settle_checkpoints

        for note in settle_checkpoints(job.run_dir()):  # resume only from a checkpoint that verifies
            notify(note)
        job = keep_trained_padding(job, plan)  # as the checkpoint settled on was trained
        if init_ray(job.run.address, runtime_env=runtime_env):
            runtime_env = {}  # the job's own: the workers inherit it (uploaded once, by this driver)
        if code:
            probe_imports(code, runtime_env)  # the workers import the user's code as the driver did
        resources, nodes = cluster_capacity(job.run.address)
        num_workers, use_gpu = resolve_scaling(job, resources, nodes)
        if choose_precision is not None:
            job = choose_precision(job, use_gpu)
        job = resolved(job, num_workers, use_gpu,
                       streaming_mode(job, plan, node_memory(), num_workers, stream is not None), plan)
        streams_fit(job, num_workers, resources.get("CPU", 0.0))
        if plan.unused_parameters:
            asked = job.scaling.find_unused_parameters == "true"
            if job.scaling.strategy == "fsdp":
                how = ("FSDP reduce-scatters zero gradients for them (scaling.find_unused_parameters)" if asked else
                       "FSDP leaves them without a gradient on every rank alike; if some ranks use them and others "
                       "do not, set scaling.find_unused_parameters = true")
            else:
                how = "DDP looks for them in every step (scaling.find_unused_parameters)" if asked else ""
            if how:
                shown = ", ".join(plan.unused_parameters[:3]) + (", ..." if len(plan.unused_parameters) > 3 else "")
                notify(f"{len(plan.unused_parameters)} parameter(s) get no gradient from the loss ({shown}): {how}")
        if job.data.fill_gpu:  # the job as the workers get it (paths, padding), and the checkpoint resumed
            from ampray.actors.batch_probe import choose_fill

            job = choose_fill(job, plan, num_workers, use_gpu, runtime_env, objects, notify, stream)
        check_batch_fits(job, plan.rows, num_workers)
        for note in check_resume(job, num_workers, plan.spec):
            notify(note)
        stale = set_aside_stale_events(job.run_dir())
        if stale is not None:
            notify(f"the run has no checkpoint to resume from, so it starts at step 0; the TensorBoard events "
                   f"of its earlier attempt are kept in {stale}")
        run_dir = save_resolved(job)
        trainer = build_trainer(job, num_workers, use_gpu, runtime_env=runtime_env, stream=stream,
                                objects=objects)
        with workers_must_start(num_workers, job), _tidy_on_failure(run_dir, notify):
            result = trainer.fit()
    logdir = run_dir / "tensorboard"
    if not logdir.is_dir():
        notify(f"{logdir} is not on this machine: the Train controller wrote the run's events on the head node "
               "(a ray:// client drives a cluster from outside), so the table below is empty; view them there")
    scalars = read_scalars(str(logdir))
    final = final_records(scalars, num_workers)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if checkpoint is not None:
        add_placement(final, Path(checkpoint))
    from ampray.actors.rollback import rollback_notes

    for note in rollback_notes(run_dir):  # run.on_divergence = "rollback": what was rolled back, and why
        notify(note)
    disagreements = scalars.get("all/scaler/scale_disagreements")
    if disagreements and disagreements[-1][1] > 0:
        notify(f"the ranks' loss scales disagreed in {disagreements[-1][1]:.0f} report(s) "
               f"(all/scaler/scale_disagreement in {logdir}): their gradients' overflow checks did not agree, "
               "so the model replicas may have diverged")
    aggregate = {tag.removeprefix("all/"): points[-1][1] for tag, points in scalars.items()
                 if tag.startswith("all/") and points}
    return TrainingOutcome(run_dir, logdir, num_workers, use_gpu, final, checkpoint, aggregate)


def add_placement(final: dict[int, dict[str, Any]], checkpoint: Path) -> None:
    """Each rank's node and GPU (strings, so not in TensorBoard) from the report it saved with the final
    checkpoint."""
    for rank, records in final.items():
        try:
            report = json.loads((checkpoint / f"report_rank{rank}.json").read_text())
        except (OSError, ValueError):
            continue
        records.update({k: v for k, v in report.items() if k.startswith("placement/")})


def final_records(scalars: dict[str, list[tuple[int, float]]], num_workers: int) -> dict[int, dict[str, Any]]:
    """Each rank's last value of every tag, from the TensorBoard events the aggregator wrote."""
    out: dict[int, dict[str, Any]] = {r: {} for r in range(num_workers)}
    for tag, points in scalars.items():
        if not tag.startswith("rank") or not points:
            continue
        head, _, name = tag.partition("/")
        rank = int(head[4:])
        if rank in out:
            out[rank][name] = points[-1][1]
            out[rank]["step"] = max(out[rank].get("step", 0), points[-1][0])
    return out
