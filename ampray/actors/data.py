"""A worker's data: training batches (in memory, or streamed through Ray Data) and its held-out shard.

Three sources, one interface (`next_batch`, `state_dict`, `load_state_dict`):
- the built-in corpus or a Parquet dataset loaded whole into every worker: `ShardedBatches` draws a
  seeded permutation per epoch and gives each rank a disjoint, equal part; its position resumes exactly;
- a Parquet dataset (or a `ray.data.Dataset`) too large for that: `StreamBatches` reads this rank's
  shard of Ray Data's stream (`ray.train.get_dataset_shard`); a resume continues at the saved epoch and
  batch count, but which rows those batches hold is Ray Data's choice (its stream is not reproducible).
The held-out set is always in memory: each rank evaluates rows rank::world of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ampray.data.columns import ColumnSpec, EvalBatches, holdout, read_columns, table_to_tensors, tree_map
from ampray.data.parquet import ShardedBatches, read_dataset
from ampray.job import JobConfig
from ampray.models.registry import ModelSpec

TRAIN, VAL = "train", "val"  # the names of Ray Data datasets handed to the TorchTrainer


def column_spec(job: JobConfig) -> ColumnSpec:
    d = job.data
    auto = d.target_pad_value == "auto"
    # The default loss of a user's model (ampray's cross-entropy) ignores -100, as torch's does.
    ignore = -100 if auto and job.model.factory and not job.model.loss else None
    return ColumnSpec(tuple(d.input_columns), d.target, d.input_format, d.pad_to, d.pad_value,
                      target_pad=None if auto else float(d.target_pad_value), ignore_index=ignore,
                      bare=isinstance(d.input, str), widths=tuple(sorted(d.pad_widths.items())))


def load_rows(job: JobConfig, spec: ModelSpec, path: str, max_rows: int | None = None) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a Parquet file or folder: by the named columns, or in ampray's schema."""
    if job.data.columns:
        return read_columns(Path(path).expanduser(), column_spec(job), max_rows=max_rows)
    inputs, targets = read_dataset(Path(path).expanduser(), spec.name)
    return (inputs[:max_rows], targets[:max_rows]) if max_rows else (inputs, targets)


def load_train_and_val(job: JobConfig, spec: ModelSpec) -> tuple[tuple[Any, Any], tuple[Any, Any] | None]:
    """Every training row and the held-out rows (None without a held-out set), in memory."""
    d = job.data
    if d.path:
        rows = load_rows(job, spec, d.path)
    else:
        if spec.synthetic is None:
            raise ValueError(f"data.path is required with model.factory={spec.name!r} (only the built-in "
                             "kinds have a built-in corpus)")
        rows = spec.synthetic(job.model.options, d.num_samples, d.seed)
    if d.val_fraction:
        return holdout(*rows, d.val_fraction, d.seed)
    return rows, load_val(job, spec)


def load_val(job: JobConfig, spec: ModelSpec) -> tuple[Any, Any] | None:
    """The held-out rows of a streaming run (data.val_path; None without it), in memory."""
    return load_rows(job, spec, job.data.val_path) if job.data.val_path else None


def build_train_batches(job: JobConfig, spec: ModelSpec, rows: tuple[Any, Any] | None, rank: int, world: int,
                        device: torch.device):
    """The training batches of this rank: from `rows` in memory, or from Ray Data's stream (rows None)."""
    micro = job.data.batch_size // job.precision.gradient_accumulation_steps
    if rows is None:
        import ray.train

        return StreamBatches(ray.train.get_dataset_shard(TRAIN), micro, column_spec(job), device)
    inputs, targets = rows
    if device.type == "cuda":
        # Data that fits in memory is small next to an accelerator's: keeping it on the GPU takes the host
        # copy out of each step.
        inputs, targets = tree_map(lambda t: t.to(device), inputs), targets.to(device)
    return ShardedBatches(inputs, targets, micro, rank, world, job.data.seed)


def build_val_batches(job: JobConfig, rows: tuple[Any, Any] | None, rank: int, world: int) -> EvalBatches | None:
    if rows is None:
        return None
    size = job.data.eval_batch_size or job.data.batch_size // job.precision.gradient_accumulation_steps
    return EvalBatches(rows[0], rows[1], size, rank, world)


class StreamBatches:
    """This rank's batches from a Ray Data shard, epoch after epoch.

    Ray Train splits a dataset into equal shards (`streaming_split(equal=True)`) and every rank drops its
    last partial batch, so all ranks take the same number of steps per epoch: under DDP a rank that ran
    out early would leave the others waiting in an all-reduce.
    """

    def __init__(self, shard, batch_size: int, columns: ColumnSpec, device: torch.device) -> None:
        self.shard, self.batch_size, self.columns, self.device = shard, batch_size, columns, device
        self.epoch, self.batch_index = 0, 0
        self._skip = 0
        self._it: Iterator | None = None

    def _batches(self) -> Iterator:
        names = [*self.columns.inputs, self.columns.target]
        for batch in self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True,
                                             prefetch_batches=2):
            yield table_to_tensors({k: batch[k] for k in names}, self.columns)

    def next_batch(self) -> tuple[Any, torch.Tensor]:
        while True:
            if self._it is None:
                self._it = self._batches()
            try:
                x, y = next(self._it)
            except StopIteration:
                if self.batch_index == 0:
                    raise ValueError(f"the training stream gives this rank no batch of {self.batch_size} rows: "
                                     "expected data.batch_size at most each rank's share of the rows") from None
                self._it, self.epoch, self.batch_index = None, self.epoch + 1, 0
                continue
            if self._skip:  # the resumed epoch's batches already trained on
                self._skip -= 1
                self.batch_index += 1
                continue
            self.batch_index += 1
            return tree_map(lambda t: t.to(self.device, non_blocking=True), x), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index = int(state["epoch"]), 0
        self._skip, self._it = int(state["batch_index"]), None


def one_batch(job: JobConfig, spec: ModelSpec, n: int = 2) -> tuple[Any, torch.Tensor]:
    """The first `n` rows of the training data (the driver's check of the model on real data), read from
    the first file only."""
    if job.data.path and not job.data.columns:
        from ampray.data.columns import parquet_files

        first = parquet_files(Path(job.data.path).expanduser())[0]
        inputs, targets = read_dataset(first, spec.name)
        return inputs[:n], targets[:n]
    if job.data.path:
        return load_rows(job, spec, job.data.path, max_rows=n)
    inputs, targets = spec.synthetic(job.model.options, n, job.data.seed)
    return inputs[:n], targets[:n]
