"""run_search(job, search): a Ray Tune search over loss-scaler and adaptation settings.

Each trial is a whole Ray Train run of the job (the Train-inside-Tune pattern of Ray Train V2) with its
own workers; fractional GPUs let several small trials share one GPU. The result Tune sees is aggregated
over all ranks by `TuneAggregateCallback` on the Train controller (Ray's own bridge forwards rank 0 only).

The objective (minimised) is explicit:

    objective = loss + skip_penalty * skip_rate

where `loss` is the held-out loss over every rank's shard of the validation set (data.val_path or
data.val_fraction; a trial evaluates at every report, so that the schedulers compare held-out losses only), or, without one, the cross-rank mean training loss over the
last report interval (at the end of the step budget `run.steps` for trials that finish), and `skip_rate` the fraction of optimizer steps skipped for
overflow or NaN, summed over ranks. The penalty makes the search see scaling: two settings that reach
the same loss are told apart by how many steps they threw away. Throughput and peak memory are
recorded beside it.

Outputs, in `<storage_path>/<search name>/`: `results.parquet` (one row per trial: every sampled
parameter, objective, loss, skip rate, throughput, peak memory, steps, status), `best.toml` (the base
job with the best parameters; `ampray train --config best.toml` takes it unchanged) and, per trial,
`trials/<trial>/tensorboard` with its scalars and HParams (`tensorboard --logdir` on the search folder
shows one run per trial).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ampray.amp.config import _check_choice, _fail
from ampray.job import ConfigError, JobConfig, _check_seed, check_folder_name
from ampray.tune_spaces import apply

RESULT_COLUMNS = ("objective", "loss", "val_loss", "val_accuracy", "skip_rate", "overflow_rate", "samples_per_s", "peak_memory_bytes", "step",
                  "placement")


@dataclass
class SearchConfig:
    """How to search."""

    space: str = "scaler"
    """A preset (scaler, adaptive, precision, full) or a path to a space TOML."""
    samples: int = 4
    """Trials to run (PBT: the population size)."""
    scheduler: str = "asha"
    """asha (stop poor trials early), pbt (population based training: every perturbation_interval
    steps, trials in the bottom quarter continue from a top trial's checkpoint with mutated scaler
    settings) or fifo (every trial runs its whole budget)."""
    perturbation_interval: int = 0
    """PBT: optimizer steps between exploit/explore decisions; 0: a quarter of run.steps, at least
    one report interval. Every report of a PBT trial carries a checkpoint."""
    pbt_synch: bool = False
    """PBT: decide only when every trial has reached the interval (reproducible; slow trials hold up
    fast ones) instead of as each trial arrives."""
    max_concurrent: int = 0
    """Trials at once; 0: as many as the cluster's resources fit."""
    gpus_per_trial: float = 0.0
    """GPU per trial worker (0.25: four trials share a GPU); 0: CPU workers."""
    workers_per_trial: int = 1
    """Ray Train workers per trial."""
    name: str = "ampray-tune"
    """Search name (a folder under the job's storage_path); the same name resumes with --resume."""
    skip_penalty: float = 1.0
    """Weight of the skipped-step rate in the objective."""
    seed: int = 0
    """Seed of the sampler."""

    def __post_init__(self) -> None:
        check_folder_name("search", "name", self.name)  # the same rule as run.name: one folder
        _check_seed("search", self.seed)
        _check_choice("search", "scheduler", self.scheduler, ("asha", "pbt", "fifo"))
        if self.perturbation_interval < 0:
            _fail("search", "perturbation_interval", self.perturbation_interval, "an integer >= 0")
        if self.samples < 1:
            _fail("search", "samples", self.samples, "an integer >= 1")
        if self.workers_per_trial < 1:
            _fail("search", "workers_per_trial", self.workers_per_trial, "an integer >= 1")
        if self.max_concurrent < 0 or self.gpus_per_trial < 0 or self.skip_penalty < 0:
            bad = next(n for n in ("max_concurrent", "gpus_per_trial", "skip_penalty") if getattr(self, n) < 0)
            _fail("search", bad, getattr(self, bad), "a number >= 0")
        if self.workers_per_trial > 1 and 0 < self.gpus_per_trial < 1:
            # Two ranks of one trial on one GPU: NCCL refuses them ("Duplicate GPU detected") inside the trial.
            raise ConfigError(f"search.gpus_per_trial={self.gpus_per_trial:g} is not allowed with "
                              f"search.workers_per_trial={self.workers_per_trial}: each worker of a trial gets that "
                              "share of a GPU, and two ranks cannot share one; expected a whole GPU per worker (>= 1; "
                              "0: CPU workers), or one worker per trial for fractions")


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> JobConfig:
    """The base job with dotted parameters set (validated as a whole)."""
    for dotted in params:
        _check_dotted(dotted)
    return apply(JobConfig.from_dict(base), params)


def _check_dotted(dotted: str) -> None:
    section = dotted.partition(".")[0]
    if section not in JobConfig.__dataclass_fields__ or "." not in dotted:
        raise ConfigError(f"{dotted!r} is not allowed: expected <section>.<field> with section in "
                          f"{list(JobConfig.__dataclass_fields__)}")


def trial_metrics(metrics: list[dict[str, Any]], skip_penalty: float) -> dict[str, Any]:
    """What Tune sees from one report of all ranks."""
    from ampray.actors.aggregator import aggregate, placement_label

    agg = aggregate(metrics)
    world = len(metrics)
    steps = max(int(m.get("perf/optimizer_steps", m["step"])) for m in metrics) or 1
    skipped = agg.get("perf/skipped_steps/total", 0.0)
    skip_rate = skipped / (steps * world)
    loss = agg.get("loss/mean", math.nan)
    val_loss = agg.get("val/loss/mean")
    # With a held-out set the search optimises how well a setting generalises, not how well it fits.
    objective = (loss if val_loss is None else val_loss) + skip_penalty * skip_rate
    return {
        "step": max(int(m["step"]) for m in metrics),
        # A diverged trial (a rank's loss NaN or infinite) ranks last instead of comparing as NaN, which
        # neither a scheduler's cut-off nor the best-trial pick would order.
        "objective": objective if math.isfinite(objective) else math.inf,
        "loss": loss,
        "val_loss": val_loss,
        "val_accuracy": agg.get("val/accuracy/mean"),
        "skip_rate": skip_rate,
        "overflow_rate": agg.get("perf/overflow_rate/mean", 0.0),
        "samples_per_s": agg.get("perf/samples_per_s/total", 0.0),
        "peak_memory_bytes": agg.get("memory/peak_allocated_bytes/max", 0.0),
        "world_size": world,
        # Where the trial's ranks ran, "node:gpu" per rank in rank order: shows how trials were spread.
        "placement": ";".join(placement_label(m) for m in metrics),
    }


def _tune_callback(skip_penalty: float, results, acks=None):
    import ray.train

    class TuneAggregateCallback(ray.train.UserCallback):
        """On the Train controller: every report of all ranks -> one aggregated result, put on the
        trial's queue (the trial function hands it to Tune). With `acks` (PBT), it waits until Tune has
        taken the result and copied its checkpoint: Train's own checkpoint rotation must not delete a
        checkpoint before Tune has its copy."""

        def __init__(self) -> None:
            self._queue, self._acks, self._penalty = results, acks, skip_penalty

        def after_report(self, run_context, metrics, checkpoint=None) -> None:
            result = trial_metrics(metrics, self._penalty)
            if checkpoint is not None:
                result["checkpoint_path"] = checkpoint.path
            self._queue.put(result)
            if self._acks is not None and checkpoint is not None:
                self._acks.get(timeout=_ACK_TIMEOUT_S)

    return TuneAggregateCallback()


_ACK_TIMEOUT_S = 600.0


def tune_trial(config: dict[str, Any]) -> None:
    """One trial: the base job with this trial's parameters, trained by Ray Train.

    The Train run goes on in a thread; its aggregated results come back through a queue and are reported
    to Tune from here. Under PBT each result with a checkpoint carries it as the trial's Tune checkpoint,
    and a trial that Tune starts from a checkpoint (PBT's exploit: another trial's state, with mutated
    settings; or a resumed search) runs a new Train run, `<trial>-g<n>`, initialised from it: the
    worker loads the state and applies the changed settings through the engine's setters. When Tune
    stops or pauses the trial, its actor exits and the Train run it owns goes with it.
    """
    import threading

    import ray.tune
    from ray.util.queue import Empty, Queue

    from ampray.orchestrator.train import build_trainer

    params = {k: v for k, v in config.items() if not k.startswith("__")}
    job = apply_params(config["__base__"], params)
    trial_dir = Path(config["__search_dir__"]) / "trials"
    trial = ray.tune.get_context().get_trial_name()
    job.run.storage_path = str(trial_dir)
    job.run.address = ""
    start = ray.tune.get_checkpoint()
    job.run.name = trial if start is None else _next_generation(trial_dir, trial)
    pbt = bool(config.get("__pbt__"))
    results = Queue(actor_options={"num_cpus": 0})
    acks = Queue(maxsize=1, actor_options={"num_cpus": 0}) if pbt else None
    trainer = build_trainer(job, config["__workers__"], config["__use_gpu__"],
                            callbacks=[_tune_callback(config["__skip_penalty__"], results, acks)],
                            init_checkpoint=start, runtime_env=config.get("__runtime_env__") or {},
                            cwd=config.get("__cwd__"))
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial function, so Tune records the error
            failure.append(err)

    thread = threading.Thread(target=fit, name="ampray-train-run", daemon=True)
    thread.start()
    try:
        while True:
            try:
                result = results.get(timeout=0.5)
            except Empty:
                if thread.is_alive() or not results.empty():
                    continue
                break
            path = result.pop("checkpoint_path", None)
            checkpoint = ray.tune.Checkpoint.from_directory(path) if path and pbt else None
            ray.tune.report(result, checkpoint=checkpoint)  # persists (copies) the checkpoint first
            if path and acks is not None:
                acks.put(True)
        thread.join()
    finally:
        for q in (results, acks):
            if q is not None:
                q.shutdown(force=True)
    if failure:
        raise failure[0]


def _generations(trial_dir: Path, trial: str) -> dict[int, Path]:
    """A trial's Train runs by generation: `<trial>` is 0, `<trial>-g<n>` (restarted from a Tune
    checkpoint) is n."""
    runs = {0: trial_dir / trial} if (trial_dir / trial).exists() else {}
    for run in trial_dir.glob(f"{trial}-g*"):
        n = run.name[len(trial) + 2:]
        if n.isdigit():
            runs[int(n)] = run
    return runs


def _next_generation(trial_dir: Path, trial: str) -> str:
    """A fresh Train run name for a trial restarted from a Tune checkpoint (its own runs keep their
    checkpoints, which Train would otherwise resume from instead)."""
    return f"{trial}-g{max(_generations(trial_dir, trial), default=0) + 1}"


def search_dir(job: JobConfig, search: SearchConfig) -> Path:
    return Path(job.run.storage_path).expanduser().resolve() / search.name


def results_table(result_grid, params: list[str], budget: int, trials_dir: Path | None = None,
                  skip_penalty: float = 0.0) -> list[dict[str, Any]]:
    """One plain row per trial, from Tune's results.

    With `trials_dir` (PBT searches, whose scheduler never stops a trial early), a trial short of the
    budget whose latest Train run reached it counts as completed with that run's final figures,
    aggregated from the per-rank reports saved with its final checkpoint: with synchronous PBT, Tune was
    seen to pause a restarted trial one report before its end and terminate it with that earlier result,
    while its Train run finished. Not for ASHA: a trial it stopped may have run on to the end before
    its actor went, and stays stopped_early."""
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        config = result.config or {}
        row: dict[str, Any] = {"trial": Path(result.path).name if result.path else ""}
        row.update({p: config.get(p) for p in params})
        row.update({c: metrics.get(c) for c in RESULT_COLUMNS})
        step = metrics.get("step") or 0
        if result.error is None and step < budget and trials_dir is not None:
            final = final_from_checkpoint(trials_dir, row["trial"], budget, skip_penalty)
            if final is not None:
                row.update({c: final.get(c) for c in RESULT_COLUMNS})
                step = final["step"]
        row["status"] = ("error" if result.error is not None else
                         "completed" if step >= budget else "stopped_early")
        if result.error is not None:
            row["error"] = failure_reason(result.error)
        rows.append(row)
    return rows


def failure_reason(err: BaseException, limit: int = 300) -> str:
    """A failure in one line, `Type: message`, of the exception a user can act on: a worker's own (its
    rank first) rather than the Ray errors wrapped around it; the whole traceback stays in Ray's logs."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        if failures:
            rank, inner = min(failures.items())
            more = f" (and {len(failures) - 1} other rank(s))" if len(failures) > 1 else ""
            return f"rank {rank}: {failure_reason(inner, limit)}{more}"[:limit]
        inner = getattr(err, "cause", None) or err.__cause__
        if not isinstance(inner, BaseException):
            break
        err = inner
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def final_from_checkpoint(trials_dir: Path, trial: str, budget: int, skip_penalty: float) -> dict[str, Any] | None:
    """The aggregated final result of a trial's latest Train run (`<trial>` or `<trial>-g<n>`, the one
    with the trial's current settings), from the reports each rank saved with its checkpoint at the
    budget; None when that run did not reach the budget."""
    import json

    runs = _generations(trials_dir, trial) if trial else {}
    if not runs:
        return None
    latest = runs[max(runs)]
    reports = sorted((latest / f"checkpoint_{budget:06d}").glob("report_rank*.json"),
                     key=lambda p: int(p.stem.removeprefix("report_rank")))  # rank order, also past 9
    if not reports:
        return None
    return trial_metrics([json.loads(r.read_text()) for r in reports], skip_penalty)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The lowest objective among trials that used their whole step budget (else among all)."""
    done = [r for r in rows if r["status"] == "completed" and r.get("objective") is not None]
    pool = done or [r for r in rows if r.get("objective") is not None]
    return min(pool, key=lambda r: r["objective"]) if pool else None


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for r in rows for k in r})
    table = pa.table({c: [_cell(r.get(c)) for r in rows] for c in columns})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


TRIAL_CPU = 0.01
"""The CPU each trial's own function reserves (it only drives its Train run; Tune refuses an empty request)."""


def _plan(job: JobConfig, search: SearchConfig, resources: dict[str, float]) -> tuple[JobConfig, int]:
    """The job as each trial runs it (scaling from the search) and how many trials fit at once."""
    use_gpu = search.gpus_per_trial > 0
    job = apply_params(job.to_dict(), {"scaling.num_workers": search.workers_per_trial,
                                       "scaling.use_gpu": "true" if use_gpu else "false",
                                       "scaling.gpus_per_worker": search.gpus_per_trial or 1.0})
    need_cpu = search.workers_per_trial * job.scaling.cpus_per_worker
    need_gpu = search.workers_per_trial * search.gpus_per_trial
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if need_cpu <= cpus + 1e-9 < need_cpu + TRIAL_CPU and job.scaling.cpus_per_worker > TRIAL_CPU:
        # The workers fill the cluster's CPUs (2 on a 2-CPU machine, as `ampray train` may run them): each
        # gives up the trial's own sliver of its logical CPU (the same cores, the same speed), so that any
        # node holding a worker has room for the trial too.
        per_worker = round(job.scaling.cpus_per_worker - TRIAL_CPU, 6)
        job = apply_params(job.to_dict(), {"scaling.cpus_per_worker": per_worker})
        need_cpu = search.workers_per_trial * per_worker
    need_cpu += TRIAL_CPU
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        from ampray.orchestrator.train import ResourceError

        raise ResourceError(f"one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs "
                            f"(search.workers_per_trial={search.workers_per_trial}, gpus_per_trial="
                            f"{search.gpus_per_trial}); the cluster has {cpus:g} CPUs and {gpus:g} GPUs")
    fit = int(cpus / need_cpu + 1e-9)
    if need_gpu:
        fit = min(fit, int(gpus // need_gpu + 1e-9))
    return job, max(1, min(search.max_concurrent or fit, fit))


def _scheduler(search: SearchConfig, job: JobConfig, space=None):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if search.scheduler == "asha":
        # Rungs at whole report intervals: a trial is judged on reported losses only.
        return ASHAScheduler(time_attr="step", max_t=job.run.steps, grace_period=job.run.report_every,
                             reduction_factor=2)
    if search.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="step", perturbation_interval=pbt_interval(search, job),
                                       hyperparam_mutations=live_mutations(space),
                                       custom_explore_fn=space.clip, quantile_fraction=0.25,
                                       synch=search.pbt_synch)
    return FIFOScheduler()


def pbt_interval(search: SearchConfig, job: JobConfig) -> int:
    every = job.run.report_every
    interval = search.perturbation_interval or max(every, job.run.steps // 4)
    return max(every, interval // every * every)  # decisions fall on reports, which carry checkpoints


def live_mutations(space) -> dict[str, Any]:
    """PBT's hyperparam_mutations: the space's parameters that a live run can change (scaler settings,
    adaptation thresholds). Others (dtype, init_scale) are drawn once and travel with the cloned state."""
    from ampray.amp import settings

    mutations = {p: m for p, m in space.mutations().items() if p.startswith("precision.") and settings.is_live(p)}
    if not mutations:
        raise ConfigError(f"search.scheduler=pbt needs parameters a live run can change (precision.* of "
                          f"{settings.described()}); the space {space.source!r} has only {sorted(space.params)}")
    return mutations


def run_search(job: JobConfig, search: SearchConfig, resume: bool = False, given: set[str] | None = None,
               notify=None) -> dict[str, Any]:
    """Validate the space, run (or resume) the search, write results.parquet and best.toml. `given`: the
    job fields the user set (`ampray.job.given_fields`): the CLI's precision default for CPU trials
    applies to the others; `notify` gets notes (the precision chosen, settings that do nothing).
    The outcome's `interrupted` is True when the search was stopped (Ctrl-C) before every trial ended."""
    import ray
    import ray.tune

    from ampray.job import absolute_paths
    from ampray.orchestrator.preflight import check_batch_fits, check_model_and_data, streaming_mode
    from ampray.orchestrator.shipping import probe_imports, worker_runtime_env
    from ampray.orchestrator.train import init_ray, node_memory, resolved, streams_fit, user_code
    from ampray.tune_spaces import load_space

    from ampray.job import choose_compile, choose_precision, precision_notes
    from ampray.orchestrator.preflight import check_storage
    from ampray.orchestrator.train import local_gpus_bf16

    folder = search_dir(job, search)
    if resume:
        # The search goes on as it began (job, space, scheduler), whatever else this command line says.
        asked = search
        job, search, space = load_plan(folder, search.name, job.run.address)
        for line in ignored_on_resume(asked, search):
            (notify or print)(line)
    else:
        check_new_search(folder, search.name)
        if given is not None and "scaling.num_workers" in given and job.scaling.num_workers not in (
                -1, search.workers_per_trial):
            raise ConfigError(f"scaling.num_workers={job.scaling.num_workers} is not used by ampray tune: every trial "
                              f"runs --workers-per-trial={search.workers_per_trial} worker(s); expected "
                              f"--workers-per-trial {job.scaling.num_workers} instead of scaling.num_workers")
    # Into storage_path itself: the search's folder is made only once everything is checked.
    check_storage(folder.parent, "run.storage_path", job.run.storage_path, what="storage folder")
    job = absolute_paths(job)
    if job.data.fill_gpu:
        raise ConfigError("data.fill_gpu=True is not allowed with ampray tune: trials share GPUs, so no trial's "
                          "probe would see a whole one; expected false, with data.batch_size set (or searched)")
    if job.scaling.bind_cpus:
        raise ConfigError("scaling.bind_cpus=True is not allowed with ampray tune: trials packed on one node "
                          "would be bound to the same cores; expected false")
    base_dict = job.to_dict()
    if not resume:
        space = load_space(search.space, validate=lambda overrides: apply_params(base_dict, overrides))
        if given is not None:  # every trial runs on the workers of one kind: GPUs when gpus_per_trial > 0
            on_gpu, fields = search.gpus_per_trial > 0, given | set(space.params) | set(space.fixed)
            job, note = choose_precision(job, on_gpu, fields,
                                         gpu_bf16=local_gpus_bf16() if on_gpu and not job.run.address else None)
            job, compiled = choose_compile(job, on_gpu, fields)
            base_dict = job.to_dict()
            for line in [n for n in (note, compiled) if n] + precision_notes(job):
                (notify or print)(line)
    # The user's code and data as the trials will see them (a space may fix data.path), before Ray starts.
    plan = check_model_and_data(absolute_paths(apply_params(base_dict, space.fixed)))
    for line in plan.notes:  # e.g. classes the default FSDP blocks leave to the root for tied weights
        (notify or print)(line)
    code = user_code(job)
    runtime_env = worker_runtime_env(code) if code else {}
    # Ray Train V2 releases a stopped trial's workers through a cleaner that asks the state API (served
    # by the dashboard) whether the trial's controller is gone: without it, ASHA's stops leak resources.
    if init_ray(job.run.address, dashboard=True, runtime_env=runtime_env):
        runtime_env = {}  # the job's own: trials and their workers inherit it
    if code:
        probe_imports(code, runtime_env)
    if search.scheduler == "pbt":
        live_mutations(space)  # fails fast when nothing in the space can mutate
        # PBT clones state at reports: every report carries a checkpoint.
        base_dict = apply_params(base_dict, {"run.checkpoint_every": job.run.report_every,
                                             "run.num_to_keep": max(2, job.run.num_to_keep)}).to_dict()
    trial_job, concurrent = _plan(apply_params(base_dict, space.fixed), search, ray.cluster_resources())
    trial_job = absolute_paths(trial_job)  # a data.path the space fixes, too
    check_batch_fits(trial_job, plan.rows, search.workers_per_trial)  # before any trial starts
    # Every worker of every trial running at once holds the rows when they are loaded into memory.
    streaming = streaming_mode(trial_job, plan, node_memory(), search.workers_per_trial * concurrent)
    if trial_job.data.val_path or trial_job.data.val_fraction:
        # Every report carries an evaluation: the schedulers compare held-out losses only, never a training
        # loss of one trial against a held-out loss of another.
        trial_job.run.eval_every = 0
    trial_job = resolved(trial_job, search.workers_per_trial, search.gpus_per_trial > 0, streaming, plan)
    # Streaming trials leave a CPU free for Ray Data's reads (fewer of them run at once where none would be).
    concurrent = streams_fit(trial_job, search.workers_per_trial, ray.cluster_resources().get("CPU", 0.0),
                             concurrent, TRIAL_CPU)
    if search.scheduler == "pbt" and search.samples > concurrent:
        # PBT exploits among trials that run side by side; later waves could only clone each other.
        raise ConfigError(f"search.samples={search.samples} is not allowed with scheduler=pbt here: the whole "
                          f"population runs at once and only {concurrent} trial(s) fit the cluster "
                          f"(max_concurrent / resources); expected samples <= {concurrent}")
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_plan(folder, job, search, space)
    # The trial function only drives its Train run, whose workers reserve their own CPUs/GPUs; Tune
    # refuses an empty request, so the driver asks for a sliver of a CPU.
    trainable = ray.tune.with_resources(tune_trial, {"cpu": TRIAL_CPU})
    if resume:
        tuner = ray.tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
    else:
        param_space = {**space.to_tune(), "__base__": trial_job.to_dict(), "__search_dir__": str(folder),
                       "__workers__": search.workers_per_trial, "__use_gpu__": search.gpus_per_trial > 0,
                       "__skip_penalty__": search.skip_penalty, "__pbt__": search.scheduler == "pbt",
                       "__runtime_env__": runtime_env, "__cwd__": os.getcwd()}
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(metric="objective", mode="min", num_samples=search.samples,
                                            scheduler=_scheduler(search, job, space),
                                            search_alg=_searcher(search, concurrent), trial_name_creator=_trial_name,
                                            trial_dirname_creator=_trial_name),
            # Stopping at the budget keeps a trial's last report out of the scheduler: PBT would otherwise
            # "exploit" a finished trial and restart it only to report its end again.
            run_config=ray.tune.RunConfig(name=search.name, storage_path=str(folder.parent), verbose=0,
                                          stop={"step": job.run.steps},
                                          # PBT's copies of Train checkpoints (Tune warns that keeping 2 or fewer can break exploits).
                                          checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=4)))
    grid, interrupted = _fit(tuner)
    rows = results_table(grid, list(space.params), job.run.steps,
                         folder / "trials" if search.scheduler == "pbt" else None, search.skip_penalty)
    write_parquet(rows, folder / "results.parquet")
    best = best_row(rows)
    if best is not None:
        best_job = apply_params(trial_job.to_dict(), {p: best[p] for p in space.params})
        best_job.run.name = f"{search.name}-best"
        (folder / "best.toml").write_text(best_job.to_toml())
    return {"folder": folder, "rows": rows, "best": best, "params": list(space.params),
            "interrupted": interrupted, "storage_path": job.run.storage_path}


def check_new_search(folder: Path, name: str) -> None:
    """A new search must not run into the folder of an earlier one: its trials, results and best.toml would
    mix with the new search's. Raises ConfigError saying how to continue that one or start another."""
    if folder.is_dir() and any((folder / part).exists() for part in (PLAN_FILE, "tuner.pkl", "trials",
                                                                     "results.parquet")):
        raise ConfigError(f"search {name!r} already exists in {folder}: `ampray tune --resume {name}` continues it "
                          "(if it was interrupted), or give this search a new --name")


class _TuneLog:
    """Hides Tune's own "Resume experiment with: Tuner.restore(...)" line (the CLI says `ampray tune
    --resume`), and notes that Tune caught an interrupt: its SIGINT handler only logs it ("Stop signal
    received") and ends the run, and the trials it stops on the way out are marked terminated like
    finished ones, so their states cannot tell."""

    def __init__(self) -> None:
        self.interrupted = False

    def filter(self, record) -> bool:
        message = record.getMessage()
        if "Stop signal received" in message or "has been interrupted" in message:
            self.interrupted = True
        return "Tuner.restore(" not in message


def _fit(tuner):
    """`tuner.fit()`, and whether Tune was interrupted (Ctrl-C) before the search ended."""
    import logging

    watch, tune_log = _TuneLog(), logging.getLogger("ray.tune.tune")
    tune_log.addFilter(watch)
    try:
        grid = tuner.fit()
    finally:
        tune_log.removeFilter(watch)
    return grid, watch.interrupted or _interrupted(grid)


def _interrupted(grid) -> bool:
    """Whether Tune stopped before every trial ended: on Ctrl-C it saves its state and returns the results
    so far instead of raising, with some trials still pending, running or paused."""
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = getattr(analysis, "trials", None) or []
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


PLAN_FILE = "search.json"


def save_plan(folder: Path, job: JobConfig, search: SearchConfig, space) -> None:
    """What `--resume` needs to go on exactly as the search began."""
    import dataclasses
    import json

    plan = {"job": job.to_dict(), "search": dataclasses.asdict(search), "space": space.to_dict(),
            "space_source": space.source}
    tmp = folder / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(plan, indent=2))
    tmp.replace(folder / PLAN_FILE)


def ignored_on_resume(asked: SearchConfig, saved: SearchConfig) -> list[str]:
    """A note for each search setting given to a resume (not its default) that differs from the one the
    search began with: a resumed search goes on as it began, so the new value is not used."""
    import dataclasses

    default = SearchConfig()
    return [f"search.{f.name}={getattr(asked, f.name)!r} is not used: the resumed search {saved.name!r} goes on as it "
            f"began, with {getattr(saved, f.name)!r} (start a new search, under another name, for other settings)"
            for f in dataclasses.fields(SearchConfig)
            if f.name != "name" and getattr(asked, f.name) != getattr(default, f.name)
            and getattr(asked, f.name) != getattr(saved, f.name)]


def load_plan(folder: Path, name: str, address: str):
    import json

    from ampray.tune_spaces import Space

    path = folder / PLAN_FILE
    if not path.is_file() or not (folder / "tuner.pkl").is_file():
        raise ConfigError(f"--resume {name}: no search to resume in {folder}")
    plan = json.loads(path.read_text())
    job = JobConfig.from_dict(plan["job"])
    job.run.address = address
    space = Space(params=plan["space"]["params"], fixed=plan["space"]["fixed"], source=plan["space_source"])
    return job, SearchConfig(**plan["search"]), space


def _trial_name(trial) -> str:
    """Short and the same for Tune's trial folder and the trial's Train run."""
    return f"trial_{trial.trial_id}"


def _searcher(search: SearchConfig, concurrent: int):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # The limit goes to the generator itself: Tune ignores max_concurrent_trials for a generator.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrent)


__all__ = ["ConfigError", "SearchConfig", "apply_params", "best_row", "results_table", "trial_metrics",
           "tune_trial", "write_parquet"]
