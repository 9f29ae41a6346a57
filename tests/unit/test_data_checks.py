"""The driver's check of every shard before any worker starts (ampray/data/checks.py, preflight's
check_data_files): real Parquet files in tmp_path, damaged one way each; every error names the file, the
column, the value or row, and what is allowed."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampray.data.checks import ColumnRule, check_ampray_shards, check_files
from ampray.data.columns import parquet_files, read_columns
from ampray.data.parquet import read_dataset, write_synthetic
from ampray.data.synthetic import SyntheticConfig
from ampray.job import ConfigError, JobConfig
from ampray.orchestrator.preflight import check_model_and_data
from ampray.orchestrator.cli import main

SMALL = SyntheticConfig(num_samples=48, seed=1, in_features=8, num_classes=5, vocab_size=50, seq_len=12)
GPT = {"model.kind": "gpt", "model.options": {"vocab_size": 50, "block_size": 12, "n_layer": 1, "n_head": 2,
                                               "n_embd": 16}}
MLP = {"model.kind": "mlp", "model.options": {"in_features": 8, "num_classes": 5}}


def _job(data, model=MLP, **data_fields) -> JobConfig:
    return JobConfig.load(None, {**model, "data.path": str(data), "data.batch_size": 8,
                                 **{f"data.{k}": v for k, v in data_fields.items()}})


def _dataset(tmp_path, kind: str, name: str = "d"):
    write_synthetic(tmp_path / name, kind, SMALL, num_shards=4)  # 12 rows per shard
    return tmp_path / name


def _shard(folder, i: int):
    return folder / f"part-{i:05d}.parquet"


def _edit(file, column: str, edit, **write) -> None:
    """Rewrite one column of `file` through numpy: edit(values) changes the (rows x width) array in place."""
    table = pq.read_table(file)
    col = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        values = col.flatten().to_numpy().reshape(len(col), col.type.list_size).copy()
        edit(values)
        new = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), col.type.value_type), values.shape[1])
    else:
        values = col.to_numpy().copy()
        edit(values)
        new = pa.array(values, col.type)
    table = table.set_column(table.schema.get_field_index(column), column, new)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), file, **write)


def _fails(job, *needles: str) -> str:
    with pytest.raises(ConfigError) as err:
        check_model_and_data(job)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    return message


# --- Clean data, and the time the check takes ---------------------------------------------------------


@pytest.mark.parametrize("kind, model", [("mlp", MLP), ("gpt", GPT)])
def test_clean_data_passes_and_the_check_reports_what_it_read(tmp_path, kind, model):
    data = _dataset(tmp_path, kind)
    plan = check_model_and_data(_job(data, model))
    report = plan.data_check
    assert (report.mode, report.files, report.rows) == ("full", 4, 48)
    assert report.bytes == sum(p.stat().st_size for p in parquet_files(data))
    assert 0 < report.seconds < 5
    assert re.fullmatch(r"data check \(full, every value\): 4 shard\(s\), 48 rows, \d+\.\d MiB in \d+\.\d\d s "
                        r"\([\d,]+ rows/s, [\d,]+ MiB/s\)", report.line()), report.line()
    assert report.to_dict()["rows"] == 48


def test_the_held_out_set_is_checked_too_and_counted(tmp_path):
    data, val = _dataset(tmp_path, "mlp"), _dataset(tmp_path, "mlp", "val")
    assert check_model_and_data(_job(data, val_path=str(val))).data_check.files == 8
    _edit(_shard(val, 3), "features", lambda v: v.__setitem__((4, 2), np.nan))
    _fails(_job(data, val_path=str(val)), f"data.val_path={_shard(val, 3)}: column 'features' holds nan in row 4")


# --- Schema: columns, types, shapes, versions ---------------------------------------------------------


def test_a_shard_missing_its_column(tmp_path):
    data = _dataset(tmp_path, "gpt")
    table = pq.read_table(_shard(data, 2))
    pq.write_table(table.rename_columns(["toknes"]).replace_schema_metadata(table.schema.metadata), _shard(data, 2))
    _fails(_job(data, GPT), f"data.path={_shard(data, 2)}: column 'tokens' missing; expected columns ['tokens'] "
                            "for kind 'gpt'")


def test_a_shard_with_the_wrong_type(tmp_path):
    data = _dataset(tmp_path, "mlp")
    table = pq.read_table(_shard(data, 1))
    table = table.set_column(1, "label", table.column("label").cast(pa.float64()))
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), _shard(data, 1))
    _fails(_job(data), f"data.path={_shard(data, 1)}: column 'label' has type double; expected int64 for kind 'mlp'")


def test_list_width_disagreeing_with_the_shape_metadata(tmp_path):
    data = _dataset(tmp_path, "gpt")
    table = pq.read_table(_shard(data, 3))
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(12, 13)[:, :11]
    narrow = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1)), 11)})
    pq.write_table(narrow.replace_schema_metadata(table.schema.metadata), _shard(data, 3))
    _fails(_job(data, GPT), f"data.path={_shard(data, 3)}: column 'tokens' holds lists of 11; expected 13 from "
                            "ampray.shape=[12]")


def test_shards_of_different_shapes(tmp_path):
    data = _dataset(tmp_path, "gpt")
    write_synthetic(tmp_path / "short", "gpt", SyntheticConfig(num_samples=12, seed=2, vocab_size=50, seq_len=8),
                    num_shards=1)
    (tmp_path / "short" / "part-00000.parquet").replace(_shard(data, 2))
    message = _fails(_job(data, GPT), f"data.path={_shard(data, 2)}: ampray.shape is [8]; expected [12] as in "
                                      f"{_shard(data, 0)} (every shard of a dataset holds rows of one shape)")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_ampray_shards(parquet_files(data), "data.path", None)


@pytest.mark.parametrize("version", ["2", "one"])
def test_a_schema_version_this_ampray_cannot_read(tmp_path, version):
    data = _dataset(tmp_path, "mlp")
    table = pq.read_table(_shard(data, 1))
    meta = {**table.schema.metadata, b"ampray.schema_version": version.encode()}
    pq.write_table(table.replace_schema_metadata(meta), _shard(data, 1))
    needle = (f"data.path={_shard(data, 1)}: ampray.schema_version is {version!r}; this ampray reads schema "
              "versions 1 to 1")
    _fails(_job(data), needle)
    # The workers' reader says the same (one rule, one place).
    with pytest.raises(ConfigError, match=re.escape(needle)):
        read_dataset(data, "mlp")


# --- Values: nulls, non-finite floats, ranges ---------------------------------------------------------


def test_null_labels_are_found_even_without_footer_statistics(tmp_path):
    data = _dataset(tmp_path, "mlp")
    table = pq.read_table(_shard(data, 2))
    labels = pa.array([None if i == 7 else v for i, v in enumerate(table.column("label").to_pylist())], pa.int64())
    table = table.set_column(1, "label", labels)
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), _shard(data, 2), write_statistics=False)
    _fails(_job(data), f"data.path={_shard(data, 2)}: column 'label' holds nulls (the first in row 7); expected "
                       "every value present")


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_features(tmp_path, value, shown):
    data = _dataset(tmp_path, "mlp")
    _edit(_shard(data, 1), "features", lambda v: (v.__setitem__((9, 3), value), v.__setitem__((10, 0), value)))
    _fails(_job(data), f"data.path={_shard(data, 1)}: column 'features' holds {shown} in row 9 (the first of 2 "
                       "non-finite values in rows 0 to 11); expected finite numbers")


@pytest.mark.parametrize("token", [77, 50, -3])
def test_token_ids_outside_the_vocabulary(tmp_path, token):
    data = _dataset(tmp_path, "gpt")
    _edit(_shard(data, 2), "tokens", lambda v: v.__setitem__((5, 4), token))
    _fails(_job(data, GPT), f"data.path={_shard(data, 2)}: column 'tokens' holds {token} in row 5",
           "expected integers in [0, 50): token ids below model.options.vocab_size=50")


def test_labels_outside_the_models_classes(tmp_path):
    data = _dataset(tmp_path, "mlp")
    _edit(_shard(data, 3), "label", lambda v: v.__setitem__(6, 5))
    _fails(_job(data), f"data.path={_shard(data, 3)}: column 'label' holds 5 in row 6",
           "expected integers in [0, 5): class labels below model.options.num_classes=5")
    _edit(_shard(data, 3), "label", lambda v: v.__setitem__(6, -1))
    _fails(_job(data), f"data.path={_shard(data, 3)}: column 'label' holds -1 in row 6")


def test_rows_are_counted_across_streamed_batches(tmp_path):
    rows = 150_000  # three batches of the scan
    labels = np.zeros(rows, dtype=np.int64)
    labels[140_001] = 9
    file = tmp_path / "big.parquet"
    pq.write_table(pa.table({"label": labels}), file, row_group_size=50_000)
    with pytest.raises(ConfigError, match=r"big.parquet: column 'label' holds 9 in row 140001 \(rows 131072 to "
                                          r"149999 hold values in \[0, 9\]\); expected integers in \[0, 3\): few"):
        check_files([("data.path", [file])], [ColumnRule("label", 0, 3, "few")], "full")


# --- Damaged files: page checksums --------------------------------------------------------------------


def _flip_middle(file, size: int = 4096) -> None:
    data = bytearray(file.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8  # the footer and its length and magic stay intact
    mid = len(data) // 2
    assert mid + size < len(data) - footer
    data[mid : mid + size] = bytes(b ^ 0xFF for b in data[mid : mid + size])
    file.write_bytes(bytes(data))


def test_a_shard_with_4_kib_flipped_in_its_middle_fails_naming_it(tmp_path, capsys):
    # Written by `ampray data synth`, as a user would: 1024 rows of 784 features in 2 shards.
    assert main(["data", "synth", "--out", str(tmp_path), "--kinds", "mlp", "--num-samples", "1024",
                 "--shards", "2"]) == 0
    data, bad = tmp_path / "mlp", _shard(tmp_path / "mlp", 1)
    job = _job(data, {"model.kind": "mlp", "model.options": {"in_features": 784, "num_classes": 10}})
    assert check_model_and_data(job).data_check.rows == 1024
    _flip_middle(bad)
    _fails(job, f"{bad}: cannot be read as Parquet (could not verify page integrity, CRC checksum verification failed",
           "expected an intact file")
    # The footer still reads: only the pages' checksums tell the damage.
    assert pq.read_metadata(bad).num_rows == 512
    # The workers' readers verify the checksums too.
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: cannot be read as Parquet")):
        read_dataset(data, "mlp")
    from ampray.data.columns import ColumnSpec

    with pytest.raises(ConfigError, match=re.escape(f"{bad}: cannot be read as Parquet")):
        read_columns(data, ColumnSpec(("features",), "label"))


# --- data.check -----------------------------------------------------------------------------------------


def test_data_check_schema_reads_no_values_and_off_reads_nothing(tmp_path):
    data = _dataset(tmp_path, "mlp")
    _edit(_shard(data, 0), "features", lambda v: v.__setitem__((0, 0), np.nan))
    report = check_model_and_data(_job(data, check="schema")).data_check
    assert (report.mode, report.files, report.rows) == ("schema", 4, 48)
    assert report.line().startswith("data check (schema, footers only): 4 shard(s), 48 rows")
    assert check_model_and_data(_job(data, check="off")).data_check is None
    _fails(_job(data), "column 'features' holds nan in row 0")  # "full", the default, finds it
    table = pq.read_table(_shard(data, 1))
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"ampray.schema_version": b"3"}),
                   _shard(data, 1))
    _fails(_job(data, check="schema"), "ampray.schema_version is '3'")


def test_data_check_rejects_other_values():
    with pytest.raises(ConfigError, match=r"data.check='fast' is not allowed: expected one of "
                                          r"\['full', 'schema', 'off'\]"):
        JobConfig.load(None, {"data.check": "fast"})


# --- Your own model: the ranges its options declare -----------------------------------------------------

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Bag(nn.Module):
        def __init__(self, vocab_size, num_classes):
            super().__init__()
            self.emb, self.head = nn.Embedding(vocab_size, 8), nn.Linear(8, num_classes)

        def forward(self, batch):
            return self.head(self.emb(batch["ids"]).mean(1) + batch["extra"].sum(1, keepdim=True))


    def build(vocab_size: int = 20, num_classes: int = 3):
        return Bag(vocab_size, num_classes)
''')


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    (tmp_path / "bagnet.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (40, 6))
    extra = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 5, 40)]
    table = pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), 6),
                      "extra": pa.array(extra, pa.list_(pa.float32())), "y": pa.array(rng.integers(0, 3, 40))})
    (tmp_path / "data").mkdir()
    for i in range(2):
        pq.write_table(table.slice(20 * i, 20), tmp_path / "data" / f"part-{i}.parquet")
    yield tmp_path
    sys.modules.pop("bagnet", None)


def _user_job(options=None) -> JobConfig:
    return JobConfig.load(None, {"model.factory": "bagnet:build", "model.options": options or {},
                                 "data.path": "data", "data.input": ["ids", "extra"], "data.target": "y",
                                 "data.batch_size": 8})


def test_your_model_passes_and_gets_the_ranges_its_options_declare(user_project):
    assert check_model_and_data(_user_job({"vocab_size": 20, "num_classes": 3})).data_check.rows == 40
    file = user_project / "data" / "part-1.parquet"
    _edit(file, "ids", lambda v: v.__setitem__((3, 1), 20))
    assert check_model_and_data(_user_job()).data_check.rows == 40  # no vocab_size declared: not compared
    _fails(_user_job({"vocab_size": 20}), f"data.path={file}: column 'ids' holds 20 in row 3",
           "expected integers in [0, 20): token ids below model.options.vocab_size=20")
    _edit(file, "ids", lambda v: v.__setitem__((3, 1), 0))
    _edit(file, "y", lambda v: v.__setitem__(11, 4))
    _fails(_user_job({"num_classes": 3}), f"data.path={file}: column 'y' holds 4 in row 11",
           "expected integers in [0, 3): class labels below model.options.num_classes=3")


def test_your_variable_length_column_with_inf_or_a_null_inside(user_project):
    file = user_project / "data" / "part-0.parquet"
    table = pq.read_table(file)
    extra = table.column("extra").to_pylist()
    extra[13] = [*extra[13][:-1], float("inf")]
    pq.write_table(table.set_column(1, "extra", pa.array(extra, pa.list_(pa.float32()))), file)
    _fails(_user_job(), f"data.path={file}: column 'extra' holds inf in row 13 (the first of 1 non-finite values")
    extra[13] = [None, 1.0]
    pq.write_table(table.set_column(1, "extra", pa.array(extra, pa.list_(pa.float32()))), file)
    _fails(_user_job(), f"data.path={file}: column 'extra' holds nulls (the first in row 13)")


# --- End to end: `ampray train` stops in seconds, before Ray -------------------------------------------------


def test_ampray_train_with_bad_data_fails_in_seconds_before_ray_starts(tmp_path):
    data = _dataset(tmp_path, "gpt")
    _edit(_shard(data, 2), "tokens", lambda v: v.__setitem__((5, 4), 77))
    (tmp_path / "job.toml").write_text(textwrap.dedent(f'''
        [model]
        kind = "gpt"
        options = {{ vocab_size = 50, block_size = 12, n_layer = 1, n_head = 2, n_embd = 16 }}
        [data]
        path = "{data}"
        batch_size = 8
        [run]
        storage_path = "{tmp_path / 'runs'}"
    '''))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ampray.orchestrator.cli", "train", "--config",
                           str(tmp_path / "job.toml")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"ampray train: error: data.path={_shard(data, 2)}: column 'tokens' holds 77 in row 5" in proc.stderr
            and "token ids below model.options.vocab_size=50" in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()  # the run folder (made before Ray starts) was never created
    assert elapsed < 60, elapsed


def test_a_truncated_footer_is_named_by_the_workers_reader(tmp_path):
    """A file cut short (its footer gone) gives pyarrow's ArrowInvalid, a ValueError: the workers' column
    reader names the file all the same, instead of raising pyarrow's own error."""
    from ampray.data.columns import ColumnSpec

    pq.write_table(pa.table({"x": pa.array(np.arange(64, dtype=np.float32)), "y": pa.array(np.arange(64))}),
                   tmp_path / "part-0.parquet")
    bad = tmp_path / "part-0.parquet"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: cannot be read as Parquet")):
        read_columns(tmp_path, ColumnSpec(("x",), "y"))


def test_an_8_bit_image_beside_the_token_ids_is_not_held_to_the_vocabulary(user_project):
    """Token ids beside a uint8 image: the image's 0..255 are pixels, not token ids, so only the wider integer
    column is held to model.options.vocab_size."""
    file = user_project / "data" / "part-1.parquet"
    table = pq.read_table(file)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(np.full(20 * 6, 200, np.uint8)), 6)
    pq.write_table(table.set_column(1, "extra", pixels), file)
    other = user_project / "data" / "part-0.parquet"
    table = pq.read_table(other)
    pq.write_table(table.set_column(1, "extra", pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(20 * 6, np.uint8)), 6)), other)
    job = _user_job({"vocab_size": 20, "num_classes": 3})
    assert check_model_and_data(job).data_check.rows == 40
    _edit(file, "ids", lambda v: v.__setitem__((3, 1), 20))
    _fails(job, f"data.path={file}: column 'ids' holds 20 in row 3",
           "expected integers in [0, 20): token ids below model.options.vocab_size=20")
