"""The Python API: `ampray.fit(...)` and `ampray.search(...)`, the same runs as `ampray train` / `ampray tune`.

    result = ampray.fit("job.toml", model="mynets:build", loss="mynets:loss",
                        train_data="data/train", val_data="data/val",
                        overrides={"run.steps": 400, "precision.dtype": "bf16"})
    result.metrics["val/loss/mean"], result.checkpoint

`model` and `loss` are import paths or the functions themselves: a function of an importable module is
recorded by its path (shipped to the workers like a path given in a job file); one defined in a notebook
or script (`__main__`) travels to the workers by value. Data is a Parquet path, a pyarrow Table or pandas
DataFrame (written as Parquet into the run's folder, so that a rerun resumes on the same rows), or, for
the training data, a `ray.data.Dataset`, which streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ampray.job import ConfigError, JobConfig


@dataclass
class FitResult:
    """What a training run ended with."""

    run_dir: Path
    checkpoint: str | None
    """The final checkpoint's folder (None when the run wrote none)."""
    metrics: dict[str, float]
    """The last cross-rank figures: `loss/mean`, `val/loss/mean`, `val/accuracy/mean`, `scaler/scale/min`, ..."""
    per_rank: dict[int, dict[str, Any]]
    """Each rank's last value of every record."""
    job: JobConfig
    """The resolved job, as saved in `run_dir/job.toml`."""


def _given(job: JobConfig | str | Path | dict | None, overrides: dict[str, Any]) -> set[str]:
    """The dotted fields the caller set: a job file's and a dict's own, a JobConfig's that differ from the
    defaults, and the overrides."""
    from ampray.job import _flatten, given_fields

    if job is None or isinstance(job, (str, Path)):
        return given_fields(job, overrides)
    if isinstance(job, JobConfig):
        if getattr(job, "given", None) is not None:  # JobConfig.load's record of what its file and overrides set
            return set(job.given) | set(_flatten(overrides))
        default = JobConfig().flat()  # built otherwise: the fields that differ from the defaults
        return {k for k, v in job.flat().items() if default.get(k) != v} | set(_flatten(overrides))
    return set(_flatten(dict(job))) | set(_flatten(overrides))


def _job(job: JobConfig | str | Path | dict | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    if job is None or isinstance(job, (str, Path)):
        return JobConfig.load(job, overrides).to_dict()
    base = job.to_dict() if isinstance(job, JobConfig) else dict(job)
    return JobConfig.load(None, {**_dotted(base), **(overrides or {})}).to_dict()


def _with_code(overrides: dict[str, Any] | None, model: Any, loss: Any, options: dict[str, Any] | None,
               objects: dict[str, Any]) -> dict[str, Any]:
    """The overrides with `model=`, `loss=` and `options=` as fields, so that the job is checked once, with
    them: `model.options` of a job file or of `overrides` belong to the factory passed here (checked
    against the built-in mlp they would be refused)."""
    code: dict[str, Any] = {"model": {}}
    _code(model, "model.factory", code, objects)
    _code(loss, "model.loss", code, objects)
    extra = {f"model.{name}": value for name, value in code["model"].items()}
    if options is not None:
        extra["model.options"] = dict(options)
    return {**(overrides or {}), **extra}


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix + key).endswith("options"):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _code(value: Any, field: str, job: dict[str, Any], objects: dict[str, Any]) -> None:
    """Put the model or loss into the job: an import path as it is, an importable function or class by its
    path, anything else callable (a notebook's function, a lambda, `nn.MSELoss()`, a partial) by value, with
    a name recorded in the job that says so."""
    if value is None:
        return
    name = field.split(".")[1]
    arg = "model" if name == "factory" else "loss"
    if isinstance(value, str):
        job["model"][name] = value
        return
    if not callable(value):
        raise ConfigError(f"{arg}={value!r} is not allowed: expected an import path \"package.module:function\", "
                          "a function or a callable object")
    from ampray.models.registry import BY_VALUE, import_path_of

    if _importable(value):
        job["model"][name] = import_path_of(value)
        return
    # Not importable by path on a worker: it travels by value; the job records what it was, under a module
    # name that cannot be imported (a rerun from the job file alone is refused rather than run otherwise).
    objects[field] = value
    label = re.sub(r"\W+", "_", getattr(value, "__name__", "") or type(value).__name__).strip("_") or arg
    # A digest of the pickled object tells two of one name apart (partial(f, a=0) and partial(f, a=0.3)):
    # a rerun with another one is refused against its checkpoint, not resumed with a different loss.
    job["model"][name] = f"{BY_VALUE}:{label}_{by_value_digest(value)}"


def by_value_digest(value: Any) -> str:
    """12 hex digits of the object as cloudpickle (the pickler that carries it to the workers) writes it,
    the same in every process for the same code: a class defined in a script or notebook is pickled with a
    random per-process id (cloudpickle's class tracker), which is left out, so rerunning the same script
    resumes its run instead of being refused for another model."""
    from ray import cloudpickle
    from ray.cloudpickle import cloudpickle as tracker

    import pickletools

    data = cloudpickle.dumps(value)
    with tracker._DYNAMIC_CLASS_TRACKER_LOCK:
        classes = list(tracker._DYNAMIC_CLASS_TRACKER_BY_CLASS.items())
    # The file names of the pickled code too: a notebook's cells live in /tmp/ipykernel_<pid>/..., another
    # name after every kernel restart. The pickle's opcodes are hashed with those strings left out (their
    # lengths are in the stream too), and without positions.
    files = {_code_file(value)} | {_code_file(f) for cls, _ in classes for f in vars(cls).values()}
    varying = {class_id for _, class_id in classes} | (files - {None})
    digest = hashlib.sha256()
    for opcode, arg, _ in pickletools.genops(data):
        digest.update(f"{opcode.name}:{'' if arg in varying or opcode.name in ('PROTO', 'FRAME') else repr(arg)};".encode())
    return digest.hexdigest()[:12]


def _code_file(value: Any) -> str | None:
    """The source file of a function (or of a partial's function), where pickling records it."""
    value = getattr(value, "func", value)
    code = getattr(value, "__code__", None)
    return getattr(code, "co_filename", None) or None


def _importable(value: Any) -> bool:
    """A module-level function or class of a module other than __main__ (found again by its path)."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or module == "__main__" or not isinstance(qualname, str):
        return False
    return all(part.isidentifier() for part in qualname.split("."))


def _table_to_parquet(data: Any, folder: Path, name: str) -> str | None:
    """A pyarrow Table or pandas DataFrame written as `<folder>/<name>-<digest>.parquet` (None for other data).
    The name holds a digest of the file: a rerun with the same rows resumes on the same file, one with
    other rows names another file, which a rerun's check against its checkpoint refuses (data.path), and a
    file a running driver reads is never replaced."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if type(data).__name__ == "DataFrame" and hasattr(data, "to_parquet"):
        data = pa.Table.from_pandas(data, preserve_index=False)
    if not isinstance(data, pa.Table):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.parquet.tmp"
    pq.write_table(data, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:16]
    target = folder / f"{name}-{digest}.parquet"
    if target.exists():
        tmp.unlink()
    else:
        os.replace(tmp, target)
    return str(target)


def _dataset_to_parquet(dataset: Any, folder: Path, name: str) -> str:
    """A ray.data.Dataset written into `<folder>/<name>-<digest>/` (the digest of its files, as above)."""
    import shutil

    tmp = folder / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.write_parquet(str(tmp))
    digest = hashlib.sha256()
    for file in sorted(tmp.glob("*.parquet")):
        digest.update(file.read_bytes())
    target = folder / f"{name}-{digest.hexdigest()[:16]}"
    if target.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return str(target)


def _data(job: dict[str, Any], train_data: Any, val_data: Any, allow_stream: bool) -> Any:
    """Put the data into the job; returns a ray.data.Dataset that streams the training rows, or None."""
    run_dir = Path(job["run"]["storage_path"]).expanduser().resolve() / job["run"]["name"] / "data"
    stream = None
    for value, key, name in ((train_data, "path", "train"), (val_data, "val_path", "val")):
        if value is None:
            continue
        if isinstance(value, (str, Path)):
            job["data"][key] = str(value)
        elif (path := _table_to_parquet(value, run_dir, name)) is not None:
            job["data"][key] = path
        elif type(value).__module__.startswith("ray.data"):
            if name == "val":  # held-out sets are evaluated in memory: written out once, read by every rank
                job["data"][key] = _dataset_to_parquet(value, run_dir, name)
            elif not allow_stream:
                raise ConfigError("train_data as a ray.data.Dataset is not supported by ampray.search: every "
                                  "trial would need its own stream; pass a Parquet path or a pyarrow Table")
            else:
                stream, job["data"]["streaming"], job["data"]["path"] = value, "true", ""
        else:
            raise ConfigError(f"{name}_data={type(value).__name__} is not allowed: expected a Parquet path, a "
                              "pyarrow Table, a pandas DataFrame or a ray.data.Dataset")
    return stream


def fit(job: JobConfig | str | Path | dict | None = None, *, model: Any = None, loss: Any = None,
        train_data: Any = None, val_data: Any = None, options: dict[str, Any] | None = None,
        overrides: dict[str, Any] | None = None) -> FitResult:
    """Train like `ampray train`: `job` is a JobConfig, a job file, a dict of sections or None (defaults);
    `model`/`loss` a function or import path; `options` the factory's keyword arguments; `overrides` dotted
    fields ({"run.steps": 400}). Raises ConfigError for bad input (before any worker starts) and
    RuntimeError when the run fails or learns nothing finite."""
    from ampray.orchestrator.train import run_training

    from ampray.orchestrator.cli import _precision_chooser

    objects: dict[str, Any] = {}
    fields = _with_code(overrides, model, loss, options, objects)
    data = _job(job, fields)
    stream = _data(data, train_data, val_data, allow_stream=True)
    resolved = JobConfig.from_dict(data)
    # The defaults `ampray train` applies for the workers found (bf16 where they have it, a rerun's own
    # dtype), to the fields the caller left unset: the same job trains, and resumes, the same either way.
    chooser = _precision_chooser(_given(job, fields), print)
    try:
        outcome = run_training(resolved, notify=print, stream=stream, objects=objects or None,
                               choose_precision=chooser)
    except Exception as err:
        from ray.train import TrainingFailedError

        if not isinstance(err, TrainingFailedError):
            raise
        from ampray.orchestrator.cli import _after_failure, _failure_summary

        # What `ampray train` prints, instead of Ray's nested tracebacks cut before the user's own error.
        raise RuntimeError(f"the run failed: {_failure_summary(err)}\n{_after_failure(resolved.run_dir())}") from err
    saved = JobConfig.load(outcome.run_dir / "job.toml") if (outcome.run_dir / "job.toml").is_file() else resolved
    return FitResult(outcome.run_dir, outcome.checkpoint, outcome.aggregate, outcome.final, saved)


def search(job: JobConfig | str | Path | dict | None = None, *, model: Any = None, loss: Any = None,
           train_data: Any = None, val_data: Any = None, options: dict[str, Any] | None = None,
           overrides: dict[str, Any] | None = None, resume: bool = False, **search_fields: Any) -> dict[str, Any]:
    """Search like `ampray tune`; `search_fields` are SearchConfig's (space="scaler", samples=4,
    scheduler="asha", ...). Returns {"folder", "rows", "best", "params"}: results.parquet and best.toml
    are in `folder`. Functions defined in `__main__` cannot be searched over (each trial imports the model
    by path): put them in a module."""
    from ampray.orchestrator.search import SearchConfig, run_search

    if resume:
        changed = sorted(set(overrides or {}) - {"run.storage_path", "run.address"})
        if changed or any(v is not None for v in (model, loss, train_data, val_data, options)):
            given = changed + [name for name, v in (("model", model), ("loss", loss), ("train_data", train_data),
                                                    ("val_data", val_data), ("options", options)) if v is not None]
            raise ConfigError(f"ampray.search(resume=True) goes on with the job the search began with, so "
                              f"{', '.join(given)} would not be used; expected only the job (for its "
                              "run.storage_path) and overrides of run.storage_path and run.address (start a new "
                              "search, with another name, for another job)")
    objects: dict[str, Any] = {}
    data = _job(job, _with_code(overrides, model, loss, options, objects))
    if objects:
        raise ConfigError(f"{sorted(objects)}: functions defined in __main__ or inside a function cannot be "
                          "used by ampray.search: define them in a module and pass them (or its import path)")
    _data(data, train_data, val_data, allow_stream=False)
    try:
        config = SearchConfig(**search_fields)
    except TypeError as err:
        names = [f.name for f in dataclasses.fields(SearchConfig)]
        raise ConfigError(f"ampray.search: {err}; allowed search fields are {names}") from None
    return run_search(JobConfig.from_dict(data), config, resume=resume)
