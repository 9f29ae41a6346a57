"""Checks on the driver before any worker starts: the data against the model and the batch, and a rerun
of a run against the checkpoint it would resume from.

Without them these mistakes surface only inside the workers, after Ray has started them (a raw
`WorkerGroupError` traceback tens of seconds later), or, worse, not at all: a rerun with a changed
optimizer, batch or precision would restore the checkpoint's settings over the new ones, count the
data position in the new batch size and train on silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ampray.data.checks import ColumnRule, DataCheck
from ampray.data.columns import check_columns, schema_summary
from ampray.models.registry import ModelSpec
from ampray.orchestrator.checkpoints import SNAPSHOT, checkpoint_step, latest_checkpoint  # noqa: F401

from ampray.job import ConfigError, JobConfig, _flatten, absolute_data_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# --- The data -------------------------------------------------------------------------------------


def parquet_summary(path: Path, labels: bool = True) -> dict[str, Any]:
    """What the files of a Parquet dataset say about themselves, from their footers (no data read, except
    the small `label` column; `labels` False: not that either, label_range None): kind, rows, shape of one
    input row, vocabulary size, label range."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ampray.data.parquet import _shard_files, read_shard

    files = _shard_files(path)
    rows, bounds_seen = 0, []
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
        if labels and "label" in schema.names:
            column = read_shard(file, ["label"]).column("label")
            if len(column):
                bounds = pc.min_max(column)
                bounds_seen += [bounds["min"].as_py(), bounds["max"].as_py()]
    kind = meta.get("ampray.kind")
    shape = json.loads(meta["ampray.shape"]) if "ampray.shape" in meta else (
        [width - (kind == "gpt")] if width is not None else None)
    vocab = int(meta["ampray.vocab_size"]) if "ampray.vocab_size" in meta else None
    return {"kind": kind, "rows": rows, "shape": shape, "vocab_size": vocab,
            "label_range": (min(bounds_seen), max(bounds_seen)) if bounds_seen else None, "files": len(files)}


@dataclass
class DataPlan:
    """What the driver learnt of a job's model and data before Ray starts."""

    spec: ModelSpec
    rows: int
    """Training rows (after a val_fraction split is taken off); -1 when unknown (a Ray Dataset)."""
    bytes: int
    """Size of the training rows once decoded into tensors, estimated from a sample (0: the built-in corpus
    or ampray's schema, which are always read into memory)."""
    columns: list[str]
    """The Parquet columns training reads (empty: the built-in corpus or ampray's schema, read whole)."""
    unused_parameters: tuple[str, ...] = ()
    """Parameters the loss of one real batch leaves without a gradient (DDP must then look for them)."""
    pad_widths: dict[str, int] = dataclasses.field(default_factory=dict)
    """With data.pad_to 0: each variable-length column's longest row in the training and held-out files, the
    width it is padded to in every batch, in memory and streamed."""
    data_check: DataCheck | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    """What the user should know before the run starts (printed as notes)."""
    """What the check of every shard (data.check) read, and how long it took; None: not checked."""


def check_data(job: JobConfig, num_workers: int) -> DataPlan:
    """The model and dataset fit each other and give every rank at least one micro-batch; raises ConfigError."""
    plan = check_model_and_data(job)
    check_batch_fits(job, plan.rows, num_workers)
    return plan


def resolve_model(job: JobConfig, objects: dict[str, Any] | None = None) -> ModelSpec:
    """The job's model spec, importing the user's factory and loss here, on the driver."""
    from ampray.models.registry import ImportPathError, resolve_spec

    try:
        return resolve_spec(job.model.kind, job.model.factory, job.model.loss, objects)
    except ImportPathError as err:
        raise ConfigError(str(err)) from None


def check_model_and_data(job: JobConfig, stream=None, objects: dict[str, Any] | None = None) -> DataPlan:
    """Everything about the model and data that needs no cluster, in seconds: the factory and loss import,
    the data's files and columns (or ampray's schema) fit the model, and the model takes one real batch and
    its loss is a number. `stream`: a ray.data.Dataset given instead of data.path (its schema is checked);
    `objects`: the factory and loss by value (the Python API's), instead of by import path."""
    spec = resolve_model(job, objects)
    notes = check_fsdp_blocks(job, spec)
    check_fp32_modules(job, spec)
    d = job.data
    where = f"data.path={d.path!r}"
    rows, size, columns = d.num_samples, 0, []
    if stream is not None:
        if not d.columns:
            raise ConfigError("data.input and data.target are required with a ray.data.Dataset: name its columns "
                              f"of the model's input and of the target (it has {list(stream.schema().names)})")
        rows, columns = -1, d.read_columns
        _check_stream_columns(job, stream)
    elif d.streaming == "true" and not d.path:
        raise ConfigError("data.streaming=true is not allowed without data.path: expected a Parquet folder to "
                          "stream (the built-in corpus is generated in memory)")
    elif d.path and d.columns:
        summary = _columns_summary(job, d.path, "data.path")
        rows, size, columns = summary["rows"], summary["bytes"], d.read_columns
        if d.val_path:
            _check_same_columns(summary, _columns_summary(job, d.val_path, "data.val_path"), job)
    elif d.path:
        if not spec.builtin:
            raise ConfigError(f"data.input and data.target are required with model.factory={job.model.factory!r}: "
                              f"name the Parquet columns of the model's input and of the target "
                              f"({where} has columns {_column_names(d.path)})")
        try:
            info = parquet_summary(Path(d.path).expanduser(), labels=d.check != "full")
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"{where}: not a readable Parquet dataset: {err}") from None
        if info["kind"] is None and info["shape"] is None:
            raise ConfigError(f"{where} is not in ampray's schema (no ampray.kind): name its columns with "
                              f"data.input and data.target (it has columns {_column_names(d.path)})")
        _check_ampray_shards(job, None if info["kind"] else spec.name)
        _refuse_empty(info["rows"], "data.path", d.path)
        spec.check_data(job.model.options, info, where)
        rows = info["rows"]
        if d.val_path:
            try:
                val = parquet_summary(Path(d.val_path).expanduser(), labels=d.check != "full")
            except (OSError, ValueError) as err:
                raise ConfigError(f"data.val_path={d.val_path!r}: not a readable Parquet dataset: {err}") from None
            _refuse_empty(val["rows"], "data.val_path", d.val_path)
            spec.check_data(job.model.options, val, f"data.val_path={d.val_path!r}")
    elif spec.synthetic is None:
        raise ConfigError(f"data.path is required with model.factory={job.model.factory!r}: a Parquet file or "
                          "folder of your data, with data.input and data.target naming its columns")
    report = check_data_files(job, spec) if stream is None else None  # before anything below reads rows
    if d.val_fraction and rows > 0:
        rows -= max(1, round(rows * d.val_fraction))
    widths: dict[str, int] = {}
    if d.columns and d.path and not d.pad_to:
        widths = _longest_rows(job)
        job = dataclasses.replace(job, data=dataclasses.replace(d, pad_widths={**widths, **d.pad_widths}))
    elif d.columns and d.path and d.check == "full":  # every value is read anyway: no row may exceed pad_to
        for name, longest in _longest_rows(job).items():
            if longest > d.pad_to:
                raise ConfigError(f"data.pad_to={d.pad_to}: column {name!r} has rows of up to {longest} entries "
                                  f"(data.path / data.val_path); expected data.pad_to >= {longest}, or 0 (each "
                                  "column padded to its longest row)")
    if d.columns and d.path:
        try:
            size = _decoded_bytes(job, rows)
        except ValueError as err:  # a row longer than data.pad_to, a pad_value the column cannot hold
            raise ConfigError(str(err)) from None
    unused = () if spec.builtin else check_one_batch(job, spec, stream)
    if d.target in widths and job.model.loss and d.target_pad_value == "auto":
        notes.append(f"data.target={d.target!r} holds rows of different lengths, padded with data.pad_value="
                     f"{d.pad_value:g}: make model.loss ignore that value (or set data.target_pad_value to the one "
                     "it ignores), or padded positions count in the loss")
    return DataPlan(spec, rows, size, columns, unused, widths, report, notes)


def check_fsdp_blocks(job: JobConfig, spec: ModelSpec) -> list[str]:
    """With scaling.strategy = "fsdp": torch has FSDP2 (and, for scaling.find_unused_parameters = "true", its
    reduce-scatter of unused parameters); every entry of scaling.fsdp_blocks selects some module of the
    model (a misspelt class name would shard only the whole model, and nothing would say so) and none that
    shares a weight with a module outside it; every wrap policy imports and answers for each module; no
    module of precision.fp32_modules (each sharded as an fp32 unit) shares one either. Returns notes: classes the default choice of blocks leaves to the root for tied weights. The model is
    built on the meta device: no memory, no weights."""
    import torch

    from ampray.actors.worker import block_selector, fsdp_blocks
    from ampray.amp.sharding import reduces_unused_params, refuse_tied
    from ampray.models.registry import ImportPathError

    entries = job.scaling.fsdp_blocks
    if job.scaling.strategy != "fsdp":
        return []
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - public from torch 2.6
    except ImportError:
        raise ConfigError(f"scaling.strategy='fsdp' is not allowed with torch {torch.__version__}: it has no "
                          "public torch.distributed.fsdp.fully_shard (FSDP2); expected torch >= 2.6, or "
                          "strategy 'ddp'") from None
    if job.scaling.find_unused_parameters == "true" and not reduces_unused_params():
        raise ConfigError("scaling.find_unused_parameters='true' is not allowed with scaling.strategy='fsdp' on "
                          f"torch {torch.__version__}: its FSDP cannot reduce-scatter zero gradients for parameters "
                          "some ranks leave unused (FSDPModule.set_reduce_scatter_unused_params); expected 'auto' "
                          "(every rank uses the same parameters), strategy 'ddp', or a newer torch")
    fp32 = job.precision.fp32_modules if job.precision.autocast_enabled else ()
    if not entries and not fp32 and spec.builtin:
        return []
    model = meta_model(job, spec)
    if model is None:  # a factory that cannot build on meta: the workers' sharding decides
        return []
    odd = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype != torch.float32]
    if odd:
        name, dtype = odd[0]
        raise ConfigError(f"scaling.strategy='fsdp' is not allowed with the parameter {name!r} of dtype "
                          f"{str(dtype).removeprefix('torch.')} ({len(odd)} not float32): FSDP shards a unit's parameters "
                          "as one flat float32 buffer and reduces gradients in scaling.allreduce_dtype; expected "
                          "float32 parameters (the engine's master weights), or strategy 'ddp'")
    if fp32:  # each an fp32 unit of its own (shard_model): none may share a weight with a module outside it
        from ampray.amp.sharding import fp32_units

        fp32_units(model, fp32, "precision.fp32_modules")
    if not entries and spec.builtin:
        return []
    if not entries:
        tied: list[str] = []
        fsdp_blocks(model, job, tied)
        return [f"fsdp: the default blocks {', '.join(tied)} share weights with modules outside them, so the root "
                "holds them (gathered whole in each step); name the blocks to shard one by one in "
                "scaling.fsdp_blocks"] if tied else []
    modules = [m for m in model.modules() if m is not model]
    classes = sorted({type(m).__name__ for m in modules})
    for entry in entries:
        try:
            test = block_selector([entry], "scaling.fsdp_blocks")
        except ImportPathError as err:
            raise ConfigError(str(err)) from None
        try:
            hits = sum(1 for m in modules if test(m))
        except Exception as err:  # noqa: BLE001 - the user's policy: its error, with the field
            raise ConfigError(f"scaling.fsdp_blocks entry {entry!r} raised {type(err).__name__} on the model's "
                              f"modules: {err}; expected a function(module) -> bool") from None
        if not hits:
            raise ConfigError(f"scaling.fsdp_blocks entry {entry!r} selects no module of the model; expected a "
                              f"class name of its modules ({', '.join(classes)}) or a wrap policy that selects "
                              "some of them")
        refuse_tied(model, test, f"scaling.fsdp_blocks entry {entry!r}")
    return []


def meta_model(job: JobConfig, spec: ModelSpec):
    """The job's model built on the meta device (no memory, no weights), or None when its factory cannot
    build there (the workers then decide what the driver would have checked)."""
    import torch

    try:
        with torch.device("meta"):
            return spec.build_model(job.model.options)
    except Exception:  # noqa: BLE001 - the user's factory
        return None


def check_fp32_modules(job: JobConfig, spec: ModelSpec) -> None:
    """Every precision.fp32_modules entry selects some module of the model (a misspelt name would leave the
    module in low precision, and nothing would say so). The model is built on the meta device."""
    from ampray.amp.autocast import Fp32Islands

    patterns = job.precision.fp32_modules
    if not patterns:
        return
    model = meta_model(job, spec)
    if model is None:  # a factory that cannot build on meta: the workers' engine decides
        return
    for pattern in patterns:
        islands = Fp32Islands((pattern,), "cpu")
        try:
            islands.attach(model)
        except ValueError:
            names = sorted({type(m).__name__ for m in model.modules() if m is not model})
            raise ConfigError(f"precision.fp32_modules entry {pattern!r} selects no module of the model; expected a "
                              f"qualified-name glob (\"head\", \"blocks.*.norm\") or a class name of its modules "
                              f"({', '.join(names[:20])})") from None
        finally:
            islands.detach()


def check_data_files(job: JobConfig, spec: ModelSpec) -> DataCheck | None:
    """Every shard of data.path and data.val_path, as data.check asks (see ampray.data.checks): the schema
    version, and with "full" every value against the model's ranges and the page checksums; raises
    ConfigError naming the file, column, value and row. None: no files, or data.check = "off"."""
    from ampray.data.checks import check_files
    from ampray.data.columns import parquet_files

    d = job.data
    if d.check == "off" or not d.path:
        return None
    sources = [(field, parquet_files(Path(path).expanduser().absolute()))  # messages name files in full
               for field, path in (("data.path", d.path), ("data.val_path", d.val_path)) if path]
    return check_files(sources, value_rules(job, spec), d.check)


def value_rules(job: JobConfig, spec: ModelSpec) -> list[ColumnRule]:
    """The columns the full check reads, with the integer ranges the model declares: token ids below the
    vocabulary (gpt, or a model.options.vocab_size of your model: its integer input columns) and class
    labels below num_classes (mlp, cnn, or a model.options.num_classes of your model: an integer target).
    A range the job does not declare is not checked."""
    options = job.model.options
    if spec.builtin:
        from ampray.models import build_config

        cfg = build_config(spec.name, **options)
        if spec.name == "gpt":
            return [ColumnRule("tokens", 0, cfg.vocab_size, _TOKENS.format(cfg.vocab_size))]
        return [ColumnRule("features" if spec.name == "mlp" else "image"),
                ColumnRule("label", 0, cfg.num_classes, _LABELS.format(cfg.num_classes))]
    vocab, classes = (options.get(k) for k in ("vocab_size", "num_classes"))
    vocab = vocab if type(vocab) is int and vocab > 0 else None
    classes = classes if type(classes) is int and classes > 0 else None
    held: set[str] = set()
    if vocab:
        # Integer input columns are held to the vocabulary (token ids; an attention mask's 0/1 pass), except
        # 8-bit ones: images (uint8 pixels up to 255) are not token ids.
        from ampray.data.columns import schema_summary

        types = schema_summary(Path(job.data.path).expanduser())["columns"]
        held = {c for c in job.data.input_columns if re.search(r"\bu?int(16|32|64)\b", types.get(c, ""))}
    rules = [ColumnRule(c, 0, vocab, _TOKENS.format(vocab)) if c in held else ColumnRule(c)
             for c in job.data.input_columns]
    target = job.data.target
    return rules + [ColumnRule(target, 0, classes, _LABELS.format(classes)) if classes else ColumnRule(target)]


_TOKENS = "token ids below model.options.vocab_size={}"
_LABELS = "class labels below model.options.num_classes={}"


def _check_ampray_shards(job: JobConfig, kind: str | None) -> None:
    """Every shard of a dataset in ampray's schema: its schema version, kind, columns, types and shape."""
    from ampray.data.checks import check_ampray_shards
    from ampray.data.columns import parquet_files

    if job.data.check == "off":
        return
    for field, path in (("data.path", job.data.path), ("data.val_path", job.data.val_path)):
        if path:
            check_ampray_shards(parquet_files(Path(path).expanduser().absolute()), field, kind)


def keep_trained_padding(job: JobConfig, plan: DataPlan) -> JobConfig:
    """A rerun pads as its checkpoint was trained: the widths found now (a new held-out set may be longer
    or shorter) give way to the checkpoint's, unless a row no longer fits them (ConfigError); and a run
    saved before data.target_pad_value existed keeps padding its target with data.pad_value (what it was
    trained with), not the -100 an "auto" target pad is now. Returns the job to run."""
    try:
        checkpoint = latest_checkpoint(job.run_dir())
    except ConfigError:
        return job  # check_resume reports an unreadable checkpoint list, after make_run_dir's own checks
    if checkpoint is None:
        return job
    try:
        data = tomllib.loads((checkpoint / "job.toml").read_text()).get("data", {})
    except (OSError, tomllib.TOMLDecodeError):
        return job  # check_resume reports an unreadable job.toml
    if job.data.columns and job.data.target_pad_value == "auto":
        # "auto" resumes with the target padding the run was trained with: the number its checkpoint holds (a
        # rerun of such a run saves it), or the pad_value of a run saved before the field existed.
        trained = data.get("target_pad_value", data.get("pad_value") if "pad_value" in data else None)
        if isinstance(trained, (int, float)) and not isinstance(trained, bool):
            job = dataclasses.replace(job, data=dataclasses.replace(job.data, target_pad_value=float(trained)))
    if job.data.pad_to or not plan.pad_widths:
        return job
    saved = data.get("pad_widths") or {}
    for name, width in plan.pad_widths.items():
        if name in saved and width > saved[name]:
            raise ConfigError(f"column {name!r} now has rows of {width} entries (data.path / data.val_path); the "
                              f"run was trained with them padded to {saved[name]} ({checkpoint.name}): expected "
                              f"rows of at most {saved[name]}, or a new --name")
    plan.pad_widths = {**plan.pad_widths, **saved}
    return job


def _longest_rows(job: JobConfig) -> dict[str, int]:
    """Each variable-length column's longest row in the training and held-out files. Reads those columns
    whole: with large data of variable-length rows, setting data.pad_to skips this."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ampray.data.columns import is_variable_list, parquet_files

    longest: dict[str, int] = {}
    for path in (job.data.path, job.data.val_path):
        if not path:
            continue
        for file in parquet_files(Path(path).expanduser()):
            schema = pq.read_schema(file)
            names = [n for n in job.data.read_columns if is_variable_list(schema.field(n).type)]
            if names:
                table = pq.read_table(file, columns=names)
                for name in names:
                    rows = int(pc.max(pc.list_value_length(table.column(name))).as_py() or 0)
                    longest[name] = max(longest.get(name, 0), rows)
    return longest


def _decoded_bytes(job: JobConfig, rows: int) -> int:
    """The training rows' size as tensors (int64 for integers, padded lists), from the first rows."""
    from ampray.actors.data import column_spec
    from ampray.data.columns import leaves, read_columns

    sample = min(max(rows, 1), 256)
    x, y = read_columns(Path(job.data.path).expanduser(), column_spec(job), max_rows=sample)
    per_row = sum(t.element_size() * t[0].numel() for t in [*leaves(x), y] if len(t)) if len(y) else 0
    return int(per_row * rows)


def _column_names(path: str) -> list[str]:
    try:
        return list(schema_summary(Path(path).expanduser())["columns"])
    except (OSError, ValueError):
        return []


def _columns_summary(job: JobConfig, path: str, field: str) -> dict[str, Any]:
    from ampray.actors.data import column_spec

    try:
        summary = check_columns(Path(path).expanduser(), column_spec(job), field_prefix="data", field=field)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"{field}={path!r}: not a readable Parquet dataset: {err}") from None
    _refuse_empty(summary["rows"], field, path)
    return summary


def _refuse_empty(rows: int, field: str, path: str) -> None:
    """A dataset of no rows: nothing to train on, or a held-out loss that would be NaN at every report."""
    if rows == 0:
        raise ConfigError(f"{field}={path!r} holds 0 rows; expected a Parquet file or folder with data"
                          + (" (or data.val_path = \"\" for no held-out set)" if field == "data.val_path" else ""))


def _check_same_columns(train: dict[str, Any], val: dict[str, Any], job: JobConfig) -> None:
    """The held-out set's columns decode into the training columns' tensors (their widths of integer or
    float may differ: both become int64 or float32; a list's kind, fixed or variable, may not)."""
    from ampray.data.columns import tensor_type

    for name in job.data.read_columns:
        if tensor_type(train["columns"][name]) != tensor_type(val["columns"][name]):
            raise ConfigError(f"data.val_path={job.data.val_path!r}: column {name!r} has type "
                              f"{val['columns'][name]}; expected {train['columns'][name]} as in data.path "
                              "(the held-out set must have the training data's columns: integer and float widths "
                              "may differ)")


def _check_stream_columns(job: JobConfig, stream) -> None:
    names = list(stream.schema().names)
    for field, name in [*(("data.input", c) for c in job.data.input_columns), ("data.target", job.data.target)]:
        if name not in names:
            raise ConfigError(f"{field}={name!r} is not allowed: the training dataset has no column {name!r} "
                              f"(columns: {', '.join(names)}); expected one of those")


def check_one_batch(job: JobConfig, spec: ModelSpec, stream=None) -> tuple[str, ...]:
    """Build the model and run two real rows through it, the loss and its backward, in fp32 on this
    machine's CPU: a model that rejects the data's shape, or a loss that is not a number, fails here with
    the fields to fix. Returns the parameters left without a gradient (DDP must be told to look for them)."""
    import torch

    from ampray.actors.data import one_batch

    label = f"model.factory={job.model.factory!r}" if job.model.factory else f"model.kind={job.model.kind!r}"
    try:
        torch.manual_seed(job.run.seed)
        model = spec.build_model(job.model.options)
    except TypeError as err:
        if "returned a" in str(err):
            raise ConfigError(str(err)) from None
        raise ConfigError(f"{label} with model.options={job.model.options!r}: {err}") from None
    except Exception as err:  # the user's factory raised on these options
        raise ConfigError(f"{label} with model.options={job.model.options!r} raised {type(err).__name__}: "
                          f"{err}") from None
    from torch.nn.parameter import is_lazy

    if stream is not None and not job.data.path and any(is_lazy(t) for t in (*model.parameters(), *model.buffers())):
        raise ConfigError(f"{label} has lazy modules (nn.LazyLinear, ...), whose shapes each worker learns from a "
                          "first forward on rows of data.path; with the training rows given as a ray.data.Dataset "
                          "there is none: expected data.path (a Parquet file or folder), or modules with their "
                          "sizes given (nn.Linear)")
    try:
        if stream is not None:  # the first rows only: Ray Data reads what that takes, not the whole dataset
            from ampray.actors.data import column_spec
            from ampray.data.columns import table_to_tensors

            batch = stream.select_columns(job.data.read_columns).take_batch(2, batch_format="numpy")
            x, y = table_to_tensors(batch, column_spec(job))
        else:
            x, y = one_batch(job, spec, 2)
    except (OSError, ValueError) as err:
        where = "the training ray.data.Dataset" if stream is not None else f"data.path={job.data.path!r}"
        raise ConfigError(f"{where}: cannot read a batch: {err}") from None
    what = _describe(x), _describe(y)
    before = set(model.state_dict())
    try:
        output = model(x)
    except Exception as err:
        raise ConfigError(f"{label} rejects a batch of the data (input {what[0]}, from data.input="
                          f"{job.data.input or 'the ampray schema'}): {type(err).__name__}: {err}") from None
    created = sorted(set(model.state_dict()) - before)
    if created:
        raise ConfigError(f"{label} creates {', '.join(created[:3])} in its forward: a parameter or buffer made "
                          "there is not in the optimizer, not synchronised by DDP/FSDP, and not in the model a "
                          "checkpoint resumes; expected it created in __init__ (nn.Lazy* modules for sizes known "
                          "only from the data)")
    loss_label = f"model.loss={job.model.loss!r}" if job.model.loss else "the default loss (cross-entropy)"
    learnt = [n for n, p in spec.loss.named_parameters() if p.requires_grad] \
        if isinstance(spec.loss, torch.nn.Module) else []
    if learnt:
        raise ConfigError(f"{loss_label} has trainable parameters ({', '.join(learnt[:3])}), which the optimizer "
                          "would never step (it steps the model's, synchronised by DDP/FSDP): expected a loss "
                          "without parameters; make them part of the model (and return what the loss needs)")
    try:
        loss = spec.loss(output, y)
    except Exception as err:
        raise ConfigError(f"{loss_label} fails on the model's output {_describe(output)} and the target {what[1]} "
                          f"(data.target={job.data.target or 'the ampray schema'}): {type(err).__name__}: {err}") from None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        raise ConfigError(f"{loss_label} returned {_describe(loss)}; expected a 0-d floating-point tensor (reduce "
                          "the per-sample losses, e.g. with .mean())")
    try:
        loss.backward()
    except RuntimeError as err:
        raise ConfigError(f"the backward pass of {label} and {loss_label} fails on this machine's CPU ({err}); "
                          "expected a loss computed from the model's output, whose gradient reaches the "
                          "parameters") from None
    if not job.model.loss and not spec.builtin:
        _check_default_loss_targets(job, output, y, stream is not None)
    sparse = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.is_sparse]
    if sparse and job.scaling.num_workers > 1 and job.precision.oom_policy != "raise":
        raise ConfigError(
            f"precision.oom_policy={job.precision.oom_policy!r} is not allowed with scaling.num_workers="
            f"{job.scaling.num_workers} and sparse gradients ({', '.join(sparse[:3])} of {label}): under DDP that "
            "policy makes the engine all-reduce dense gradients itself; expected precision.oom_policy='raise', "
            "or dense embeddings (sparse=False)")
    return tuple(name for name, p in model.named_parameters() if p.requires_grad and p.grad is None)


def _check_default_loss_targets(job: JobConfig, output: Any, y: Any, streamed: bool) -> None:
    """The default loss (cross-entropy) on a user's model: float targets must be class probabilities (in
    [0, 1], each row summing to 1: a regression target would train on nonsense), and, with data.check =
    "full", every integer label of data.path and data.val_path must be a class of the model's output (or
    torch's ignored -100): a label beyond them fails inside a worker (a device-side assert on a GPU)."""
    import torch

    from ampray.models.registry import class_dim, logits_of

    target = f"data.target={job.data.target!r}"
    if y.is_floating_point():
        if not (bool(((y >= 0) & (y <= 1)).all()) and torch.allclose(y.sum(-1).double(), torch.ones((), dtype=torch.double),
                                                                    atol=1e-3)):
            raise ConfigError(f"the default loss (cross-entropy) takes the float {target} as class probabilities (each "
                              f"row's values in [0, 1], summing to 1); its first rows hold {y[:2].flatten()[:6].tolist()}: "
                              "for regression set model.loss (e.g. \"torch.nn.functional:mse_loss\"); for classes, "
                              "store integer labels")
        return
    logits = logits_of(output)
    dim = class_dim(logits, y)
    if streamed or job.data.check != "full" or not job.data.path or dim is None:
        return
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ampray.data.columns import parquet_files

    classes = logits.shape[dim]
    for field, path in (("data.path", job.data.path), ("data.val_path", job.data.val_path)):
        for file in parquet_files(path) if path else []:
            column = pq.read_table(file, columns=[job.data.target]).column(0).combine_chunks()
            while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
                    pa.types.is_fixed_size_list(column.type):
                column = column.flatten()
            if not pa.types.is_integer(column.type) or not len(column):
                continue
            labels = pc.filter(column, pc.not_equal(column, -100))
            if not len(labels):
                continue
            bounds = pc.min_max(labels)
            lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
            if lo < 0 or hi >= classes:
                raise ConfigError(f"{field}={path!r}: {file.name} holds class label {hi if hi >= classes else lo} in "
                                  f"column {job.data.target!r} (labels in [{lo}, {hi}]); the model's output "
                                  f"{tuple(logits.shape)} scores {classes} classes (dimension {dim}), so the default "
                                  f"loss (cross-entropy) expects labels in [0, {classes}) or -100 (ignored): check the "
                                  "model's number of classes (model.options) or the labels")


def _describe(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def check_batch_fits(job: JobConfig, rows: int, num_workers: int) -> None:
    """Every rank's share of the `rows` holds at least one micro-batch; raises ConfigError."""
    if rows < 0:
        return  # a stream of unknown length: Ray Data's shards are checked by the workers
    where = f"data.path={job.data.path!r}" if job.data.path else f"data.num_samples={rows}"
    k = job.precision.gradient_accumulation_steps
    micro, per_rank = job.data.batch_size // k, rows // num_workers
    if micro > per_rank:
        raise ConfigError(
            f"data.batch_size={job.data.batch_size} is not allowed: expected at most "
            f"{per_rank * k} here (with precision.gradient_accumulation_steps={k}, a micro-batch of {micro} "
            f"samples per rank; {where} gives {rows} training rows, {per_rank} for each of {num_workers} workers)")


def streaming_mode(job: JobConfig, plan: DataPlan, node_memory_bytes: float, num_workers: int = 1,
                   given_stream: bool = False) -> bool:
    """Whether the training rows stream through Ray Data: asked for, or (auto) too large to load into every
    worker: each worker holds all of them in memory, so by default they must fit a quarter of the smallest
    node's memory shared by the workers that may land on it. Raises ConfigError where the data cannot
    stream (ampray's schema and the built-in corpus are read whole)."""
    d = job.data
    if given_stream:
        return True
    limit = d.max_in_memory_mb * 2**20 if d.max_in_memory_mb else node_memory_bytes / (4 * max(1, num_workers))
    stream = d.streaming == "true" or (d.streaming == "auto" and plan.bytes > limit)
    if stream and not plan.columns:
        raise ConfigError(f"data.streaming: the data ({plan.bytes / 2**20:.0f} MiB decoded) would stream, which reads "
                          "named columns: give data.input and data.target (or data.streaming = false"
                          + (f" and a data.max_in_memory_mb above {plan.bytes / 2**20:.0f}" if d.streaming == "auto"
                             else "") + ")")
    if stream and d.val_fraction:
        raise ConfigError(f"data.val_fraction={d.val_fraction} is not allowed when the training data streams (a "
                          "stream cannot be split the same way on every rank): expected data.val_path, a held-out "
                          "Parquet file or folder")
    return stream


# --- A rerun against its checkpoint ----------------------------------------------------------------

# What a rerun of a run may change. Everything else shapes the saved state (model, optimizer, data order,
# engine), would be overwritten by it on restore, or changes what the next step computes, and must match.
# The world size is compared separately: the data position is counted per rank.
_MAY_CHANGE = frozenset({
    "model.compile", "scaling.find_unused_parameters",
    "run.eval_every", "run.eval_batches", "data.eval_batch_size", "data.val_path", "data.max_in_memory_mb",
    "data.check", "data.fill_gpu",
    "run.steps", "run.report_every", "run.checkpoint_every", "run.num_to_keep", "run.max_failures",
    "run.address", "run.storage_path", "run.name",
    "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
    "scaling.allreduce_dtype", "scaling.bind_cpus",
})


def _may_change(key: str) -> bool:
    from ampray.amp import settings

    # The loss scaler's live settings and the adaptation's: the worker applies changes through the
    # engine's setters after the restore (what a PBT mutation does).
    return key in _MAY_CHANGE or key.startswith("precision.") and settings.is_live(key)


def check_resume(job: JobConfig, num_workers: int, spec: ModelSpec | None = None) -> list[str]:
    """Compare a rerun with the run's latest checkpoint. Raises ConfigError naming every field that must
    not change and does, and (given the model's `spec`) every parameter or buffer whose name or shape
    differs from the checkpoint's (the model's code changed); returns notes for the user (where it
    resumes, allowed changes that matter; empty for a new run)."""
    checkpoint = latest_checkpoint(job.run_dir())
    if checkpoint is None:
        return []
    if spec is not None:
        _check_model_matches(job, spec, checkpoint)
    try:
        saved = _flatten(tomllib.loads((checkpoint / "job.toml").read_text()))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"run {job.run.name!r} would resume from {checkpoint}, whose job.toml cannot be "
                          f"read ({err}); give this run a new --name") from None
    saved, now = _comparable(saved), _comparable(job.flat())
    # A field only one side knows (added or removed by an upgrade of ampray) is not compared. A model option
    # set on one side only is: against the factory's default for it, when its signature has one.
    defaults = _factory_defaults(spec)
    for key in {k for k in saved.keys() ^ now.keys() if k.startswith("model.options.")}:
        option = key.removeprefix("model.options.")
        for side in (saved, now):
            side.setdefault(key, defaults.get(option, _UNSET))
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
    then_val, now_val = (absolute_data_path(v) if v else "" for v in (saved.get("data.val_path"), now.get("data.val_path")))
    if at == job.run.steps and now_val and then_val != now_val:
        notes.append(f"data.val_path={now_val!r} (the run was trained with {then_val or 'none'!r}): the final "
                     "model is evaluated on it")
    before, after = saved.get("run.steps"), job.run.steps
    if before != after and job.optimizer.schedule == "cosine":
        notes.append(f"run.steps changed from {before} to {after}: the cosine learning-rate schedule now ends "
                     f"at step {after}, so the learning rate continues from where that curve stands")
    return notes


def _check_model_matches(job: JobConfig, spec: ModelSpec, checkpoint: Path) -> None:
    """The model the job builds now has the checkpoint's state dict keys and shapes (read from a DDP
    checkpoint's state.pt through a memory map: no tensor data is read). A factory that cannot build on
    the meta device, or a sharded checkpoint, is left to the workers' load."""
    import torch

    from ampray.actors.checkpoint import STATE_FILE, unwrap

    path = checkpoint / STATE_FILE
    model = meta_model(job, spec)
    if model is None:
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = state.get("model") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            return
        # Tensors only: a module's extra state (get_extra_state) may be any object.
        from torch.nn.parameter import is_lazy

        # A lazy module's shape is known only after a forward: its key is compared, not its shape.
        now = {k: None if is_lazy(v) else tuple(v.shape) for k, v in unwrap(model).state_dict().items()
               if isinstance(v, torch.Tensor)}
        then = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - the workers load (and report) it
        return
    diffs = [f"{k}: {then[k]} in the checkpoint, {now[k]} now" for k in now
             if k in then and now[k] is not None and now[k] != then[k]]
    diffs += [f"{k}: not in the checkpoint" for k in now if k not in then]
    diffs += [f"{k}: in the checkpoint, not in the model now" for k in then if k not in now]
    if diffs:
        shown = "\n  ".join(diffs[:6]) + (f"\n  ... and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"run {job.run.name!r} resumes from {checkpoint.name}, but the model built now "
                          f"({job.model.factory or job.model.kind}) does not match the one it saved (its code or "
                          f"options changed):\n  {shown}\nStart a new run with --name NEW, or restore the "
                          "model's code.")


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


class _Unset:
    def __repr__(self) -> str:
        return "not set"


_UNSET = _Unset()  # an option one side leaves out, where the factory's signature has no default


def _factory_defaults(spec: ModelSpec | None) -> dict[str, Any]:
    """The keyword defaults of a user's factory (`def build(width=64, ...)`): what an option left out is."""
    import inspect

    if spec is None or spec.builtin:
        return {}
    try:
        parameters = inspect.signature(spec.build).parameters.values()
    except (TypeError, ValueError):
        return {}
    # As the job's flat values hold them: a list or tuple as "4,4".
    return {p.name: ",".join(map(str, p.default)) if isinstance(p.default, (list, tuple)) else p.default
            for p in parameters if p.default is not inspect.Parameter.empty}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


# --- Where the run writes --------------------------------------------------------------------------

PROBE_BYTES = 8 * 2**20
"""What the storage probe writes: a real amount, so that a nearly full disk fails here, before training,
and not as a truncated checkpoint later (an empty probe file succeeds on a full disk)."""


def check_storage(folder: Path, field: str, value: str, what: str = "run folder", probe_bytes: int = PROBE_BYTES) -> Path:
    """Create `folder` (a run's or a search's) and write and remove `probe_bytes` in it; raises ConfigError
    naming `field`=`value`, the reason and the free space."""
    import os
    import shutil

    probe = folder / f".write-test-{os.getpid()}"
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            chunk = b"\0" * min(probe_bytes, 2**20)
            for _ in range(max(1, probe_bytes // len(chunk))):
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())  # a delayed-allocation file system reports a full disk here
    except OSError as err:
        free = _free_space(folder, shutil)
        raise ConfigError(f"{field}={value!r} is not allowed: cannot create and write the {what} {folder} "
                          f"({err.strerror or err}){free}; expected a writable folder with room for checkpoints "
                          f"(this check writes {probe_bytes / 2**20:.0f} MiB)") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder


def _free_space(folder: Path, shutil) -> str:
    for where in (folder, *folder.parents):
        if where.is_dir():
            try:
                return f"; {shutil.disk_usage(where).free / 2**20:.0f} MiB free on the file system of {where}"
            except OSError:
                return ""
    return ""


def trained_job_field(job: JobConfig, key: str) -> Any:
    """The value of `key` ("data.batch_size") in the job.toml of the run's latest checkpoint (what a rerun
    resumes from), or None: no checkpoint (the run starts at step 0), or a job.toml that cannot be read
    (check_resume reports that)."""
    checkpoint = latest_checkpoint(job.run_dir())
    if checkpoint is None:
        return None
    try:
        return _flatten(tomllib.loads((checkpoint / "job.toml").read_text())).get(key)
    except (OSError, ValueError, tomllib.TOMLDecodeError):
        return None
