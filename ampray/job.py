"""JobConfig: what `ampray train` runs. Sections as small dataclasses, validated before any worker starts.

Precedence: command-line overrides > TOML file > defaults. The resolved config is saved beside every run
(`<storage_path>/<name>/job.toml`) and inside every checkpoint.

    [model]      kind = "gpt", options = {preset = "micro"}
    [data]       path = "/data/corpus" (Parquet from `ampray data synth`), or none for the built-in corpus
    [precision]  the engine's MixedPrecisionConfig (dtype, init_scale, hysteresis, ...; [precision.adaptation])
    [optimizer]  name, lr, weight_decay, warmup_steps, schedule
    [scaling]    num_workers, use_gpu, cpus_per_worker, gpus_per_worker
    [run]        name, storage_path, steps, report_every, checkpoint_every, num_to_keep, max_failures, ...
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ampray.amp.config import (ConfigError, MixedPrecisionConfig, _check_choice, _check_type, _fail, _known,
                               set_dotted)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _validate(obj: Any) -> None:
    """Type-check a section's fields; errors name them as the job file and the CLI do (`run.steps`).
    A number given for a text field is taken as its text (`--run.name 2024` names the run "2024")."""
    section = type(obj).__name__.removesuffix("Section").lower()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.type == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
            setattr(obj, f.name, value)
        _check_type(section, f, value)


@dataclass
class ModelSection:
    """Which model to train: a built-in kind, or your own factory and loss by import path."""

    kind: str = "mlp"
    """mlp, cnn or gpt (the built-in zoo); "custom" (set by itself) with model.factory."""
    factory: str = ""
    """Your model: "package.module:function" (found in the working folder or on PYTHONPATH, shipped to every
    worker), called with [model.options] as keyword arguments; it returns an nn.Module."""
    loss: str = ""
    """"package.module:function", criterion(output, target) -> 0-d tensor; empty: the built-in kind's loss,
    or cross-entropy over the output's last dimension for a factory."""
    options: dict = field(default_factory=dict)
    """Keyword arguments of the factory, or of the built-in model's config (gpt: preset = "nano" | "micro" |
    "small", ...)."""
    compile: bool = False
    """torch.compile the model on every worker (in place: checkpoints keep their keys). Fewer, fused kernels
    cut the host's work per step, which bounds GPT-2 small at small micro-batches on an H200; the first
    steps pay for the compilation. Needs a C compiler on the workers (and Triton with CUDA)."""

    def __post_init__(self) -> None:
        from ampray.models import MODEL_KINDS, build_config
        from ampray.models.registry import ImportPathError, split_import_path

        _validate(self)
        if not isinstance(self.options, dict):
            _fail("model", "options", self.options, 'a table of keyword arguments, such as {preset = "micro"}')
        _check_toml_values("model.options", self.options)
        try:
            for name in ("factory", "loss"):
                if getattr(self, name):
                    split_import_path(getattr(self, name), f"model.{name}")
        except ImportPathError as err:
            raise ConfigError(str(err)) from None
        if self.factory:
            # The user's code is imported where it runs (pre-flight, workers), never by a config parse.
            self.kind = "custom"
            return
        if self.kind == "custom":
            _fail("model", "factory", "", 'an import path "package.module:function" with model.kind = "custom"')
        if self.kind not in MODEL_KINDS:
            _fail("model", "kind", self.kind, f"one of {list(MODEL_KINDS)}, or model.factory for your own model")
        try:
            build_config(self.kind, **self.options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.options={self.options!r} is not allowed: {err}") from None


def _check_toml_values(where: str, value: Any) -> None:
    """What a job file can hold (the run's job.toml, saved before the workers start, and each checkpoint's):
    strings, numbers, booleans, dates, and lists and tables of them; None and objects are refused naming
    the option."""
    import datetime

    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                _fail(*where.split(".", 1), value, f"a table with string keys (got the key {key!r})")
            _check_toml_values(f"{where}.{key}", item)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_toml_values(f"{where}[{i}]", item)
    elif value is None:
        raise ConfigError(f"{where}=None is not allowed: a job file cannot hold None (TOML has no null); expected a "
                          "value, or the option left out so that the factory's default applies")
    elif not isinstance(value, (str, int, float, bool, datetime.date, datetime.time)):
        raise ConfigError(f"{where}={value!r} is not allowed: a {type(value).__name__} cannot be saved in a job "
                          "file; expected a string, number, boolean, or a list or table of them (build objects in "
                          "the factory from such values)")


@dataclass
class DataSection:
    """Where batches come from: the built-in corpus, ampray's Parquet schema, or your own columns."""

    path: str = ""
    """A Parquet file or folder; empty: the built-in corpus (built-in kinds only). Data in ampray's schema
    (`ampray data synth`) needs no columns named; any other data names them in data.input and data.target."""
    val_path: str = ""
    """A held-out Parquet file or folder with the same columns, evaluated every run.eval_every steps."""
    val_fraction: float = 0.0
    """Instead of val_path: this fraction of the rows (seeded by data.seed) is held out for evaluation."""
    input: str | list = ""
    """Column(s) that make the model's input: one name (the model gets a tensor) or a list of names (the model
    gets a dict {column: tensor}, or a tuple with input_format = "tuple"; also for a list of one)."""
    target: str = ""
    """The column the loss compares the model's output with."""
    input_format: str = "dict"
    """With several input columns: dict (model(x) with x = {column: tensor}) or tuple (in data.input's order)."""
    pad_to: int = 0
    """Variable-length list columns are padded with pad_value to this length; 0: each column to its longest
    row in the training and held-out files (found before training, kept in data.pad_widths)."""
    pad_widths: dict = field(default_factory=dict)
    """Set by ampray when pad_to is 0: each variable-length column's width, saved with the run so that a
    rerun pads as the run was trained."""
    pad_value: float = 0.0
    """The value padding fills the input columns with (the target's too, unless target_pad_value says)."""
    target_pad_value: str | float = "auto"
    """The value padding fills a variable-length target column with. auto: -100 for an integer target under
    the default loss (cross-entropy ignores it, and so does the accuracy: padded positions count for
    nothing), else data.pad_value; a number: that value."""
    streaming: str = "auto"
    """auto, true or false: stream the rows through Ray Data (ray.data.read_parquet, one shard per worker)
    instead of loading them into every worker; auto streams data larger than data.max_in_memory_mb."""
    max_in_memory_mb: float = 0.0
    """auto: data whose size as tensors is above this streams (every worker holds all of it in memory); 0: a
    quarter of the smallest node's memory divided by the number of workers."""
    num_samples: int = 4096
    """Rows of the built-in corpus (ignored with a path)."""
    seed: int = 0
    """Seed of the built-in corpus, of the shuffling and of val_fraction's split."""
    batch_size: int = 64
    """Samples per worker per optimizer step (micro-batches are batch_size / accumulation steps)."""
    fill_gpu: bool = False
    """On GPU workers, choose batch_size to fill the GPU: before the workers start, a task on one GPU runs
    training steps at the micro-batch of batch_size, then twice it, and so on, while the step fits in 85% of
    the GPU's memory and each doubling raises the samples per second by 5% or more (ampray.actors.batch_probe).
    `ampray train` turns it on for GPU workers when data.batch_size is not set; a rerun keeps the batch it
    was trained with."""
    eval_batch_size: int = 0
    """Samples per evaluation batch; 0: the training micro-batch."""
    check: str = "full"
    """full, schema or off: what the driver checks of every shard of data.path and data.val_path before any
    worker starts. schema: the footers (schema version, columns, types, shapes); full: also every value, streamed
    (nulls, non-finite floats, token ids and labels in the model's range, page checksums); off: neither."""

    def __post_init__(self) -> None:
        if isinstance(self.streaming, bool):
            self.streaming = "true" if self.streaming else "false"
        _validate(self)
        if not isinstance(self.input, (str, list)) or not all(isinstance(c, str) and c for c in self.input_columns):
            _fail("data", "input", self.input, "a column name or a list of column names")
        if len(set(self.input_columns)) != len(self.input_columns):
            _fail("data", "input", self.input, "distinct column names")
        if self.target and self.target in self.input_columns:
            _fail("data", "target", self.target, "a column that is not also an input column")
        if bool(self.input_columns) != bool(self.target):
            missing = "target" if self.input else "input"
            _fail("data", missing, "", "a column name: data.input and data.target go together")
        _check_choice("data", "input_format", self.input_format, ("dict", "tuple"))
        value = self.target_pad_value
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not math.isfinite(value)):
            _fail("data", "target_pad_value", value, "auto or a finite number")
        _check_choice("data", "streaming", self.streaming, ("auto", "true", "false"))
        _check_choice("data", "check", self.check, ("full", "schema", "off"))
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                _fail("data", name, getattr(self, name), "an integer >= 1")
        for name in ("pad_to", "eval_batch_size"):
            if getattr(self, name) < 0:
                _fail("data", name, getattr(self, name), "an integer >= 0")
        if self.max_in_memory_mb < 0:
            _fail("data", "max_in_memory_mb", self.max_in_memory_mb, "a number >= 0 (0: automatic)")
        if not 0 <= self.val_fraction < 1:
            _fail("data", "val_fraction", self.val_fraction, "a fraction in [0, 1) (0: none)")
        if self.val_fraction and self.val_path:
            _fail("data", "val_fraction", self.val_fraction, "0 when data.val_path is given (one held-out set)")
        _check_seed("data", self.seed)
        for name in ("path", "val_path"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().exists():
                _fail("data", name, value, "an existing Parquet file or folder (see `ampray data synth --out DIR`)")

    @property
    def input_columns(self) -> list[str]:
        """data.input as a list of column names."""
        return [self.input] if isinstance(self.input, str) and self.input else list(self.input or [])

    @property
    def columns(self) -> bool:
        """Whether the data is read by named columns (your own schema) rather than ampray's."""
        return bool(self.input_columns)

    @property
    def read_columns(self) -> list[str]:
        """Every column training reads: the inputs, then the target."""
        return [*self.input_columns, self.target]


@dataclass
class OptimizerSection:
    """The optimizer and its learning-rate schedule."""

    name: str = "adamw"
    """adamw, adam or sgd."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    schedule: str = "cosine"
    """constant or cosine (decays to min_lr_ratio * lr at the last step)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine)."""

    def __post_init__(self) -> None:
        _validate(self)
        _check_choice("optimizer", "name", self.name, ("adamw", "adam", "sgd"))
        _check_choice("optimizer", "schedule", self.schedule, ("constant", "cosine"))
        if not self.lr > 0:
            _fail("optimizer", "lr", self.lr, "a number > 0")
        if self.weight_decay < 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            bad = next(n for n in ("weight_decay", "warmup_steps", "min_lr_ratio")
                       if getattr(self, n) < 0 or (n == "min_lr_ratio" and getattr(self, n) > 1))
            _fail("optimizer", bad, getattr(self, bad), "a number >= 0 (min_lr_ratio: in [0, 1])")


@dataclass
class ScalingSection:
    """How many Ray Train workers, and what each gets."""

    num_workers: int = -1
    """Workers (one process each); -1: one per GPU of the cluster (on a `ray up` cluster, every GPU its
    autoscaler can add), or 2 CPU workers without GPUs."""
    use_gpu: str = "auto"
    """auto (GPUs when the cluster has them), true or false."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu (fractions share a GPU)."""
    allreduce_dtype: str = "fp32"
    """Type of the gradients in DDP's all-reduce: fp32 (exact), or bf16/fp16 (DDP compression hook: half the
    bytes on the wire, gradients rounded to 8/11 significant bits before averaging; bf16 needs NCCL, i.e.
    GPUs). Gradient accumulation (precision.gradient_accumulation_steps) also cuts traffic: micro-steps
    skip the all-reduce."""
    find_unused_parameters: str = "auto"
    """auto, true or false: DDP looks for parameters the loss leaves without a gradient in each step (slower;
    needed when some are, such as an auxiliary head the loss ignores); auto: when one real batch on the
    driver leaves some without a gradient."""
    bind_cpus: bool = False
    """Bind each worker to its own block of whole physical cores of its node (ampray.actors.affinity):
    the busy threads of two workers then never share a core's hardware threads."""
    strategy: str = "ddp"
    """ddp: every worker holds the whole model, gradients all-reduced (DistributedDataParallel); fsdp:
    parameters, gradients and optimizer state sharded over the workers (FSDP2, `fully_shard` per block and
    on the root), for models whose training state does not fit one GPU. fsdp reduce-scatters gradients in
    scaling.allreduce_dtype (fp32 by default) and computes in precision.dtype."""
    fsdp_blocks: list = field(default_factory=list)
    """fsdp: the modules sharded one by one (each all-gathered only while it runs): class names, or
    "package.module:function" import paths of a wrap policy, function(module) -> bool (shipped to the
    workers like model.factory); every entry must select some module of the model. Empty: the built-in
    gpt's "Block", else the classes of the modules held in an nn.ModuleList (a transformer's layers), else
    only the whole model."""
    fsdp_cpu_offload: bool = False
    """fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory (slower; fits larger
    models)."""
    activation_checkpointing: bool = False
    """fsdp: recompute each sharded block's activations in backward instead of keeping them (less memory,
    about a third more compute)."""

    def __post_init__(self) -> None:
        for name in ("use_gpu", "find_unused_parameters"):
            if isinstance(getattr(self, name), bool):
                setattr(self, name, "true" if getattr(self, name) else "false")
        if isinstance(self.fsdp_blocks, (tuple, str)):
            self.fsdp_blocks = [self.fsdp_blocks] if isinstance(self.fsdp_blocks, str) else list(self.fsdp_blocks)
        _validate(self)
        _check_choice("scaling", "strategy", self.strategy, ("ddp", "fsdp"))
        if not all(isinstance(b, str) and b for b in self.fsdp_blocks):
            _fail("scaling", "fsdp_blocks", self.fsdp_blocks, "a list of module class names or \"package.module:"
                  "function\" import paths of a wrap policy (non-empty strings)")
        if self.strategy != "fsdp":
            for name in ("fsdp_blocks", "fsdp_cpu_offload", "activation_checkpointing"):
                if getattr(self, name):
                    _fail("scaling", name, getattr(self, name), "its default unless scaling.strategy = 'fsdp'")
        _check_choice("scaling", "use_gpu", self.use_gpu, ("auto", "true", "false"))
        _check_choice("scaling", "allreduce_dtype", self.allreduce_dtype, ("fp32", "bf16", "fp16"))
        _check_choice("scaling", "find_unused_parameters", self.find_unused_parameters, ("auto", "true", "false"))
        if self.num_workers < 1 and self.num_workers != -1:
            _fail("scaling", "num_workers", self.num_workers, "an integer >= 1 (or -1: automatic)")
        if not self.cpus_per_worker > 0 or not self.gpus_per_worker > 0:
            bad = "cpus_per_worker" if not self.cpus_per_worker > 0 else "gpus_per_worker"
            _fail("scaling", bad, getattr(self, bad), "a number > 0")


@dataclass
class RunSection:
    """Length, reporting, checkpoints and where it all goes."""

    name: str = "ampray"
    """Run name: the same name and storage_path resume from the latest checkpoint."""
    storage_path: str = "runs"
    """Folder holding one sub-folder per run (TensorBoard events, checkpoints, job.toml)."""
    steps: int = 200
    """Optimizer steps to train."""
    report_every: int = 20
    """Optimizer steps between reports of every rank's records."""
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (one is also written at the end)."""
    num_to_keep: int = 2
    """Checkpoints kept; older ones are deleted."""
    max_failures: int = 0
    """Worker-group restarts from the latest checkpoint after a crash."""
    seed: int = 0
    """Seed of model initialisation (the same on every rank)."""
    eval_every: int = 0
    """Optimizer steps between held-out evaluations (with data.val_path or data.val_fraction; also at the
    end); 0: at every report. A multiple of report_every: evaluations travel in reports."""
    eval_batches: int = 0
    """Batches per rank per evaluation; 0: the rank's whole share of the held-out set."""
    adaptive: bool = True
    """Use AdaptiveMixedPrecisionTrainer."""
    on_divergence: str = "stop"
    """When the engine raises ScaleCollapseError, TrainingStalledError or NonFiniteLossError: "stop" the run
    with the reason, or "rollback": every rank reloads the newest verified checkpoint, eases the precision
    (fp16 -> bf16, else gentler loss scaling), skips the batches that diverged and goes on (README)."""
    max_rollbacks: int = 2
    """Rollbacks a run may make with on_divergence="rollback"; the next divergence stops it."""
    address: str = ""
    """Ray cluster address ("auto", "ray://host:10001"); empty: an embedded local cluster."""

    def __post_init__(self) -> None:
        _validate(self)
        for name in ("steps", "report_every", "checkpoint_every", "num_to_keep"):
            if getattr(self, name) < 1:
                _fail("run", name, getattr(self, name), "an integer >= 1")
        for name in ("eval_every", "eval_batches"):
            if getattr(self, name) < 0:
                _fail("run", name, getattr(self, name), "an integer >= 0")
        if self.eval_every % self.report_every:
            _fail("run", "eval_every", self.eval_every, f"a multiple of run.report_every={self.report_every} (0: "
                  "every report)")
        if self.max_failures < -1:
            _fail("run", "max_failures", self.max_failures, "an integer >= 0 (or -1: unlimited)")
        _check_choice("run", "on_divergence", self.on_divergence, ("stop", "rollback"))
        if self.max_rollbacks < 0:
            _fail("run", "max_rollbacks", self.max_rollbacks, "an integer >= 0")
        check_folder_name("run", "name", self.name)
        _check_seed("run", self.seed)
        if self.address and not _address_form(self.address):
            _fail("run", "address", self.address, "auto, host:port of a running cluster's head (such as "
                  "127.0.0.1:6379) or ray://host:10001; empty: an embedded local cluster")
        if "://" in self.storage_path:
            _fail("run", "storage_path", self.storage_path, "a folder every node sees (a local path, or a "
                  "shared file system mounted on every node); object stores such as s3:// are not supported")


MAX_SEED = 2**32 - 1
MAX_NAME_BYTES = 200
"""Longest run or search name: file systems take 255 bytes per folder name, and ampray adds suffixes
(`<search>-best`, a trial's `-g<n>`)."""


def check_folder_name(section: str, name: str, value: str) -> None:
    """A run or search name is one folder under storage_path: not empty, no '/', not hidden, not too long
    (a 300-character name would otherwise fail as an unwritable storage_path)."""
    if not value or "/" in value or "\0" in value or value.startswith("."):
        _fail(section, name, value, "a non-empty folder name without '/', not starting with '.'")
    if len(value.encode()) > MAX_NAME_BYTES:
        _fail(section, name, f"{value[:20]}...", f"a name of at most {MAX_NAME_BYTES} bytes (this one has "
              f"{len(value.encode())}; a folder name may have 255, and ampray adds suffixes)")


def _address_form(address: str) -> bool:
    if address == "auto":
        return True
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    return bool(sep and host and "/" not in host and port.isdigit() and 0 < int(port) < 65536)


def _check_seed(section: str, seed: int) -> None:
    # Workers derive per-rank and per-epoch seeds from it (seed * 1000 + rank + 1, seed + epoch), which
    # torch.manual_seed must still take.
    if not 0 <= seed <= MAX_SEED:
        _fail(section, "seed", seed, f"an integer in [0, {MAX_SEED}]")


_SECTIONS = {"model": ModelSection, "data": DataSection, "precision": MixedPrecisionConfig,
             "optimizer": OptimizerSection, "scaling": ScalingSection, "run": RunSection}


@dataclass
class JobConfig:
    """A training job: every section validated at construction."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        k = self.precision.gradient_accumulation_steps
        if self.data.batch_size % k:
            _fail("data", "batch_size", self.data.batch_size,
                  f"a multiple of precision.gradient_accumulation_steps={k}")
        if self.scaling.allreduce_dtype == "fp16" and not self.precision.scaling_enabled:
            # Unscaled gradients are small: in fp16 many would round to zero on the way.
            _fail("scaling", "allreduce_dtype", "fp16", "bf16 or fp32 unless the gradients are loss-scaled "
                  "(precision.dtype=fp16 with grad scaling on)")
        if self.scaling.strategy == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What scaling.strategy = "fsdp" cannot do (yet), refused before any worker starts."""
        p, why = self.precision, "with scaling.strategy='fsdp'"
        if p.oom_policy != "raise":
            _fail("precision", "oom_policy", p.oom_policy, f"'raise' {why}: its forward all-gathers every block's "
                  "parameters, so a rank out of memory leaves the others waiting before the ranks could agree")
        if self.model.compile:
            _fail("model", "compile", True, f"false {why} (compiling a sharded model is not supported by ampray yet)")
        if self.data.fill_gpu:
            _fail("data", "fill_gpu", True, f"false {why}: the probe measures the unsharded model, which is not "
                  "what a sharded worker holds; set data.batch_size")
        if p.autocast_enabled and _dtype_label(p.dtype) == "fp16":
            for name in ("collapse_policy", "stall_policy"):
                if getattr(p, name) == "fallback_bf16":
                    _fail("precision", name, "fallback_bf16", f"'raise' {why} and fp16: FSDP keeps the parameters "
                          "cast to fp16 for the whole run (choose precision.dtype='bf16' instead)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        data = _known(cls, data, "the job's sections")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            value = data.get(name, {})
            if isinstance(value, section_cls):
                sections[name] = value
            elif section_cls is MixedPrecisionConfig:
                try:
                    sections[name] = MixedPrecisionConfig.from_dict(value)
                except ConfigError as err:  # named as in the job file: precision.x, precision.adaptation.x
                    text = str(err)
                    for owner, label in (("MixedPrecisionConfig", "precision"), ("AdaptationConfig", "precision.adaptation")):
                        if text.startswith(owner + "."):  # a field's value
                            raise ConfigError(f"{label}.{text.removeprefix(owner + '.')}") from None
                        if text.startswith(owner + ":"):  # the table itself (an unknown field)
                            raise ConfigError(f"[{label}]:{text.removeprefix(owner + ':')}") from None
                    raise
            else:
                sections[name] = section_cls(**_known(section_cls, value, f"[{name}]"))
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS if name != "precision"}
        out["precision"] = self.precision.to_dict()
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "JobConfig":
        """Defaults < TOML file < overrides ({"precision.dtype": "bf16", ...})."""
        data: dict[str, Any] = {}
        if path:
            p = Path(path).expanduser()
            if not p.is_file():
                raise ConfigError(f"--config {str(path)!r}: no such file")
            try:
                data = tomllib.loads(p.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as err:  # a binary file (a checkpoint, a Parquet file) given by mistake
                raise ConfigError(f"--config {str(path)!r}: not a TOML text file (byte {err.object[err.start]:#04x} at "
                                  f"offset {err.start} is not UTF-8); expected a job file such as a run's "
                                  "job.toml") from None
            except OSError as err:
                raise ConfigError(f"--config {str(path)!r}: cannot be read ({err.strerror or err})") from None
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"--config {str(path)!r}: not valid TOML: {err}") from None
        from_file = copy.deepcopy(data)
        for dotted, value in (overrides or {}).items():
            _set_dotted(data, dotted, value)
        try:
            job = cls.from_dict(data)
            # The fields the file and overrides set (ampray.fit applies the CLI's defaults to the others).
            job.given = frozenset(_flatten(from_file)) | frozenset(overrides or {})
            return job
        except ConfigError as err:
            if path:  # the file's own mistake (the file alone fails the same way), not an override's?
                try:
                    cls.from_dict(from_file)
                except ConfigError as own:
                    if str(own) == str(err):
                        raise ConfigError(f"--config {str(path)!r}: {err}") from None
            raise

    def run_dir(self) -> Path:
        return Path(self.run.storage_path).expanduser().resolve() / self.run.name

    def flat(self) -> dict[str, Any]:
        """Dotted keys and plain values: TensorBoard HParams, Parquet columns, Tune spaces."""
        return _flatten(self.to_dict())


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if len(keys) < 2 or keys[0] not in _SECTIONS:
        raise ConfigError(f"override --{dotted}: expected <section>.<field> with section in {list(_SECTIONS)}")
    set_dotted(data, dotted, value)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out


def absolute_paths(job: JobConfig) -> JobConfig:
    """The job with data.path and data.val_path as the driver sees them: Ray starts each worker in a folder
    of its own, where a relative path would name nothing."""
    paths = {name: absolute_data_path(value) for name in ("path", "val_path") if (value := getattr(job.data, name))}
    return dataclasses.replace(job, data=dataclasses.replace(job.data, **paths)) if paths else job


def absolute_data_path(path: str) -> str:
    """A relative path joined to the driver's folder; an absolute one, or one under `~` (each worker's own
    home), as given: links are not resolved, since the driver's link targets may not be the workers'."""
    return path if path.startswith("~") or os.path.isabs(path) else os.path.abspath(path)


def fields_help() -> str:
    """Every job field with its default, one section a paragraph (`ampray train --help`)."""
    import textwrap

    defaults = JobConfig().to_dict()
    lines = ["job fields and their defaults (README.md says what each does):"]
    for section, values in defaults.items():
        flat = _flatten(values)
        text = " ".join(f"{key}={value!r}" for key, value in flat.items())
        if section == "model":
            text += (" options: the factory's keyword arguments, or the built-in model config's fields "
                     "(--model.options.hidden 256; gpt: --model.options.preset nano|micro|small)")
        lines += textwrap.wrap(text, width=110, initial_indent=f"  [{section}] ", subsequent_indent="      ",
                               break_on_hyphens=False)
    return "\n".join(lines)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--precision.dtype bf16 --scaling.num_workers=4` -> {"precision.dtype": "bf16", ...}; values are read
    as TOML literals (numbers, booleans, quoted strings, [lists]) and otherwise kept as strings."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 2
        value = _literal(raw)
        if _is_text_field(key) and not (isinstance(value, str) and raw[:1] in "\"'"):
            value = raw  # as typed, unless it was a quoted TOML string
        out[key] = value
    return out


def _is_text_field(dotted: str) -> bool:
    """Whether `section.field` names a text field: its value is taken as typed (`--run.name 1.10` is the
    run "1.10", not the number 1.1 written back as "1.1"; a date-like name stays a name)."""
    from ampray.amp.config import AdaptationConfig

    keys = dotted.split(".")
    owner: Any = _SECTIONS.get(keys[0])
    if owner is MixedPrecisionConfig and len(keys) == 3 and keys[1] == "adaptation":
        owner, keys = AdaptationConfig, keys[1:]
    if owner is None or len(keys) != 2:
        return False
    types = {f.name: f.type for f in dataclasses.fields(owner)}
    return types.get(keys[1]) == "str"


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def given_fields(path: str | Path | None, overrides: dict[str, Any]) -> set[str]:
    """The dotted fields that the job file and the overrides set; the others keep their defaults. Call it
    after `JobConfig.load` has accepted the same file."""
    data = tomllib.loads(Path(path).expanduser().read_bytes().decode("utf-8")) if path else {}
    return set(_flatten(data)) | set(overrides)


SCALER_SETTINGS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "hysteresis",
                   "hysteresis_refill", "min_scale", "max_scale", "use_dynamic_loss_scaling")
"""The loss scaler's settings: they act only where loss scaling runs (fp16, or bf16 with bf16_grad_scaling)."""


def precision_notes(job: JobConfig) -> list[str]:
    """Settings that contradict the precision and so do nothing (a note, not an error: the run is valid)."""
    p, default = job.precision, MixedPrecisionConfig()
    notes = []
    if p.autocast_enabled and _dtype_label(p.dtype) == "fp16" and p.bf16_grad_scaling:
        notes.append("precision.bf16_grad_scaling=true has no effect with precision.dtype='fp16': it asks for "
                     "loss scaling under bf16 (fp16 is loss-scaled unless precision.use_grad_scaling=false)")
    if not p.scaling_enabled:
        changed = [f"precision.{k}={getattr(p, k)!r}" for k in SCALER_SETTINGS if getattr(p, k) != getattr(default, k)]
        if changed:
            why = ("precision.enabled=false" if not p.enabled else
                   "precision.use_grad_scaling=false" if not p.use_grad_scaling else
                   f"precision.dtype={_dtype_label(p.dtype)!r} runs without loss scaling")
            notes.append(f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect: {why} (the "
                         "loss scaler runs for fp16, or for bf16 with precision.bf16_grad_scaling=true)")
    return notes


def _dtype_label(dtype: Any) -> str:
    from ampray.amp.config import dtype_name, parse_dtype

    name = dtype_name(parse_dtype(dtype))
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(name, name)


CPU_FP16_NOTE = ("fp16 autocast is emulated on CPU: the models run 15-30x slower than under bf16 or fp32 "
                 "(`ampray recommend` says which to use)")


def choose_precision(job: JobConfig, use_gpu: bool, given: set[str], trained: str | None = None,
                     gpu_bf16: bool | None = None) -> tuple[JobConfig, str | None]:
    """The job's precision on its workers, and a note saying what was chosen. A precision the user did not
    set becomes bf16 on CPU workers (fp16 is emulated there) and on GPUs that run bf16 at full speed
    (`gpu_bf16`: compute capability 8.0 or newer; None: not known on the driver, as for a remote cluster,
    where the default fp16 stands). It stays as it is where bf16 would change what the user asked for: a
    run trained before (`trained`, its saved dtype) keeps its own, and loss-scaler settings the user set
    keep fp16 (bf16 runs unscaled, so they would do nothing)."""
    if not job.precision.enabled:
        return job, None
    if use_gpu:
        if "precision.dtype" in given:
            return job, None
        if trained is not None:  # whatever this machine has: a rerun resumes in the dtype it was trained in
            return _with_dtype(job, trained), f"precision.dtype={_dtype_label(trained)!r}: as the run was trained"
        if not gpu_bf16 or _scaler_fields(job, given):
            return job, None
        return _with_dtype(job, "bf16"), ("precision.dtype='bf16' chosen for GPU workers (none was set): these GPUs "
                                          "run bf16 as fast as fp16, without loss scaling (no skipped steps, no "
                                          "scaler to tune); --precision.dtype fp16 to choose another")
    if "precision.dtype" in given:
        label = _dtype_label(job.precision.dtype)
        return job, (f"precision.dtype='fp16' on CPU workers: {CPU_FP16_NOTE}" if label == "fp16" else None)
    if trained is not None:
        return _with_dtype(job, trained), f"precision.dtype={_dtype_label(trained)!r}: as the run was trained"
    scaler = _scaler_fields(job, given)
    if scaler:
        return job, (f"precision.dtype='fp16' (the default) kept on CPU workers, since {', '.join(scaler)} "
                     "act only with loss scaling, which bf16 does not run; "
                     f"{CPU_FP16_NOTE}; --precision.dtype bf16 to train faster unscaled")
    return _with_dtype(job, "bf16"), ("precision.dtype='bf16' chosen for CPU workers (none was set): "
                                      f"{CPU_FP16_NOTE}; --precision.dtype fp16 or fp32 to choose another")


def _scaler_fields(job: JobConfig, given: set[str]) -> list[str]:
    """The settings the user gave that act only with loss scaling (so they keep fp16)."""
    scaler = [f"precision.{k}" for k in (*SCALER_SETTINGS, "bf16_grad_scaling") if f"precision.{k}" in given]
    if job.scaling.allreduce_dtype == "fp16":  # needs loss-scaled gradients (JobConfig refuses it unscaled)
        scaler.append("scaling.allreduce_dtype='fp16'")
    return scaler


COMPILE_PAYS_AFTER_STEPS = 5000
"""Steps from which `model.compile` is chosen for the built-in GPT on GPUs. Measured for GPT-2 small at batch
16 in bf16 on an H100 (`benchmarks/bench_compile_cost.py`, BENCHMARKS.md): compiling costs 18 s once per
worker start and saves 5.6 ms of a 42.5 ms step, so it pays after about 3,200 steps; 5,000 leaves room for
a restart's recompilation and slower compilers."""


def choose_compile(job: JobConfig, use_gpu: bool, given: set[str]) -> tuple[JobConfig, str | None]:
    """`model.compile` where it pays and the user did not set it: the built-in gpt on GPUs, for runs of at
    least COMPILE_PAYS_AFTER_STEPS steps. Your own model is compiled only when you ask (a model may not
    compile, and what it saves is unknown). Returns the job and a note saying what was chosen and why."""
    if not use_gpu or "model.compile" in given or job.model.compile or job.model.kind != "gpt" or \
            job.scaling.strategy == "fsdp":
        return job, None
    if job.run.steps < COMPILE_PAYS_AFTER_STEPS:
        return job, (f"model.compile=false: a run of {job.run.steps} steps does not pay for compiling (about 20 s "
                     f"per worker start for GPT-2 small; chosen from {COMPILE_PAYS_AFTER_STEPS} steps on); "
                     "--model.compile true to compile anyway")
    return (dataclasses.replace(job, model=dataclasses.replace(job.model, compile=True)),
            f"model.compile=true chosen for the gpt on GPU workers (run.steps={job.run.steps} >= "
            f"{COMPILE_PAYS_AFTER_STEPS}: compiling costs about 20 s per worker start, each step about 13% less); "
            "--model.compile false to run eager")


def _with_dtype(job: JobConfig, dtype: Any) -> JobConfig:
    return dataclasses.replace(job, precision=job.precision.replace(dtype=dtype))
