"""The `ampray` command line: train, tune, bench, recommend, ui, data synth, demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _load_job(args: argparse.Namespace, extra: list[str], **flags: str | None):
    """The job from --config and dotted overrides (named flags, run.address=..., win when given) and the
    dotted fields the user set."""
    from ampray.job import ConfigError, JobConfig, given_fields, parse_overrides

    overrides = parse_overrides(extra)
    for key, value in flags.items():
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            flag = {"run.address": "--address", "run.name": "--name", "model.kind": "--model"}.get(key, key)
            raise ConfigError(f"{flag} {value!r} and --{key} {overrides[key]!r} disagree; give one of them")
        overrides[key] = value
    job = JobConfig.load(args.config, overrides)
    return job, given_fields(args.config, overrides)


def _precision_chooser(given: set[str], note):
    """The CLI's defaults for the workers found (ampray.job.choose_precision and choose_compile): a rerun
    keeps the dtype its run was trained with; on this machine's own GPUs bf16 where they have it."""
    from ampray.job import choose_compile, choose_precision, precision_notes
    from ampray.orchestrator.train import local_gpus_bf16

    def choose(job, use_gpu: bool):
        trained = None
        try:
            import tomllib

            trained = tomllib.loads((job.run_dir() / "job.toml").read_text())["precision"]["dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a new run (or an unreadable job.toml, which the resume check reports)
        gpu_bf16 = local_gpus_bf16() if use_gpu and not job.run.address else None  # a cluster's: unknown here
        job, chosen = choose_precision(job, use_gpu, given, trained, gpu_bf16)
        job, compiled = choose_compile(job, use_gpu, given)
        if use_gpu and not given & {"data.batch_size", "data.fill_gpu"} and job.scaling.strategy != "fsdp":
            job = dataclasses.replace(job, data=dataclasses.replace(job.data, fill_gpu=True))  # run_training probes
        for line in [n for n in (chosen, compiled) if n] + precision_notes(job):
            note(line)
        return job

    return choose


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from ampray.job import ConfigError

    console = _console()
    job = None
    try:
        job, given = _load_job(args, extra, **{"run.address": args.address, "run.name": args.name,
                                               "model.kind": args.model})
        from ampray.orchestrator.train import run_training

        def notify(note: str) -> None:
            console.print(f"[yellow]note:[/yellow] {note}")

        with _Progress(job, console):
            outcome = run_training(job, notify=notify, choose_precision=_precision_chooser(given, notify))
    except ConfigError as err:
        print(f"ampray train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" Checkpoints written so far are kept in {job.run_dir()}." if job is not None else ""
        print(f"ampray train: interrupted.{where} Rerun the same command to resume from the latest one (from "
              "step 0 if none was written).", file=sys.stderr)
        return 130
    except Exception as err:
        from ray.train import TrainingFailedError

        if not isinstance(err, TrainingFailedError):
            raise
        print(f"ampray train: the run failed: {_failure_summary(err)}\n{_after_failure(job.run_dir())}", file=sys.stderr)
        full = _disk_full(err, job.run_dir())
        if full:
            print(full, file=sys.stderr)
        if _diverged(err):
            print("The run diverged (the engine's FloatingPointError above): a rerun replays the same steps. "
                  'run.on_divergence = "rollback" rolls back to the last checkpoint, eases the precision and '
                  "skips those batches; see the README's engine policies.", file=sys.stderr)
        return 1
    console.print(final_table(outcome))
    console.print(f"View it: [bold]tensorboard --logdir {outcome.logdir}[/bold]")
    return 0


def _after_failure(run_dir) -> str:
    """What a rerun would do: resume from the run's latest checkpoint, or, with none written, start over (the
    same error again, if it came from the model, the loss or the data rather than a crashed machine)."""
    from ampray.orchestrator.checkpoints import latest_checkpoint

    try:
        latest = latest_checkpoint(run_dir)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint list: the rerun reports it
        latest = None
    if latest is None:
        return (f"No checkpoint was written ({run_dir}): a rerun starts at step 0, so fix the cause above first "
                "if it is in the model, the loss or the data.")
    return (f"Its checkpoints are kept in {run_dir}: rerun the same command to resume from the latest "
            f"({latest.name}; run.max_failures restarts crashed workers by itself).")


def _diverged(err: Exception) -> bool:
    """Whether a worker failed on the engine's divergence errors (FloatingPointError and its kinds)."""
    failures = getattr(err, "worker_failures", None) or {}
    return any(isinstance(getattr(e, "cause", None) or e, FloatingPointError) for e in failures.values())


def _disk_full(err: BaseException, run_dir) -> str:
    """What to do when the run failed on a full file system (ENOSPC anywhere in the failure), or ""."""
    import errno
    import shutil

    seen, todo = set(), [err]
    failures = getattr(err, "worker_failures", None) or {}
    todo += list(failures.values())
    found = False
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            found = True
            break
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    if not found:
        return ""
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:,.0f} MiB free there now"
    except OSError:
        free = "its free space cannot be read"
    return (f"A file system the run writes to is full (No space left on device): the run folder {run_dir} "
            f"({free}) or a worker's temporary folder. Free space there, then rerun the same command: it "
            "resumes from the last complete checkpoint (a checkpoint the full disk cut short was removed).")


def _failure_summary(err: Exception) -> str:
    """One line per failed rank (its exception's last line) instead of Ray's nested tracebacks; the whole
    traceback is in the worker's log under /tmp/ray/session_latest/logs."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        lines, hints = [], []
        for rank, exc in sorted(failures.items()):
            cause = getattr(exc, "cause", None) or exc  # Ray wraps a worker's own exception
            lines.append(f"rank {rank}: {type(cause).__name__}: {_headline(str(cause))}")
            hints += [hint for needle, hint in _HINTS if needle in str(cause) and hint not in hints]
        return "\n  " + "\n  ".join(lines + hints)
    return _headline(str(err)) or type(err).__name__


# Worker errors whose cause is a setting: (text in the error, what to tell the user).
_HINTS = (("Expected to have finished reduction in the prior iteration",
           'hint: some parameters got no gradient in a step (a branch only some batches take): set '
           'scaling.find_unused_parameters = "true" (DDP then looks for them in every step)'),
          ("Error(s) in loading state_dict",
           "hint: the model no longer matches the checkpoint the run resumes from (its code or options changed): "
           "a rerun fails the same way; start a new run with --name NEW, or restore the model's code"))


def _headline(text: str) -> str:
    """What an error says went wrong, on one line: a traceback's last line (the exception), else the
    message's first line (where torch puts the cause; its advice follows) and, for a longer message, its
    last; each cut at 300 characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    cut = lambda line: line if len(line) <= 300 else line[:300] + " ..."  # noqa: E731
    if not lines:
        return ""
    if len(lines) == 1 or any(line.startswith("Traceback (most recent call last)") for line in lines):
        return cut(lines[-1])
    return f"{cut(lines[0])} ... {cut(lines[-1])}"


def _console():
    """Rich's console; into a file or pipe (a log, CI) 160 columns instead of 80 unless COLUMNS says, so
    that the tables' columns are not cut to a few letters there."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)


class _Progress:
    """A progress bar fed by rank 0's progress file while `fit()` blocks the main thread."""

    def __init__(self, job, console):
        self.job, self.console = job, console
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        import json

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # The aggregator's file is on this node whatever the cluster; rank 0's only if rank 0 runs here.
        paths = [self.job.run_dir() / "progress" / name for name in ("all.json", "rank0.json")]
        total = self.job.run.steps
        began = time.time() - 1.0  # an earlier attempt's files say nothing of this one
        with Progress(TextColumn(f"[bold]{self.job.run.name}[/bold] {self.job.model.kind}"), BarColumn(),
                      TextColumn("step {task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            task = progress.add_task("train", total=total)
            shown = None
            while True:
                stopping = self._stop.wait(0.5)
                steps = []
                for path in paths:
                    try:
                        if path.stat().st_mtime >= began:
                            steps.append(json.loads(path.read_text())["step"])
                    except (OSError, ValueError, KeyError):
                        pass
                if steps:
                    progress.update(task, completed=max(steps))
                    if not self.console.is_terminal and max(steps) != shown:
                        # Into a log or pipe the bar is not drawn: one line per reported step instead.
                        shown = max(steps)
                        self.console.print(f"{self.job.run.name}: step {shown}/{total}")
                if stopping:  # one last look after the run ended: its final step is shown too
                    return


def final_table(outcome) -> Any:
    from rich.table import Table

    from ampray.actors.aggregator import placement_label

    table = Table(title=f"ampray train: {outcome.num_workers} worker(s), "
                        f"{'GPU' if outcome.use_gpu else 'CPU'}, {outcome.run_dir}")
    val = any("val/loss" in rec for rec in outcome.final.values())
    acc = any("val/accuracy" in rec for rec in outcome.final.values())
    tokens = any("perf/interval_tokens_per_s" in rec for rec in outcome.final.values())
    mfu = any("perf/mfu" in rec for rec in outcome.final.values())
    rollbacks = any(rec.get("events/rollback", 0) for rec in outcome.final.values())
    cols = ["rank", "step", "loss", *(["val loss"] if val else []), *(["val acc"] if acc else []), "samples/s",
            *(["tokens/s"] if tokens else []), *(["MFU %"] if mfu else []), "scale", "skipped", "overflows",
            *(["rollbacks"] if rollbacks else []), "peak memory MiB", "node:gpu"]
    for col in cols:
        table.add_column(col, justify="right")
    nan = float("nan")
    for rank, rec in sorted(outcome.final.items()):
        peak = max(rec.get("memory/peak_allocated_bytes", 0), 0) / 2**20
        held_out = ([f"{rec.get('val/loss', nan):.4f}"] if val else []) + (
            [f"{rec.get('val/accuracy', nan):.4f}"] if acc else [])
        # The last report interval's throughput (steady state, no start-up or compilation in it).
        speed = ([f"{rec.get('perf/interval_tokens_per_s', nan):,.0f}"] if tokens else []) + (
            [f"{100 * rec.get('perf/mfu', nan):.1f}"] if mfu else [])
        table.add_row(str(rank), f"{rec.get('step', 0):.0f}", f"{rec.get('loss', nan):.4f}", *held_out,
                      f"{rec.get('perf/samples_per_s', 0):.0f}", *speed, f"{rec.get('scaler/scale', 0):g}",
                      f"{rec.get('perf/skipped_steps', 0):.0f}", f"{rec.get('scaler/overflows', 0):.0f}",
                      *([f"{rec.get('events/rollback', 0):.0f}"] if rollbacks else []),
                      f"{peak:.1f}", placement_label(rec))
    if tokens or mfu:
        total = sum(rec.get("perf/interval_tokens_per_s", 0) for rec in outcome.final.values())
        mean_mfu = [rec["perf/mfu"] for rec in outcome.final.values() if "perf/mfu" in rec]
        table.caption = "across ranks (last report interval): " + ", ".join(
            ([f"{total:,.0f} tokens/s"] if tokens else [])
            + ([f"MFU {100 * sum(mean_mfu) / len(mean_mfu):.1f}% (mean)"] if mean_mfu else []))
    if val:
        table.caption = (table.caption + "; " if table.caption else "") + "held-out over all ranks: " + ", ".join(
            f"{name} {outcome.aggregate[key]:.4f}" for name, key in (("val loss", "val/loss/mean"),
                                                                     ("val accuracy", "val/accuracy/mean"))
            if key in getattr(outcome, "aggregate", {}))
    return table


def _tune(args: argparse.Namespace, extra: list[str]) -> int:
    from ampray.job import ConfigError

    console = _console()
    search = None
    try:
        if args.resume is not None:
            _refuse_job_changes_on_resume(args.resume, extra)
        job, given = _load_job(args, extra, **{"run.address": args.address})
        from ampray.orchestrator.search import SearchConfig, run_search

        search = SearchConfig(space=args.space, samples=args.samples, scheduler=args.scheduler,
                              max_concurrent=args.max_concurrent, gpus_per_trial=args.gpus_per_trial,
                              workers_per_trial=args.workers_per_trial,
                              name=args.name if args.resume is None else args.resume,
                              skip_penalty=args.skip_penalty, seed=args.seed,
                              perturbation_interval=args.perturbation_interval, pbt_synch=args.pbt_synch)
        outcome = run_search(job, search, resume=args.resume is not None, given=given,
                             notify=lambda note: console.print(f"[yellow]note:[/yellow] {_flags(note)}"))
    except ConfigError as err:
        # SearchConfig's fields are the command's flags: search.seed=-1 reads --seed=-1.
        print(f"ampray tune: error: {_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the trials started, or a second Ctrl-C while Tune saved its state
        started = search is not None and (Path(job.run.storage_path).expanduser() / search.name / "tuner.pkl").is_file()
        print("ampray tune: interrupted." + (f" Continue the search with: {_resume_command(search.name, job, args)}"
                                             if started else ""), file=sys.stderr)
        return 130
    rows = outcome["rows"]
    console.print(search_table(outcome, args.top))
    folder = outcome["folder"]
    failed = [r for r in rows if r["status"] == "error"]
    if failed:
        print(f"ampray tune: {len(failed)} of {len(rows)} trial(s) failed:\n  " + _trial_failures(failed),
              file=sys.stderr)
    if outcome.get("interrupted"):
        print(f"ampray tune: interrupted; the search's state is saved in {folder}. Continue it with: "
              f"{_resume_command(outcome['folder'].name, job, args, outcome.get('storage_path'))}", file=sys.stderr)
        return 130
    if rows and len(failed) == len(rows):
        print("ampray tune: no trial ran to a result, so there is no best configuration. The whole tracebacks "
              f"are in {folder / 'trials'} and Ray's logs (/tmp/ray/session_latest/logs).", file=sys.stderr)
        return 1
    console.print(f"Results: {folder / 'results.parquet'}")
    if outcome["best"] is not None:
        console.print(f"Best configuration: [bold]ampray train --config {folder / 'best.toml'}[/bold]")
    console.print(f"View it: [bold]tensorboard --logdir {folder / 'trials'}[/bold]")
    return 0


def _trial_failures(failed: list[dict[str, Any]]) -> str:
    """One line per distinct reason (the first error of each trial), with the trials that gave it."""
    by_reason: dict[str, list[str]] = {}
    for row in failed:
        by_reason.setdefault(row.get("error") or "unknown error", []).append(str(row["trial"]))
    return "\n  ".join(f"{', '.join(trials[:4])}{f' and {len(trials) - 4} more' if len(trials) > 4 else ''}: "
                       f"{reason}" for reason, trials in by_reason.items())


def _refuse_job_changes_on_resume(name: str, extra: list[str]) -> None:
    """A resumed search goes on with the job it began with: job fields given with --resume (other than
    where the search is, run.storage_path and run.address) would not be used, so they are refused."""
    from ampray.job import ConfigError, parse_overrides

    changed = sorted(set(parse_overrides(extra)) - {"run.storage_path", "run.address"})
    if changed:
        raise ConfigError(f"--resume {name} goes on with the job the search began with, so "
                          f"{', '.join('--' + k for k in changed)} would not be used; expected only "
                          "--run.storage_path and --address with --resume (start a new search, with another "
                          "--name, for another job)")


def _flags(text: str) -> str:
    """SearchConfig's fields are `ampray tune`'s flags: search.seed=-1 reads --seed=-1."""
    return re.sub(r"(^|\bwith )search\.(\w+)=", lambda m: f"{m.group(1)}--{m.group(2).replace('_', '-')}=", text)


def _resume_command(name: str, job, args: argparse.Namespace, storage_path: str | None = None) -> str:
    """`ampray tune --resume NAME`, with the storage path and address that find the search again."""
    import shlex

    from ampray.job import RunSection

    parts = ["ampray", "tune", "--resume", name]
    storage = storage_path or job.run.storage_path
    if storage != RunSection.storage_path:
        parts += ["--run.storage_path", storage]
    if args.address:
        parts += ["--address", args.address]
    return shlex.join(parts)


def search_table(outcome: dict[str, Any], top: int) -> Any:
    from rich.table import Table

    rows = sorted((r for r in outcome["rows"] if r.get("objective") is not None), key=lambda r: r["objective"])
    table = Table(title=f"ampray tune: {len(outcome['rows'])} trials, top {min(top, len(rows))}")
    cols = ["trial", "status", "objective", "loss", "skip_rate", "samples_per_s", *outcome["params"]]
    shown = rows[:top]
    for col in cols:
        # A trial id is its folder's name under trials/: never cut (trial_30d4e_0... names no one trial).
        wide = max([len(str(r.get(col))) for r in shown] + [5]) if col == "trial" else None
        table.add_column(col.removeprefix("precision."), justify="right", no_wrap=col == "trial", min_width=wide)
    for r in shown:
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols])
    return table


def _data(args: argparse.Namespace, extra: list[str]) -> int:
    from ampray.data.parquet import synth_main

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    try:
        summary = synth_main(Path(args.out), kinds=kinds, num_samples=args.num_samples, seed=args.seed,
                             num_shards=args.shards)
    except ValueError as err:
        print(f"ampray data synth: error: {err}", file=sys.stderr)
        return 2
    for kind, info in summary["kinds"].items():
        print(f"{kind}: {info['rows']} rows of shape {info['input_shape']} in {info['shards']} shard(s), "
              f"{info['bytes'] / 2**20:.1f} MiB -> train on it with --model.kind {kind} --data.path {info['path']}")
    return 0


def _demo(args: argparse.Namespace, extra: list[str]) -> int:
    from ampray.orchestrator.local import LocalRunConfig, run_local

    try:
        run = LocalRunConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             dtype=args.dtype, adaptive=not args.no_adaptive, seed=args.seed, device=args.device)
    except ValueError as err:
        print(f"ampray demo: {err}", file=sys.stderr)
        return 2
    run_local(run)
    return 0


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    from ampray.amp.config import ConfigError
    from ampray.orchestrator.interface import benchmark_mixed_precision_interface

    try:
        precisions = args.precisions.split(",") if args.precisions else None
        result = benchmark_mixed_precision_interface(args.model, args.batch_size, num_iterations=args.iterations,
                                                     warmup=args.warmup, size=args.size, device=args.device,
                                                     precisions=precisions, compile=args.compile)
    except (ConfigError, ValueError) as err:
        print(f"ampray bench: error: {err}", file=sys.stderr)
        return 2
    _console().print(bench_table(result))
    if args.out:
        from ampray.orchestrator.search import write_parquet

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_parquet([{**r, "device": result["device"], "compiled": result["compiled"]} for r in result["rows"]],
                      Path(args.out))
        print(f"Wrote {args.out}")
    return 0


def bench_table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"ampray bench: {result['model']} ({result['size']}), batch {result['batch_size']}, "
                        f"{result['device']}" + (", torch.compile" if result.get("compiled") else ""))
    for col in ("precision", "median ms", "samples/s", "TFLOP/s", "MFU %", "speedup %", "peak MiB",
                "memory saving %"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        tflops, mfu = r.get("tflops_per_s"), r.get("mfu")
        table.add_row(r["precision"] + (" *" if r["best"] else ""), f"{r['median_ms']:.3f}", f"{r['samples_per_s']:.1f}",
                      "-" if tflops is None else f"{tflops:.2f}", "-" if mfu is None else f"{100 * mfu:.1f}",
                      f"{r['speedup_percent']:+.1f}", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}",
                      "-" if r["memory_savings_percent"] is None else f"{r['memory_savings_percent']:+.1f}")
    table.caption = "MFU: achieved training flops over the device's dense peak for the row's precision"
    return table


def _recommend(args: argparse.Namespace, extra: list[str]) -> int:
    from rich.table import Table

    from ampray.orchestrator.interface import recommendation_view

    view = recommendation_view(device=args.device)
    console = _console()
    table = Table(title="Detected hardware")
    table.add_column("property")
    table.add_column("value")
    for row in view["hardware"]:
        table.add_row(row["property"], row["value"])
    console.print(table)
    console.print(f"[bold]{view['headline']}[/bold]")
    for reason in view["reasons"]:
        console.print(f"- {reason}")
    return 0


def _ui(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        from ampray.orchestrator.webui import launch
    except ImportError as err:
        print(f"ampray ui: error: {err}; install the web UI with: pip install 'ampray[ui]'", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ampray ui: warning: serving on {args.host}: anyone who can reach it can start training runs",
              file=sys.stderr)
    launch(host=args.host, port=args.port, storage_path=args.storage_path, address=args.address or "",
           announce=lambda url: print(f"ampray ui: serving on {url} (open it in a browser; Ctrl-C stops it)",
                                      flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ampray import __version__
    from ampray.job import fields_help

    parser = argparse.ArgumentParser(prog="ampray", description="Mixed-precision training on Ray")
    parser.add_argument("--version", action="version", version=f"ampray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on Ray (embedded local cluster unless --address)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Any job field can be set as --section.field VALUE (command line beats --config "
                                  "file beats defaults),\ne.g. --precision.dtype bf16 --scaling.num_workers 4 "
                                  "--model.kind gpt --model.options.preset micro.\n\n" + fields_help())
    train.add_argument("--config", default=None, help="job TOML file")
    train.add_argument("--address", default=None, help="Ray address: auto, ray://host:10001 (default: embedded)")
    train.add_argument("--name", default=None, help="run name (the same name resumes)")
    train.add_argument("--model", default=None, help="model kind: mlp | cnn | gpt (= --model.kind); your own model: "
                       "--model.factory package.module:function")
    train.set_defaults(func=_train)
    tune = sub.add_parser("tune", help="search loss-scaler and adaptation settings with Ray Tune",
                          epilog="Job fields can be overridden as for train: --run.steps 100 ...")
    tune.add_argument("--config", default=None, help="job TOML file (the base of every trial)")
    tune.add_argument("--space", default="scaler", help="scaler | adaptive | precision | full | space.toml")
    tune.add_argument("--samples", type=int, default=4)
    tune.add_argument("--scheduler", default="asha", help="asha | pbt | fifo")
    tune.add_argument("--perturbation-interval", type=int, default=0,
                      help="pbt: steps between exploit/explore (0: a quarter of run.steps)")
    tune.add_argument("--pbt-synch", action="store_true", help="pbt: decide when every trial reached the interval")
    tune.add_argument("--max-concurrent", type=int, default=0, help="0: as many as fit")
    tune.add_argument("--gpus-per-trial", type=float, default=0.0, help="per trial worker; 0: CPU workers")
    tune.add_argument("--workers-per-trial", type=int, default=1)
    tune.add_argument("--skip-penalty", type=float, default=1.0, help="objective = loss + penalty * skip rate")
    tune.add_argument("--name", default="ampray-tune", help="search name")
    tune.add_argument("--resume", default=None, metavar="NAME", help="continue the interrupted search NAME")
    tune.add_argument("--address", default=None, help="Ray address (default: embedded)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--top", type=int, default=5, help="trials shown in the table")
    tune.set_defaults(func=_tune)
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the built-in corpus as Parquet")
    synth.add_argument("--out", required=True, help="folder; one sub-folder per kind is written in it")
    synth.add_argument("--kinds", default="mlp,cnn,gpt", help="comma list of model kinds (default: all three)")
    synth.add_argument("--num-samples", type=int, default=4096, help="rows per kind")
    synth.add_argument("--seed", type=int, default=0, help="the corpus is a function of this seed")
    synth.add_argument("--shards", type=int, default=4, help="Parquet files per kind")
    synth.set_defaults(func=_data)
    bench = sub.add_parser("bench", help="fp32 against each mixed precision on one model (no Ray)")
    bench.add_argument("--model", default="mlp", help="mlp | cnn | gpt")
    bench.add_argument("--batch-size", type=int, default=64)
    bench.add_argument("--iterations", type=int, default=20, help="timed steps per precision (median)")
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--size", default="auto", help="small | large | auto (large on a GPU)")
    bench.add_argument("--precisions", default="", help="comma list (default: all this device runs)")
    bench.add_argument("--device", default=None)
    bench.add_argument("--compile", action="store_true", help="torch.compile every precision's copy (warm-up compiles)")
    bench.add_argument("--out", default=None, help="write the table as Parquet")
    bench.set_defaults(func=_bench)

    recommend = sub.add_parser("recommend", help="detected hardware and what precision to use")
    recommend.add_argument("--device", default=None)
    recommend.set_defaults(func=_recommend)

    ui = sub.add_parser("ui", help="the web UI (needs ampray[ui])")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--storage-path", default="runs", help="where training runs started from the UI go")
    ui.add_argument("--address", default=None, help="Ray address (default: embedded)")
    ui.set_defaults(func=_ui)

    demo = sub.add_parser("demo", help="a single-process run of the engine, no Ray")
    demo.add_argument("--model", default="mlp", help="mlp | cnn | gpt")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--dtype", default="auto", help="auto | fp16 | bf16 | fp32")
    demo.add_argument("--no-adaptive", action="store_true")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "tune"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
