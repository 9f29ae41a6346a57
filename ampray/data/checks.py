"""The driver's check of a job's Parquet data before any worker starts: every shard, in seconds.

Two depths (the job's `data.check`):
- schema: the footers alone: `ampray.schema_version` not newer than this ampray reads, and for ampray's
  schema the kind, the columns and their types, the list width against `ampray.shape`, one shape in
  every shard (the named columns of your own data are checked by `columns.check_columns`);
- full: also every value, streamed batch by batch through pyarrow (memory: one batch of the checked
  columns), with vectorised pyarrow.compute kernels: nulls at any nesting level, NaN or inf in float
  columns, integers outside a range the model declares (token ids, class labels), and the page
  checksums of files that carry them (a damaged page fails to read).
Every error is a ConfigError naming the job field and the file, the column, the bad value and its row
(counted from 0 in that file), and what is allowed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ampray.amp.config import ConfigError
from ampray.data.columns import unreadable
from ampray.data.parquet import check_shard_schema, schema_version

MODES = ("full", "schema", "off")
_BATCH_ROWS = 65536  # rows per streamed batch: a few MiB of a typical column, so memory stays bounded


@dataclass(frozen=True)
class ColumnRule:
    """What the values of one column must be, beyond present (not null) and finite (floats)."""

    column: str
    low: int | None = None
    """Integers must lie in [low, high) when both are given (floats and booleans are not compared)."""
    high: int | None = None
    why: str = ""
    """What sets the range, for the message: "token ids below model.options.vocab_size=256"."""


@dataclass(frozen=True)
class DataCheck:
    """What a check of the data read and how long it took."""

    mode: str
    files: int
    rows: int
    bytes: int
    """The files' size on disk."""
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for the user: "data check (full, every value): 12 shard(s), 4,100,000 rows, 310.2 MiB in
        0.81 s (...)"."""
        what = "every value" if self.mode == "full" else "footers only"
        rate = (f" ({self.rows / self.seconds:,.0f} rows/s, {self.bytes / 2**20 / self.seconds:,.0f} MiB/s)"
                if self.mode == "full" and self.seconds > 0 else "")
        slow = self.mode == "full" and self.seconds > 30
        hint = "; data.check = \"schema\" skips reading the values" if slow else ""
        return (f"data check ({self.mode}, {what}): {self.files} shard(s), {self.rows:,} rows, "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.2f} s{rate}{hint}")


def check_ampray_shards(files: list[Path], field: str, kind: str | None) -> str:
    """The kind of a dataset in ampray's schema, after checking every shard's schema (see
    `parquet.check_shard_schema`) and that all hold rows of one shape; `kind` None: the first file's."""
    first: tuple[Path, list[int]] | None = None
    for file in files:
        where = f"{field}={file}"
        kind, shape = check_shard_schema(_footer(file).schema.to_arrow_schema(), kind, where)
        if first is not None and shape != first[1]:
            raise ConfigError(f"{where}: ampray.shape is {shape}; expected {first[1]} as in {first[0]} (every "
                              "shard of a dataset holds rows of one shape)")
        first = first or (file, shape)
    assert kind is not None  # check_shard_schema raises without one
    return kind


def check_files(sources: list[tuple[str, list[Path]]], rules: list[ColumnRule], mode: str) -> DataCheck:
    """Check every file of (job field, files) `sources` as `mode` asks ("schema" or "full"); the rules'
    columns must exist (checked before: ampray's schema, or check_columns). Raises ConfigError."""
    if mode not in ("full", "schema"):
        raise ValueError(f"check_files: mode={mode!r} is not allowed; expected 'full' or 'schema'")
    start = time.perf_counter()
    rows = size = files = 0
    for field, paths in sources:
        for file in paths:
            where = f"{field}={file}"
            footer = _footer(file)
            meta = {k.decode(): v.decode() for k, v in (footer.metadata or {}).items()}
            schema_version(meta, where)
            rows, size, files = rows + footer.num_rows, size + file.stat().st_size, files + 1
            if mode == "full":
                _scan_file(file, where, rules)
    return DataCheck(mode, files, rows, size, time.perf_counter() - start)


def _footer(file: Path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(file)
    except OSError as err:
        raise unreadable(file, err) from None


def _scan_file(file: Path, where: str, rules: list[ColumnRule]) -> None:
    names = list(dict.fromkeys(r.column for r in rules))
    try:
        with pq.ParquetFile(file, page_checksum_verification=True) as handle:
            start = 0
            for batch in handle.iter_batches(batch_size=_BATCH_ROWS, columns=names):
                for rule in rules:
                    _check_values(batch.column(rule.column), rule, where, start)
                start += batch.num_rows
    except OSError as err:  # a failed page checksum, a page that does not decompress or decode
        raise unreadable(file, err) from None


def _check_values(arr: pa.Array, rule: ColumnRule, where: str, start: int) -> None:
    """One batch of a column (rows start.. of its file): present at every level, finite, in range."""
    levels: list[pa.Array] = []  # the list levels above the values, outermost first
    while True:
        if isinstance(arr, pa.ExtensionArray):  # Ray Data's tensors: their storage holds the values
            arr = arr.storage
        if arr.null_count:
            row = start + _row(levels, pc.index(pc.is_null(arr), True).as_py())
            raise ConfigError(f"{where}: column {rule.column!r} holds nulls (the first in row {row}); expected "
                              "every value present (a model cannot take a missing value)")
        if pa.types.is_struct(arr.type):  # a variable-shaped tensor: {data, shape}, one per row
            if arr.type.get_field_index("data") < 0:
                return
            arr = arr.flatten()[arr.type.get_field_index("data")]
        elif pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            levels.append(arr)
            arr = arr.flatten()  # honours a slice's offset
        else:
            break
    if pa.types.is_floating(arr.type):
        bad = pc.invert(pc.is_finite(arr))
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise ConfigError(
                f"{where}: column {rule.column!r} holds {arr[i].as_py()} in row {start + _row(levels, i)} (the first "
                f"of {pc.sum(bad).as_py()} non-finite values in rows {start} to {start + _rows(levels, arr) - 1}); "
                "expected finite numbers (a NaN or inf input makes every step that sees it non-finite, and skipped)")
    elif pa.types.is_integer(arr.type) and rule.low is not None and rule.high is not None and len(arr):
        bounds = pc.min_max(arr)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if lo < rule.low or hi >= rule.high:
            bad = pc.or_(pc.less(arr, rule.low), pc.greater_equal(arr, rule.high))
            i = pc.index(bad, True).as_py()
            raise ConfigError(
                f"{where}: column {rule.column!r} holds {arr[i].as_py()} in row {start + _row(levels, i)} (rows "
                f"{start} to {start + _rows(levels, arr) - 1} hold values in [{lo}, {hi}]); expected integers in "
                f"[{rule.low}, {rule.high}): {rule.why}")


def _row(levels: list[pa.Array], i: int) -> int:
    """The row (of the outermost array) that holds entry `i` of the innermost one."""
    for level in reversed(levels):
        if pa.types.is_fixed_size_list(level.type):
            i //= level.type.list_size
        else:
            offsets = level.offsets.to_numpy()
            i = int(np.searchsorted(offsets, offsets[0] + i, side="right")) - 1
    return i


def _rows(levels: list[pa.Array], values: pa.Array) -> int:
    return len(levels[0]) if levels else len(values)
