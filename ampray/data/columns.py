"""Your own Parquet data: named columns decoded into tensors (pure pyarrow + numpy + torch).

A `ColumnSpec` names the column(s) of the model's input and the target column. Supported column types
and the tensors they become (`rows` is the number of rows read):

| Arrow type                                            | tensor                                   |
| ----------------------------------------------------- | ---------------------------------------- |
| int8 ... int64, uint8 ... uint64                      | int64 `(rows,)`                          |
| float16, float32, float64                             | float32 `(rows,)`                        |
| bool                                                  | bool `(rows,)`                           |
| `fixed_size_list<T>[n]`                               | `(rows, n)`, dtype as T's above          |
| `fixed_size_list<fixed_size_list<T>[m]>[n]`, ...      | `(rows, n, m, ...)`                      |
| `list<T>`, `large_list<T>` (T a number, bool or a fixed-size list of them) | `(rows, L, ...)`: padded with pad_value to L = pad_to, or to the longest row read |
| Ray Data tensor extension (`ArrowTensorType[V2]`)     | `(rows, *shape)`                         |
| Ray Data `ArrowVariableShapedTensorType`              | `(rows, L, ...)`: padded along the first axis like a list |

Floats become float32 whatever their width: the model's weights train in fp32 (autocast picks the
precision of each op), so wider inputs would only be cast down inside the first layer, and float16
widens exactly. Integers become int64, the dtype of `cross_entropy`'s targets and of embedding indices.
Nulls are rejected (an error names the column): a model cannot take a missing value.

The same decoding serves a batch of Ray Data's stream (`iter_batches(batch_format="numpy")` yields
{column: ndarray}; variable-size rows arrive as object arrays of arrays), so streamed and in-memory
training see the same tensors. Structured inputs (a tensor, a tuple or a dict of tensors) are handled
by the small `tree_map`, `select_rows` and `num_rows` helpers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ampray.amp.config import ConfigError

Inputs = torch.Tensor | tuple | dict
SUPPORTED = "numbers, booleans or (fixed-size or variable-size) lists of numbers"
_RAY_PREFIX = "ray.data.arrow_"  # extension names of Ray Data's tensor types
_EXT_NAME, _EXT_META = b"ARROW:extension:name", b"ARROW:extension:metadata"


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns make the model's input and the target, and how variable-size lists are padded."""

    inputs: tuple[str, ...]
    """Column(s) that make the model's input."""
    target: str
    """The target column."""
    input_format: str = "dict"
    """With several input columns: "dict" ({name: tensor}) or "tuple" (in the order given); one: a tensor."""
    pad_to: int = 0
    """Variable-size list columns are padded (with pad_value) to this length; 0: the longest row read."""
    pad_value: float = 0.0
    """The value padding fills in."""
    target_pad: float | None = None
    """The value padding fills the target column with; None: pad_value, or ignore_index for integers."""
    ignore_index: int | None = None
    """With no target_pad: an integer target is padded with this (the loss's ignore index), not pad_value."""
    bare: bool = True
    """One input column named alone reaches the model as a bare tensor; False: a one-entry dict or tuple too
    (the column was given as a list)."""
    widths: tuple[tuple[str, int], ...] = ()
    """(column, width) of variable-size columns when pad_to is 0: each padded to its own width (the longest
    row of the training and held-out data, found before training) instead of the longest row read."""

    def __post_init__(self) -> None:
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        object.__setattr__(self, "inputs", inputs)  # a bare name or a list reads as a tuple of names
        if not inputs or not all(isinstance(c, str) and c for c in inputs) or len(set(inputs)) != len(inputs):
            raise ConfigError(f"data.input={list(inputs)!r} is not allowed: expected one or more distinct column names")
        if not isinstance(self.target, str) or not self.target:
            raise ConfigError(f"data.target={self.target!r} is not allowed: expected a column name")
        if self.input_format not in ("dict", "tuple"):
            raise ConfigError(f"data.input_format={self.input_format!r} is not allowed: expected one of "
                              "['dict', 'tuple']")
        if isinstance(self.pad_to, bool) or not isinstance(self.pad_to, numbers.Integral) or self.pad_to < 0:
            raise ConfigError(f"data.pad_to={self.pad_to!r} is not allowed: expected an integer >= 0 "
                              "(0: the longest row)")
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, numbers.Real) \
                or not math.isfinite(self.pad_value):
            raise ConfigError(f"data.pad_value={self.pad_value!r} is not allowed: expected a finite number")

    def fields(self) -> list[tuple[str, str]]:
        """(job field, column) of every input column, then of the target."""
        return [*(("data.input", c) for c in self.inputs), ("data.target", self.target)]


# --- Files and footers ------------------------------------------------------------------------------


def parquet_files(path: str | Path) -> list[Path]:
    """One .parquet file, or every non-hidden *.parquet file of a folder, sorted."""
    # Imported here: parquet.py imports this module at its top.
    from ampray.data.parquet import _shard_files

    return _shard_files(Path(path).expanduser())


def _ray_tensor_type(field: pa.Field) -> pa.DataType:
    """The field's type; a Ray Data tensor column read while Ray's types were unregistered gets its type back."""
    meta = field.metadata or {}
    name = meta.get(_EXT_NAME, b"").decode()
    if isinstance(field.type, pa.ExtensionType) or not name.startswith(_RAY_PREFIX):
        return field.type
    try:  # importing the module registers Ray's types, so later reads see them directly
        from ray.air.util.tensor_extensions import arrow as ray_arrow
    except ImportError:
        raise ValueError(f"column {field.name!r} holds Ray Data tensors ({name}); expected ray to be "
                         "installed to read them") from None
    classes = {"ray.data.arrow_tensor": "ArrowTensorType", "ray.data.arrow_tensor_v2": "ArrowTensorTypeV2",
               "ray.data.arrow_variable_shaped_tensor": "ArrowVariableShapedTensorType"}
    cls = getattr(ray_arrow, classes.get(name, ""), None)  # older Ray versions lack the V2 type
    if cls is None:
        return field.type
    return cls.__arrow_ext_deserialize__(field.type, meta.get(_EXT_META, b""))


def _type_name(t: pa.DataType) -> str:
    """The type as text, without the child field names that differ between writers (item, element)."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_name(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{'large_' if pa.types.is_large_list(t) else ''}list<{_type_name(t.value_type)}>"
    return str(t)


def tensor_type(type_name: str) -> str:
    """What a column of type `type_name` (as `_type_name` writes it) decodes into: every integer width an
    int64, every float width a float32, a large list a list. Two files whose columns agree on this give the
    model the same tensors (a held-out set written by another tool with int32 labels, say)."""
    import re

    name = type_name.replace("large_list<", "list<")
    name = re.sub(r"\bu?int(8|16|32|64)\b", "int64", name)
    return re.sub(r"\b(halffloat|float|double)\b", "float32", name)


def _scan(path: str | Path) -> tuple[dict[str, Any], dict[str, pa.DataType], list[tuple[Path, pq.FileMetaData]]]:
    """(schema_summary, {column: type}, [(file, footer)]) from the footers alone, reading no data."""
    first: tuple[Path, dict[str, str]] | None = None
    types: dict[str, pa.DataType] = {}
    footers = []
    for file in parquet_files(path):
        footer = pq.read_metadata(file)
        fields = {f.name: _ray_tensor_type(f) for f in footer.schema.to_arrow_schema()}
        names = {name: _type_name(t) for name, t in fields.items()}
        if first is None:
            first, types = (file, names), fields
        for name in first[1].keys() | names.keys():
            a, b = first[1].get(name), names.get(name)
            if a != b:
                have = f"type {a} in {first[0]}" if a else f"no column {name!r} in {first[0]}"
                got = f"type {b} in {file}" if b else f"no column {name!r} in {file}"
                raise ValueError(f"column {name!r} differs between the files: {have}, but {got}; expected every "
                                 "file to have the same columns of the same types")
        footers.append((file, footer))
    assert first is not None  # parquet_files raises on a folder without files
    summary = {"columns": first[1], "rows": sum(f.num_rows for _, f in footers), "files": len(footers),
               "bytes": sum(f.row_group(i).total_byte_size for _, f in footers for i in range(f.num_row_groups))}
    return summary, types, footers


def schema_summary(path: str | Path) -> dict[str, Any]:
    """{"columns": {name: type}, "rows", "files", "bytes" (uncompressed)} from the files' footers alone."""
    return _scan(path)[0]


# --- Types ------------------------------------------------------------------------------------------


def _is_scalar(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_fixed(t: pa.DataType) -> bool:
    """A number, a bool, or fixed-size lists of them, nested to any depth."""
    return _is_scalar(t) or (pa.types.is_fixed_size_list(t) and _is_fixed(t.value_type))


def _is_ray_tensor(t: pa.DataType) -> bool:
    return isinstance(t, pa.ExtensionType) and t.extension_name.startswith(_RAY_PREFIX)


def _ray_value_type(t: pa.ExtensionType) -> pa.DataType:
    storage = t.storage_type
    return storage["data"].type.value_type if pa.types.is_struct(storage) else storage.value_type


def is_variable_list(t: pa.DataType) -> bool:
    """A list column whose rows may differ in length (padded when decoded)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def supported(t: pa.DataType) -> bool:
    """Whether a column of type `t` decodes into a tensor (see the module's table)."""
    if _is_ray_tensor(t):
        return _is_scalar(_ray_value_type(t))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _is_fixed(t.value_type)  # one variable-size level, the outermost: one axis to pad
    return _is_fixed(t)


def _type_error(field: str, name: str, what: Any) -> ConfigError:
    return ConfigError(f"{field}={name!r}: column {name!r} has type {what}; expected {SUPPORTED}")


def _check_names(names: list[str], spec: ColumnSpec, where: str, prefix: str = "data") -> None:
    for field, name in spec.fields():
        if name not in names:
            raise ConfigError(f"{prefix}{field.removeprefix('data')}={name!r} is not allowed: no column {name!r} in "
                              f"{where} (columns: {', '.join(names)}); expected one of those")


def _has_nulls(footer: pq.FileMetaData, name: str) -> bool:
    """Whether the footer's statistics count a null in the top-level (not nested) column `name`."""
    for i in range(footer.num_row_groups):
        group = footer.row_group(i)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if chunk.path_in_schema == name and chunk.is_stats_set and chunk.statistics.has_null_count \
                    and chunk.statistics.null_count:
                return True
    return False


def check_columns(path: str | Path, spec: ColumnSpec, field_prefix: str = "data",
                  field: str | None = None) -> dict[str, Any]:
    """Raise ConfigError unless every named column exists with a supported type; returns schema_summary.

    `field` is the job field that gave `path` in the messages (default `{field_prefix}.path`). Nulls in
    a column of numbers are found from the footers' statistics; nulls in list columns when read.
    """
    field = field or f"{field_prefix}.path"
    summary, types, footers = _scan(path)
    _check_names(list(types), spec, f"{field}={path}", field_prefix)
    for job_field, name in spec.fields():
        job_field = field_prefix + job_field.removeprefix("data")
        if not supported(types[name]):
            raise _type_error(job_field, name, _type_name(types[name]))
        for file, footer in footers if _is_scalar(types[name]) else ():
            if _has_nulls(footer, name):
                raise ConfigError(f"{job_field}={name!r}: column {name!r} holds nulls in {file}; expected every "
                                  "value present")
    return summary


# --- Decoding ---------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """One chunk of a column: dense rows (`values` is rows x shape), or ragged rows (`lengths` given:
    `values` holds every row's first-axis entries back to back)."""

    values: np.ndarray
    lengths: np.ndarray | None = None

    def rows(self) -> int:
        return len(self.values) if self.lengths is None else len(self.lengths)


def _nulls(field: str, name: str) -> ValueError:
    return ValueError(f"{field}={name!r}: column {name!r} holds nulls; expected every value present")


def _dense(field: str, name: str, arr: pa.Array) -> np.ndarray:
    """rows x n x m ... of a number, bool or fixed-size list array; a view where Arrow allows one."""
    if arr.null_count:
        raise _nulls(field, name)
    if pa.types.is_fixed_size_list(arr.type):
        inner = _dense(field, name, arr.flatten())  # flatten honours a slice's offset, .values does not
        return inner.reshape(len(arr), arr.type.list_size, *inner.shape[1:])
    return arr.to_numpy(zero_copy_only=False)


def _rows_piece(field: str, name: str, rows: list) -> _Piece:
    """A piece of per-row arrays (an object array's entries), ragged along their first axis."""
    if any(r is None for r in rows):
        raise _nulls(field, name)
    rows = [np.asarray(r) for r in rows]
    if rows and all(r.ndim == 0 for r in rows):
        return _Piece(np.array(rows))
    trailing = {r.shape[1:] for r in rows}
    if any(r.ndim == 0 for r in rows) or len(trailing) > 1:
        raise ValueError(f"{field}={name!r}: column {name!r} holds rows of shapes "
                         f"{sorted({r.shape for r in rows})[:4]}; expected rows that differ at most in their "
                         "first axis (the one padding fills)")
    values = np.concatenate(rows) if rows else np.zeros(0)
    return _Piece(values, np.array([len(r) for r in rows], dtype=np.int64))


def _arrow_piece(field: str, name: str, arr: pa.Array) -> _Piece:
    t = arr.type
    if not supported(t):
        raise _type_error(field, name, _type_name(t))
    if _is_ray_tensor(t):
        variable = pa.types.is_struct(t.storage_type)
        values = arr.storage.field("data") if variable else arr.storage
        if arr.null_count or values.flatten().null_count:
            raise _nulls(field, name)
        if variable:  # one ndarray per row
            return _rows_piece(field, name, list(arr.to_numpy(zero_copy_only=False)))
        return _Piece(arr.to_numpy(zero_copy_only=False))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if arr.null_count:
            raise _nulls(field, name)
        return _Piece(_dense(field, name, arr.flatten()), pc.list_value_length(arr).to_numpy(zero_copy_only=False))
    return _Piece(_dense(field, name, arr))


def _numpy_piece(field: str, name: str, value: Any) -> _Piece:
    a = np.asarray(value)
    if a.dtype == object:
        return _rows_piece(field, name, list(a))
    return _Piece(a)


def _tensor_dtype(field: str, name: str, dtype: np.dtype) -> np.dtype:
    """int64 for integers, float32 for floats (see the module docstring), bool for bools."""
    if dtype.kind in "iu":
        return np.dtype(np.int64)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    if dtype.kind == "b":
        return np.dtype(np.bool_)
    raise _type_error(field, name, f"{dtype} (in numpy)")


def _fill(field: str, name: str, value: float, dtype: np.dtype, setting: str = "data.pad_value") -> Any:
    """The padding value as a value of the column's dtype; one that the dtype cannot hold is an error."""
    ok = dtype.kind == "f" or (float(value).is_integer() and (dtype.kind != "b" or value in (0, 1)))
    if not ok:
        raise ValueError(f"{setting}={value!r} is not allowed for {field}={name!r}: column {name!r} holds "
                         f"{'booleans' if dtype.kind == 'b' else 'integers'}; expected "
                         f"{'0 or 1' if dtype.kind == 'b' else 'an integer'}")
    return dtype.type(value)


def _owned(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as a writable, C-contiguous array of `dtype`: itself if it is one, else one copy."""
    # torch.from_numpy warns on read-only arrays (Arrow's buffers) and rejects negative strides.
    if values.dtype == dtype and values.flags.writeable and values.flags.c_contiguous:
        return values
    return np.array(values, dtype=dtype)


def _check_range(field: str, name: str, pieces: list[_Piece]) -> None:
    for p in pieces:
        if p.values.dtype == np.uint64 and p.values.size and p.values.max() >= 2**63:
            raise ValueError(f"{field}={name!r}: column {name!r} holds {int(p.values.max())}; expected integers "
                             "below 2**63 (they become int64)")


def _assemble(field: str, name: str, pieces: list[_Piece], spec: ColumnSpec) -> np.ndarray:
    """One writable array of every piece's rows, padded where rows differ in length: one copy."""
    if not pieces:
        pieces = [_Piece(np.zeros(0, dtype=np.float32))]
    dtype = _tensor_dtype(field, name, np.result_type(*(p.values.dtype for p in pieces)))
    _check_range(field, name, pieces)
    if any(p.lengths is not None for p in pieces):
        if any(p.lengths is None for p in pieces):
            raise ValueError(f"{field}={name!r}: column {name!r} holds fixed-size rows in some files and "
                             "variable-size rows in others; expected one type")
        lengths = np.concatenate([p.lengths for p in pieces])
        longest = int(lengths.max()) if len(lengths) else 0
        fixed = spec.pad_to or dict(spec.widths).get(name, 0)
        if fixed and longest > fixed:
            limit = f"data.pad_to={spec.pad_to}" if spec.pad_to else f"data.pad_widths[{name!r}]={fixed}"
            raise ValueError(f"{field}={name!r}: column {name!r} has a row of {longest} entries, longer than "
                             f"{limit}; expected data.pad_to >= {longest}, or 0 (pad to the longest row)")
        width = fixed or longest
        if not (lengths == width).all():
            return _pad(field, name, pieces, width, dtype, *_pad_value(field, dtype, spec))
        pieces = [_Piece(p.values.reshape(len(p.lengths), width, *p.values.shape[1:])) for p in pieces]
    shapes = {p.values.shape[1:] for p in pieces}
    if len(shapes) > 1:
        raise ValueError(f"{field}={name!r}: column {name!r} holds rows of shapes {sorted(shapes)} in different "
                         "chunks or files; expected one shape")
    if len(pieces) == 1:
        return _owned(pieces[0].values, dtype)
    return np.concatenate([p.values for p in pieces], dtype=dtype, casting="unsafe")


def _pad_value(field: str, dtype: np.dtype, spec: ColumnSpec) -> tuple[float, str]:
    """What padding fills a column with, and the setting that says so: the target's own value or, for an
    integer target, the loss's ignore index; pad_value otherwise."""
    if field == "data.target":
        if spec.target_pad is not None:
            return spec.target_pad, "data.target_pad_value"
        if spec.ignore_index is not None and dtype.kind in "iu":
            return spec.ignore_index, "data.target_pad_value"
    return spec.pad_value, "data.pad_value"


def _pad(field: str, name: str, pieces: list[_Piece], width: int, dtype: np.dtype, value: float,
         setting: str = "data.pad_value") -> np.ndarray:
    trailing = {p.values.shape[1:] for p in pieces}
    if len(trailing) > 1:
        raise ValueError(f"{field}={name!r}: column {name!r} holds entries of shapes {sorted(trailing)} in "
                         "different chunks or files; expected one shape")
    rows = sum(p.rows() for p in pieces)
    out = np.full((rows, width, *trailing.pop()), _fill(field, name, value, dtype, setting), dtype=dtype)
    start = 0
    for p in pieces:
        n = len(p.lengths)
        # Row-major boolean indexing takes the entries in row order, the order `values` holds them in.
        out[start : start + n][np.arange(width) < p.lengths[:, None]] = p.values
        start += n
    return out


def _to_tensors(sources: dict[str, list], spec: ColumnSpec, from_arrow: bool) -> tuple[Inputs, torch.Tensor]:
    """(inputs, target) from {column: [Arrow chunks]} or {column: [one ndarray]}."""
    decoded: dict[str, torch.Tensor] = {}
    for field, name in spec.fields():
        if name not in decoded:
            piece = _arrow_piece if from_arrow else _numpy_piece
            pieces = [piece(field, name, c) for c in sources[name]]
            decoded[name] = torch.from_numpy(_assemble(field, name, pieces, spec))
    counts = {name: len(t) for name, t in decoded.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the columns have different numbers of rows: {counts}; expected one count")
    xs = [decoded[c] for c in spec.inputs]
    if len(xs) == 1 and spec.bare:
        inputs: Inputs = xs[0]
    else:
        inputs = tuple(xs) if spec.input_format == "tuple" else dict(zip(spec.inputs, xs))
    return inputs, decoded[spec.target]


def _table_chunks(table: pa.Table | pa.RecordBatch, name: str) -> list[pa.Array]:
    field = table.schema.field(name)
    t = _ray_tensor_type(field)
    column = table.column(name)
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if t is not field.type:  # Ray tensor storage read before Ray's types were registered
        chunks = [pa.ExtensionArray.from_storage(t, c) for c in chunks]
    return chunks


def table_to_tensors(table: pa.Table | dict[str, np.ndarray], spec: ColumnSpec) -> tuple[Inputs, torch.Tensor]:
    """(inputs, target) of one table, or of one {column: ndarray} batch of Ray Data's numpy format."""
    names = list(table.column_names if isinstance(table, (pa.Table, pa.RecordBatch)) else table)
    _check_names(names, spec, "the data")
    if isinstance(table, (pa.Table, pa.RecordBatch)):
        return _to_tensors({name: _table_chunks(table, name) for _, name in spec.fields()}, spec, True)
    return _to_tensors({name: [table[name]] for _, name in spec.fields()}, spec, False)


def unreadable(file: Path, err: Exception) -> ConfigError:
    """The error of a Parquet file that pyarrow cannot read: a failed page checksum, a damaged page or footer."""
    return ConfigError(f"{file}: cannot be read as Parquet ({err}); expected an intact file (a damaged file must "
                       "be rewritten, or restored from its source)")


def _read_file(file: Path, spec: ColumnSpec, names: list[str], left: int | None) -> tuple[list, int | None]:
    """(tables of one file's `names` columns, rows still wanted): every row, or the first `left`; the page
    checksums are verified where the file has them."""
    with pq.ParquetFile(file, page_checksum_verification=True) as handle:
        _check_names(handle.schema_arrow.names, spec, f"data.path={file}")
        if left is None:
            return [handle.read(columns=names)], None
        tables = []
        for batch in handle.iter_batches(batch_size=min(left, 65536), columns=names):
            tables.append(batch.slice(0, left))
            left -= len(tables[-1])
            if left <= 0:
                break
        return tables, left


def read_columns(path: str | Path, spec: ColumnSpec, max_rows: int | None = None) -> tuple[Inputs, torch.Tensor]:
    """(inputs, target) of the named columns of every file, in file order; only the first `max_rows` rows
    (and only the row groups holding them) when given."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"read_columns: max_rows={max_rows} is not allowed; expected None (every row) or >= 1")
    names = list(dict.fromkeys(name for _, name in spec.fields()))
    sources: dict[str, list] = {name: [] for name in names}
    left = max_rows
    for file in parquet_files(path):
        if left is not None and left <= 0:
            break  # enough rows: the later files are not opened
        try:
            tables, left = _read_file(file, spec, names, left)
        except (OSError, pa.ArrowInvalid) as err:  # a failed page checksum, a corrupt page, a truncated footer
            raise unreadable(file, err) from None
        for table in tables:
            for name in names:
                sources[name] += _table_chunks(table, name)
    return _to_tensors(sources, spec, True)


# --- Structured inputs ------------------------------------------------------------------------------


def tree_map(fn: Callable[[torch.Tensor], Any], inputs: Inputs) -> Any:
    """`fn` applied to every tensor of a tensor, a tuple/list or a dict of them, keeping the structure."""
    if isinstance(inputs, dict):
        return {k: tree_map(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(tree_map(fn, v) for v in inputs)
    return fn(inputs)


def leaves(inputs: Inputs) -> list[torch.Tensor]:
    """Every tensor of structured inputs, in order."""
    out: list[torch.Tensor] = []
    tree_map(out.append, inputs)
    return out


def num_rows(inputs: Inputs) -> int:
    """The number of rows of structured inputs; every tensor must have it."""
    tensors = leaves(inputs)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"inputs of {type(inputs).__name__} are not allowed: expected a tensor, or a tuple or "
                         "dict of tensors")
    counts = [len(t) for t in tensors]
    if len(set(counts)) > 1:
        raise ValueError(f"inputs have different numbers of rows {counts}; expected one count for every tensor")
    return counts[0]


def select_rows(inputs: Inputs, idx: torch.Tensor | slice) -> Inputs:
    """The rows `idx` of every tensor of structured inputs."""
    return tree_map(lambda t: t[idx], inputs)


def holdout(inputs: Inputs, target: torch.Tensor, fraction: float, seed: int):
    """((train_inputs, train_target), (val_inputs, val_target)): a seeded random split of the rows.

    max(1, round(rows * fraction)) rows are held out; both parts keep the rows' original order.
    """
    rows = num_rows(inputs)
    if len(target) != rows:
        raise ValueError(f"holdout: inputs have {rows} rows but the target {len(target)}")
    held = max(1, round(rows * fraction)) if 0 < fraction < 1 else 0
    if not 0 < held < rows:
        raise ValueError(f"data.val_fraction={fraction!r} is not allowed: expected a fraction in (0, 1) that leaves "
                         f"both parts at least one of the {rows} rows")
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).to(leaves(inputs)[0].device)
    val, train = perm[:held].sort().values, perm[held:].sort().values
    return (select_rows(inputs, train), target[train]), (select_rows(inputs, val), target[val])


class EvalBatches:
    """Deterministic evaluation batches of one rank: rows rank::world_size of the data, in order, in batches
    of at most batch_size. A rank past the last row (fewer rows than ranks) yields nothing."""

    def __init__(self, inputs: Inputs, targets: torch.Tensor, batch_size: int, rank: int, world_size: int):
        rows = num_rows(inputs)
        if len(targets) != rows:
            raise ValueError(f"EvalBatches: inputs have {rows} rows but targets {len(targets)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EvalBatches: rank={rank}, world_size={world_size} is not allowed; expected "
                             "world_size >= 1 and 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"EvalBatches: batch_size={batch_size} is not allowed; expected an integer >= 1")
        self.inputs, self.targets, self.batch_size = inputs, targets, batch_size
        # On the data's device: indexing GPU tensors with a CPU index would copy it every batch.
        self._index = torch.arange(rank, max(rank, rows), world_size, device=leaves(inputs)[0].device)
        self.rows = len(self._index)
        # Rank 0 has the most rows (ceil(rows / world_size)): the batch count every rank can keep step with.
        self.most_batches = (-(-rows // world_size) + batch_size - 1) // batch_size

    def __len__(self) -> int:
        return (self.rows + self.batch_size - 1) // self.batch_size

    def filler(self) -> tuple[Inputs, torch.Tensor]:
        """One row of the data (the first), for a forward a rank runs only to keep step with the others
        (a sharded model's forward is collective: every rank must run as many)."""
        idx = torch.zeros(1, dtype=torch.long, device=self._index.device)
        return select_rows(self.inputs, idx), self.targets[idx]

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        for start in range(0, self.rows, self.batch_size):
            idx = self._index[start : start + self.batch_size]
            yield select_rows(self.inputs, idx), self.targets[idx]
