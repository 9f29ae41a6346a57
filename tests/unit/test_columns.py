"""CPU tests of reading your own Parquet columns: every supported type, padding, errors, splits, batching."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ampray.amp.config import ConfigError
from ampray.data.columns import (
    ColumnSpec,
    EvalBatches,
    check_columns,
    holdout,
    num_rows,
    parquet_files,
    read_columns,
    schema_summary,
    select_rows,
    table_to_tensors,
    tree_map,
)
from ampray.data.parquet import ShardedBatches

ROWS = 6


def _write(path, columns: dict, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def _label():
    return pa.array(np.arange(ROWS), pa.int64())


def _read(path, x="x", **spec):
    return read_columns(path, ColumnSpec((x,), "y", **spec))


def _bits_equal(got: torch.Tensor, want: np.ndarray) -> bool:
    """Same dtype, shape and bytes (so -0.0 differs from 0.0, and a NaN equals itself)."""
    want = torch.from_numpy(np.ascontiguousarray(want))
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return got.dtype == torch.bool and torch.equal(got, want) or torch.equal(got.view(torch.uint8),
                                                                             want.view(torch.uint8))


# --- Types ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("np_type", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                     np.uint64])
def test_integers_become_int64(tmp_path, np_type):
    top = min(int(np.iinfo(np_type).max), 2**63 - 1)
    values = np.array([0, 1, 7, 100, top, np.iinfo(np_type).min], dtype=np_type)
    _write(tmp_path / "a.parquet", {"x": pa.array(values), "y": _label()})
    x, y = _read(tmp_path)
    assert x.dtype == torch.int64 and x.tolist() == [int(v) for v in values]
    assert y.dtype == torch.int64 and y.tolist() == list(range(ROWS))
    if np_type == np.uint64:  # above int64's range: an error, not a silent wrap-around
        values[4] = np.iinfo(np.uint64).max
        _write(tmp_path / "a.parquet", {"x": pa.array(values), "y": _label()})
        with pytest.raises(ValueError, match=r"column 'x' holds 18446744073709551615; expected integers below 2\*\*63"):
            _read(tmp_path)


@pytest.mark.parametrize("np_type", [np.float16, np.float32, np.float64])
def test_floats_become_float32_bitwise(tmp_path, np_type):
    values = np.array([0.1, -2.5, 1e-3, 3.14159, np.finfo(np_type).tiny, -0.0], dtype=np_type)
    _write(tmp_path / "a.parquet", {"x": pa.array(values), "y": _label()})
    x, _ = _read(tmp_path)
    assert _bits_equal(x, values.astype(np.float32))


def test_bools(tmp_path):
    values = np.array([True, False, False, True, True, False])
    _write(tmp_path / "a.parquet", {"x": pa.array(values), "y": pa.array(values[::-1].copy())})
    x, y = _read(tmp_path)
    assert x.dtype == torch.bool and x.tolist() == values.tolist() and y.tolist() == values[::-1].tolist()


def test_fixed_size_lists_and_nested_ones(tmp_path):
    flat = np.random.default_rng(0).standard_normal(ROWS * 6).astype(np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(flat), 6)
    ints = np.arange(ROWS * 6, dtype=np.int16)
    grid = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(ints), 3), 2)
    _write(tmp_path / "a.parquet", {"vec": vec, "grid": grid, "y": _label()})
    x, _ = _read(tmp_path, "vec")
    assert _bits_equal(x, flat.reshape(ROWS, 6))
    g, _ = _read(tmp_path, "grid")
    assert g.dtype == torch.int64 and g.shape == (ROWS, 2, 3) and g.flatten().tolist() == ints.tolist()


def _ragged():
    return [[1.5, 2.0], [3.0], [], [4.0, 5.0, 6.0], [7.0], [8.0, 9.0]]


def _padded(rows, width, value):
    return np.array([r + [value] * (width - len(r)) for r in rows], dtype=np.float32)


@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
def test_variable_lists_pad_to_the_longest_row_or_pad_to(tmp_path, list_type):
    rows = _ragged()
    _write(tmp_path / "a.parquet", {"x": pa.array(rows, list_type(pa.float32())), "y": _label()})
    x, _ = _read(tmp_path)
    assert _bits_equal(x, _padded(rows, 3, 0.0))
    x, _ = _read(tmp_path, pad_to=5, pad_value=-1.0)
    assert _bits_equal(x, _padded(rows, 5, -1.0))
    with pytest.raises(ValueError, match=r"column 'x' has a row of 3 entries, longer than data.pad_to=2"):
        _read(tmp_path, pad_to=2)


def test_variable_lists_of_equal_length_need_no_padding(tmp_path):
    rows = [[i, i + 1, i + 2] for i in range(ROWS)]
    _write(tmp_path / "a.parquet", {"x": pa.array(rows, pa.list_(pa.int32())), "y": _label(),
                                    "fixed": pa.array(rows, pa.list_(pa.int32(), 3))})
    x, _ = _read(tmp_path)
    assert torch.equal(x, _read(tmp_path, "fixed")[0]) and x.dtype == torch.int64 and x.shape == (ROWS, 3)


def test_variable_lists_of_vectors_pad_the_first_axis(tmp_path):
    rows = [[[1, 2]], [[3, 4], [5, 6]], []] * 2
    _write(tmp_path / "a.parquet", {"x": pa.array(rows, pa.list_(pa.list_(pa.int64(), 2))), "y": _label()})
    x, _ = _read(tmp_path, pad_value=-1)
    assert x.shape == (ROWS, 2, 2)
    assert x[:3].tolist() == [[[1, 2], [-1, -1]], [[3, 4], [5, 6]], [[-1, -1], [-1, -1]]]
    with pytest.raises(ValueError, match=r"data.pad_value=0.5 is not allowed for data.input='x'.*an integer"):
        _read(tmp_path, pad_value=0.5)


def test_a_sliced_table_decodes_its_own_rows():
    table = pa.table({"x": pa.array(_ragged(), pa.list_(pa.float32())), "y": _label(),
                      "v": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(ROWS * 2)), 2)})
    x, y = table_to_tensors(table.slice(3, 2), ColumnSpec(("x", "v"), "y"))
    assert _bits_equal(x["x"], _padded(_ragged()[3:5], 3, 0.0))
    assert x["v"].tolist() == [[6, 7], [8, 9]] and y.tolist() == [3, 4]


def test_numpy_batches_decode_like_tables():
    """Ray Data's iter_batches(batch_format="numpy"): variable-size rows come as object arrays."""
    rows = _ragged()
    table = pa.table({"x": pa.array(rows, pa.list_(pa.float32())), "y": _label()})
    ragged = np.empty(ROWS, dtype=object)
    ragged[:] = [np.array(r, dtype=np.float32) for r in rows]
    spec = ColumnSpec(("x",), "y", pad_to=4)
    for got, want in zip(table_to_tensors({"x": ragged, "y": np.arange(ROWS)}, spec), table_to_tensors(table, spec)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    x, y = table_to_tensors({"x": np.ones((ROWS, 2, 2), np.float64), "y": np.arange(ROWS, dtype=np.int32)}, spec)
    assert x.dtype == torch.float32 and x.shape == (ROWS, 2, 2) and y.dtype == torch.int64
    ragged[2] = None
    with pytest.raises(ValueError, match=r"data.input='x': column 'x' holds nulls"):
        table_to_tensors({"x": ragged, "y": np.arange(ROWS)}, spec)


def test_several_inputs_as_dict_or_tuple(tmp_path):
    a, b = np.arange(ROWS, dtype=np.float32), np.arange(ROWS * 2, dtype=np.int32).reshape(ROWS, 2)
    _write(tmp_path / "a.parquet", {"b": pa.array(list(b), pa.list_(pa.int32(), 2)), "a": pa.array(a),
                                    "y": _label()})
    x, _ = read_columns(tmp_path, ColumnSpec(("a", "b"), "y"))
    assert list(x) == ["a", "b"] and _bits_equal(x["a"], a) and x["b"].tolist() == b.tolist()
    t, _ = read_columns(tmp_path, ColumnSpec(("b", "a"), "y", input_format="tuple"))
    assert isinstance(t, tuple) and torch.equal(t[0], x["b"]) and torch.equal(t[1], x["a"])
    one, _ = read_columns(tmp_path, ColumnSpec("a", "y"))  # one column: a bare tensor, whatever the format
    assert isinstance(one, torch.Tensor) and torch.equal(one, x["a"])


@pytest.mark.parametrize("kwargs, field", [
    ({"inputs": ()}, r"data.input=\[\]"),
    ({"inputs": ("a", "a")}, r"data.input=\['a', 'a'\]"),
    ({"target": ""}, "data.target=''"),
    ({"input_format": "list"}, "data.input_format='list' is not allowed: expected one of"),
    ({"pad_to": -1}, "data.pad_to=-1"),
    ({"pad_value": float("nan")}, "data.pad_value=nan"),
])
def test_column_spec_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ColumnSpec(**({"inputs": ("a",), "target": "y"} | kwargs))


# --- Files, footers and errors ----------------------------------------------------------------------


def test_files_and_summary_from_footers(tmp_path):
    for i in range(3):
        _write(tmp_path / f"part-{i}.parquet", {"x": pa.array(np.arange(ROWS, dtype=np.float32)), "y": _label()})
    (tmp_path / ".part-9.parquet.tmp").write_text("half-written")
    (tmp_path / ".hidden.parquet").write_text("not parquet")
    assert [p.name for p in parquet_files(tmp_path)] == [f"part-{i}.parquet" for i in range(3)]
    assert parquet_files(tmp_path / "part-1.parquet") == [tmp_path / "part-1.parquet"]
    summary = schema_summary(tmp_path)
    footer = pq.read_metadata(tmp_path / "part-0.parquet")
    assert summary == {"columns": {"x": "float", "y": "int64"}, "rows": 3 * ROWS, "files": 3,
                       "bytes": 3 * footer.row_group(0).total_byte_size}
    assert check_columns(tmp_path, ColumnSpec("x", "y")) == summary
    _, y = _read(tmp_path)
    assert y.tolist() == list(range(ROWS)) * 3  # in file order


def test_missing_column_names_the_field_and_the_columns(tmp_path):
    _write(tmp_path / "a.parquet", {"image": pa.array(np.zeros(ROWS)), "label": _label()})
    with pytest.raises(ConfigError, match=rf"^data.input='pixel' is not allowed: no column 'pixel' in "
                                          rf"data.path={tmp_path} \(columns: image, label\); expected one of those$"):
        check_columns(tmp_path, ColumnSpec("pixel", "label"))
    with pytest.raises(ConfigError, match=r"^data.target='lbl' is not allowed: no column 'lbl' in data.val_path="):
        check_columns(tmp_path, ColumnSpec("image", "lbl"), field="data.val_path")
    with pytest.raises(ConfigError, match=r"data.input='pixel' is not allowed: no column 'pixel' in data.path=.*a"):
        read_columns(tmp_path, ColumnSpec("pixel", "label"))


@pytest.mark.parametrize("array, shown", [
    (pa.array(["a"] * ROWS), "string"),
    (pa.array([["a"]] * ROWS, pa.list_(pa.string())), "list<string>"),
    (pa.array([[[1]]] * ROWS, pa.list_(pa.list_(pa.int64()))), "list<list<int64>>"),
])
def test_wrong_type_names_the_field_and_what_is_supported(tmp_path, array, shown):
    _write(tmp_path / "a.parquet", {"x": pa.array(np.zeros(ROWS)), "name": array})
    expected = (rf"^data.target='name': column 'name' has type {shown}; expected numbers, booleans or "
                r"\(fixed-size or variable-size\) lists of numbers$")
    with pytest.raises(ConfigError, match=expected):
        check_columns(tmp_path, ColumnSpec("x", "name"))
    with pytest.raises(ConfigError, match=expected):
        read_columns(tmp_path, ColumnSpec("x", "name"))


def test_nulls_are_named(tmp_path):
    _write(tmp_path / "a" / "a.parquet", {"x": pa.array([1.0, None] * 3), "y": _label()})
    with pytest.raises(ConfigError, match=r"data.input='x': column 'x' holds nulls in .*a.parquet; expected every"):
        check_columns(tmp_path / "a", ColumnSpec("x", "y"))
    with pytest.raises(ValueError, match=r"data.input='x': column 'x' holds nulls; expected every value present"):
        _read(tmp_path / "a")
    _write(tmp_path / "b" / "b.parquet", {"x": pa.array([[1.0], None] * 3), "y": _label()})
    with pytest.raises(ValueError, match=r"column 'x' holds nulls"):
        _read(tmp_path / "b")
    _write(tmp_path / "c" / "c.parquet", {"x": pa.array([[1.0], [None]] * 3), "y": _label()})
    with pytest.raises(ValueError, match=r"column 'x' holds nulls"):
        _read(tmp_path / "c")


def test_files_with_different_schemas_are_named(tmp_path):
    _write(tmp_path / "a" / "p0.parquet", {"x": pa.array(np.zeros(ROWS, np.float32)), "y": _label()})
    _write(tmp_path / "a" / "p1.parquet", {"x": pa.array(np.zeros(ROWS, np.float64)), "y": _label()})
    with pytest.raises(ValueError, match=r"column 'x' differs between the files: type float in .*p0.parquet, but "
                                         r"type double in .*p1.parquet"):
        schema_summary(tmp_path / "a")
    _write(tmp_path / "b" / "p0.parquet", {"x": pa.array(np.zeros(ROWS)), "y": _label()})
    _write(tmp_path / "b" / "p1.parquet", {"x": pa.array(np.zeros(ROWS))})
    with pytest.raises(ValueError, match=r"column 'y' differs .*: type int64 in .*p0.parquet, but no column 'y' in "
                                         r".*p1.parquet"):
        check_columns(tmp_path / "b", ColumnSpec("x", "y"))


def test_max_rows_reads_only_the_first_rows(tmp_path):
    _write(tmp_path / "p0.parquet", {"x": pa.array(np.arange(4.0)), "y": pa.array(np.arange(4))})
    _write(tmp_path / "p1.parquet", {"x": pa.array(np.arange(4.0, 10.0)), "y": pa.array(np.arange(4, 10))},
           row_group_size=2)
    # Had it been read, the null in the last file would raise.
    _write(tmp_path / "p2.parquet", {"x": pa.array([None, 1.0]), "y": pa.array([0, 1])})
    x, y = _read(tmp_path / "p0.parquet")
    assert y.tolist() == [0, 1, 2, 3]
    for n in (1, 4, 5, 10):
        x, y = read_columns(tmp_path, ColumnSpec("x", "y"), max_rows=n)
        assert y.tolist() == list(range(n)) and x.tolist() == [float(i) for i in range(n)]
    with pytest.raises(ValueError, match="holds nulls"):
        _read(tmp_path)


# --- Splits and batches -----------------------------------------------------------------------------


def _structured(rows: int = 21):
    base = torch.arange(rows)
    return {"a": base.float()[:, None], "b": (base * 10, base * 100)}, base


def test_tree_helpers():
    x, y = _structured(5)
    assert num_rows(x) == 5
    picked = select_rows(x, torch.tensor([4, 0]))
    assert picked["a"].tolist() == [[4.0], [0.0]] and picked["b"][1].tolist() == [400, 0]
    assert tree_map(lambda t: t.shape[0], x) == {"a": 5, "b": (5, 5)}
    with pytest.raises(ValueError, match=r"different numbers of rows \[5, 4\]"):
        num_rows((y, y[:4]))


def test_holdout_is_seeded_disjoint_and_covers_every_row():
    x, y = _structured(21)
    (tx, ty), (vx, vy) = holdout(x, y, 0.25, seed=3)
    assert len(vy) == 5 and len(ty) == 16  # round(21 * 0.25)
    assert sorted(ty.tolist() + vy.tolist()) == list(range(21)) and not set(ty.tolist()) & set(vy.tolist())
    assert torch.equal(tx["b"][1], ty * 100) and torch.equal(vx["a"][:, 0], vy.float())  # rows stay together
    assert torch.equal(holdout(x, y, 0.25, seed=3)[1][1], vy)
    assert not torch.equal(holdout(x, y, 0.25, seed=4)[1][1], vy)
    for bad in (0.0, 1.0, 0.99):
        with pytest.raises(ValueError, match=rf"data.val_fraction={bad}"):
            holdout(x, y, bad, seed=0)


@pytest.mark.parametrize("rows, world, batch", [(21, 4, 2), (10, 1, 4), (3, 5, 2)])
def test_eval_batches_cover_every_row_once_across_ranks(rows, world, batch):
    x, y = _structured(rows)
    seen = []
    for rank in range(world):
        batches = EvalBatches(x, y, batch, rank, world)
        got = list(batches)
        assert len(got) == len(batches) and batches.rows == len(range(rank, rows, world))
        assert all(len(b[1]) <= batch for b in got)
        for bx, by in got:
            assert torch.equal(bx["b"][0], by * 10)
            seen += by.tolist()
    assert sorted(seen) == list(range(rows))


def test_sharded_batches_take_the_same_rows_of_dict_inputs_as_of_a_tensor():
    x, y = _structured(21)
    plain = ShardedBatches(x["a"], y, 4, 1, 2, seed=5)
    structured = ShardedBatches(x, y, 4, 1, 2, seed=5)
    for _ in range(7):  # past an epoch boundary
        (px, py), (sx, sy) = plain.next_batch(), structured.next_batch()
        assert torch.equal(py, sy) and torch.equal(px, sx["a"]) and torch.equal(sx["b"][1], sy * 100)
    with pytest.raises(ValueError, match="inputs have 21 rows but targets 20"):
        ShardedBatches(x, y[:20], 4, 0, 2, 0)


# --- Ray Data's tensor columns ----------------------------------------------------------------------


def test_ray_tensor_columns(tmp_path):
    """Columns of ray.data.from_numpy / from_items with ndarrays, built without starting a cluster."""
    pytest.importorskip("ray")
    try:
        from ray.air.util.tensor_extensions.arrow import ArrowTensorArray
    except ImportError:  # moved in newer Ray; the alias module keeps only the types
        from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray
    import ray

    was_running = ray.is_initialized()  # a Ray test earlier in the session may have started one
    images = np.random.default_rng(1).standard_normal((ROWS, 2, 3)).astype(np.float32)
    seqs = np.empty(ROWS, dtype=object)
    seqs[:] = [np.arange(i % 3 + 1, dtype=np.int32) for i in range(ROWS)]
    fixed, variable = ArrowTensorArray.from_numpy(images), ArrowTensorArray.from_numpy(seqs)
    assert isinstance(fixed.type, pa.ExtensionType) and isinstance(variable.type, pa.ExtensionType)
    _write(tmp_path / "a.parquet", {"image": fixed, "seq": variable, "y": _label()})
    summary = check_columns(tmp_path, ColumnSpec(("image", "seq"), "y"))
    assert "shape=(2, 3)" in summary["columns"]["image"]
    x, _ = read_columns(tmp_path, ColumnSpec(("image", "seq"), "y", pad_value=-1))
    assert _bits_equal(x["image"], images)
    assert x["seq"].tolist()[:3] == [[0, -1, -1], [0, 1, -1], [0, 1, 2]] and x["seq"].dtype == torch.int64
    head, _ = read_columns(tmp_path, ColumnSpec("image", "y"), max_rows=2)
    assert _bits_equal(head, images[:2])
    # Read while Ray's types were unregistered, the column is its storage plus the extension's name.
    field = pa.field("image", fixed.storage.type, metadata={b"ARROW:extension:name": fixed.type.extension_name.encode(),
                                                            b"ARROW:extension:metadata": b"[2, 3]"})
    table = pa.Table.from_arrays([fixed.storage, _label()], schema=pa.schema([field, pa.field("y", pa.int64())]))
    assert _bits_equal(table_to_tensors(table, ColumnSpec("image", "y"))[0], images)
    assert ray.is_initialized() == was_running  # nothing here started a cluster
