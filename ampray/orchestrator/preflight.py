"""Checks on the driver before any worker starts: the data against the model and the batch, and a rerun
of a run against the checkpoint it would resume from.

Without them these mistakes surface only inside the workers, after Ray has started them (a raw
`WorkerGroupError` traceback tens of seconds later), or, worse, not at all: a rerun with a changed
optimizer, batch or precision would restore the checkpoint's settings over the new ones, count the
data position in the new batch size and train on silently.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ampray.job import ConfigError, JobConfig, _flatten, absolute_data_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --- The data -------------------------------------------------------------------------------------


def parquet_summary(path: Path) -> dict[str, Any]:
    """What the files of a Parquet dataset say about themselves, from their footers (no data read, except
    the small `label` column): kind, rows, shape of one input row, vocabulary size, label range."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ampray.data.parquet import _shard_files

    files = _shard_files(path)
    rows, labels = 0, []
    meta: dict[str, str] = {}
    width = None
    for file in files:
        footer = pq.read_metadata(file)
        rows += footer.num_rows
        schema = pq.read_schema(file)
        meta = meta or {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        for name in ("features", "image", "tokens"):
            if name in schema.names and hasattr(schema.field(name).type, "list_size"):
                width = schema.field(name).type.list_size
        if "label" in schema.names:
            column = pq.read_table(file, columns=["label"]).column("label")
            if len(column):
                bounds = pc.min_max(column)
                labels += [bounds["min"].as_py(), bounds["max"].as_py()]
    kind = meta.get("ampray.kind")
    shape = json.loads(meta["ampray.shape"]) if "ampray.shape" in meta else (
        [width - (kind == "gpt")] if width is not None else None)
    vocab = int(meta["ampray.vocab_size"]) if "ampray.vocab_size" in meta else None
    return {"kind": kind, "rows": rows, "shape": shape, "vocab_size": vocab,
            "label_range": (min(labels), max(labels)) if labels else None, "files": len(files)}


def check_data(job: JobConfig, num_workers: int) -> None:
    """The dataset fits the model and gives every rank at least one micro-batch; raises ConfigError."""
    check_batch_fits(job, check_data_fits_model(job), num_workers)


def check_data_fits_model(job: JobConfig) -> int:
    """The dataset's kind, shape, vocabulary and labels fit the model (checked from the Parquet footers,
    with no cluster needed); returns its number of rows."""
    from ampray.models import build_config

    if not job.data.path:
        return job.data.num_samples
    where = f"data.path={job.data.path!r}"
    try:
        info = parquet_summary(Path(job.data.path).expanduser())
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{where}: not a readable Parquet dataset: {err}") from None
    _check_data_fits_model(job.model.kind, build_config(job.model.kind, **job.model.options), info, where)
    return info["rows"]


def check_batch_fits(job: JobConfig, rows: int, num_workers: int) -> None:
    """Every rank's share of the `rows` holds at least one micro-batch; raises ConfigError."""
    where = f"data.path={job.data.path!r}" if job.data.path else f"data.num_samples={rows}"
    k = job.precision.gradient_accumulation_steps
    micro, per_rank = job.data.batch_size // k, rows // num_workers
    if micro > per_rank:
        raise ConfigError(
            f"data.batch_size={job.data.batch_size} is not allowed: expected at most "
            f"{per_rank * k} here (with precision.gradient_accumulation_steps={k}, a micro-batch of {micro} "
            f"samples per rank; {where} gives {rows} rows, {per_rank} for each of {num_workers} workers)")


def _check_data_fits_model(kind: str, model: Any, info: dict[str, Any], where: str) -> None:
    found, shape = info["kind"], info["shape"]
    if found is not None and found != kind:
        raise ConfigError(f"{where} holds {found!r} data (its ampray.kind); model.kind={kind!r} needs "
                          f"{kind!r} data (`ampray data synth --kinds {kind}`)")
    if shape is None:
        return
    if kind == "mlp" and shape != [model.in_features]:
        raise ConfigError(f"{where} holds rows of {shape[0] if len(shape) == 1 else shape} features; "
                          f"model.options.in_features={model.in_features} must match them")
    if kind == "cnn" and (len(shape) != 3 or shape[0] != model.in_channels):
        raise ConfigError(f"{where} holds images of shape {shape} (C, H, W); "
                          f"model.options.in_channels={model.in_channels} must equal C")
    if kind == "gpt":
        if shape[0] > model.block_size:
            raise ConfigError(f"{where} holds sequences of {shape[0]} tokens; the model takes at most "
                              f"model.options.block_size={model.block_size}")
        if info["vocab_size"] is not None and info["vocab_size"] > model.vocab_size:
            raise ConfigError(f"{where} holds tokens up to {info['vocab_size'] - 1} (ampray.vocab_size="
                              f"{info['vocab_size']}); model.options.vocab_size={model.vocab_size} is too small")
    if kind in ("mlp", "cnn") and info["label_range"] is not None:
        lo, hi = info["label_range"]
        if lo < 0 or hi >= model.num_classes:
            raise ConfigError(f"{where} holds labels in [{lo}, {hi}]; model.options.num_classes="
                              f"{model.num_classes} needs them in [0, {model.num_classes - 1}]")


# --- A rerun against its checkpoint ----------------------------------------------------------------

# What a rerun of a run may change. Everything else shapes the saved state (model, optimizer, data order,
# engine), would be overwritten by it on restore, or changes what the next step computes, and must match.
# The world size is compared separately: the data position is counted per rank.
_MAY_CHANGE = frozenset({
    "model.compile",
    "run.steps", "run.report_every", "run.checkpoint_every", "run.num_to_keep", "run.max_failures",
    "run.address", "run.storage_path", "run.name",
    "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
    "scaling.allreduce_dtype", "scaling.bind_cpus",
})


def _may_change(key: str) -> bool:
    from ampray.amp.scaler import SETTINGS

    # The loss scaler's live settings and the adaptation's: the worker applies changes through the
    # engine's setters after the restore (what a PBT mutation does).
    return (key in _MAY_CHANGE or key.startswith("precision.adaptation.")
            or key.removeprefix("precision.") in SETTINGS and key.startswith("precision."))


# Ray Train's own list of the run's checkpoints, written once every rank's upload of one is complete.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder a rerun resumes from: the one Ray Train registered last in its snapshot.
    A folder it did not register (every rank copies its files in on its own; a crash during that copy
    leaves a part) is never resumed from by Ray, so it is not compared against either; without a
    snapshot Ray starts the run over, and so None."""
    try:
        latest = json.loads((run_dir / SNAPSHOT).read_text()).get("latest_checkpoint_result") or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"run {run_dir.name!r}: Ray's checkpoint list {run_dir / SNAPSHOT} cannot be read "
                          f"({err}); give this run a new --name") from None
    name = latest.get("checkpoint_dir_name")
    return run_dir / name if name else None


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder holds, from its name (checkpoint_000040); -1 for another name."""
    try:
        return int(folder.name.removeprefix("checkpoint_"))
    except ValueError:
        return -1


def check_resume(job: JobConfig, num_workers: int) -> list[str]:
    """Compare a rerun with the run's latest checkpoint. Raises ConfigError naming every field that must
    not change and does; returns notes for the user (where it resumes, allowed changes that matter;
    empty for a new run)."""
    checkpoint = latest_checkpoint(job.run_dir())
    if checkpoint is None:
        return []
    try:
        saved = _flatten(tomllib.loads((checkpoint / "job.toml").read_text()))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"run {job.run.name!r} would resume from {checkpoint}, whose job.toml cannot be "
                          f"read ({err}); give this run a new --name") from None
    saved, now = _comparable(saved), _comparable(job.flat())
    # A field only one side knows (added or removed by an upgrade of ampray) is not compared.
    changed = [f"{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now" for key in sorted(now)
               if key in saved and not _may_change(key) and not _same(saved[key], now[key])]
    world = len(list(checkpoint.glob("rng_rank*.pt")))
    if world and world != num_workers:
        changed.append(f"the number of workers: {world} in the checkpoint, {num_workers} now "
                       f"(pass --scaling.num_workers {world} to resume)")
    at = checkpoint_step(checkpoint)
    if at > job.run.steps:
        changed.append(f"run.steps={job.run.steps}: the run is already at step {at} (expected run.steps >= {at}; "
                       "a run does not go back)")
    if changed:
        raise ConfigError(
            f"run {job.run.name!r} resumes from {checkpoint.name} in {checkpoint.parent}, and these settings "
            "differ from the ones it was trained with:\n  " + "\n  ".join(changed) +
            "\nA rerun may change only the run length, reporting and checkpoint intervals, workers' resources "
            "and the loss scaler's live settings. Start a new run with --name NEW (or restore the settings).")
    notes = [f"the run is complete at step {at} ({checkpoint.name}): nothing to train; its final records follow"
             if at == job.run.steps else
             f"resuming from {checkpoint.name} (step {at} of {job.run.steps})"]
    before, after = saved.get("run.steps"), job.run.steps
    if before != after and job.optimizer.schedule == "cosine":
        notes.append(f"run.steps changed from {before} to {after}: the cosine learning-rate schedule now ends "
                     f"at step {after}, so the learning rate continues from where that curve stands")
    return notes


def _comparable(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat job values with `model.options` replaced by every field of the model config they resolve to,
    so that a preset, an explicit default and an omitted option compare equal, and a removed one does not."""
    import dataclasses

    from ampray.models import build_config

    out = {k: v for k, v in flat.items() if not k.startswith("model.options.")}
    if out.get("data.path"):  # a checkpoint of an earlier version may hold it relative to the driver's folder
        out["data.path"] = absolute_data_path(out["data.path"])
    options: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("model.options."):
            options[key.removeprefix("model.options.")] = value
    try:
        config = build_config(flat.get("model.kind", ""), **options)
    except (TypeError, ValueError):  # a kind or option this version does not know: compare as written
        return {**out, **{f"model.options.{k}": v for k, v in options.items()}}
    out.update({f"model.options.{k}": v for k, v in dataclasses.asdict(config).items()})
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b
