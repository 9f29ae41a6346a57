"""CPU tests of the Parquet dataset format and of per-rank batching: round trips, errors, resume."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ampray.data.parquet import (
    KINDS,
    MANIFEST,
    ShardedBatches,
    read_dataset,
    synth_main,
    write_dataset,
    write_synthetic,
)
from ampray.data.synthetic import SyntheticConfig, make_dataset

# Small enough that writing every kind takes milliseconds.
SMALL = SyntheticConfig(num_samples=24, seed=3, in_features=12, image_size=8, in_channels=2,
                        vocab_size=50, seq_len=10)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise(tmp_path, kind):
    paths = write_synthetic(tmp_path, kind, SMALL, num_shards=4)
    assert [p.name for p in paths] == [f"part-0000{i}.parquet" for i in range(4)]
    x, y = read_dataset(tmp_path, kind)
    ex, ey = make_dataset(kind, SMALL)
    for got, want in ((x, ex), (y, ey)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    # One shard alone reads too, and holds its contiguous slice of rows.
    x1, _ = read_dataset(paths[1])
    assert torch.equal(x1, ex[6:12])


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_and_manifest(tmp_path, kind):
    write_synthetic(tmp_path, kind, SMALL, num_shards=3)
    meta = pq.read_schema(tmp_path / "part-00000.parquet").metadata
    assert meta[b"ampray.kind"] == kind.encode()
    assert meta[b"ampray.schema_version"] == b"1"
    if kind == "cnn":
        assert json.loads(meta[b"ampray.shape"]) == [2, 8, 8]
    if kind == "gpt":
        assert meta[b"ampray.vocab_size"] == b"50"
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["kind"] == kind and manifest["rows"] == 24 and manifest["seed"] == 3
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 8]
    assert not list(tmp_path.glob(".*.tmp"))


def test_rewrite_with_fewer_shards_drops_stale_files(tmp_path):
    write_synthetic(tmp_path, "mlp", SMALL, num_shards=4)
    write_synthetic(tmp_path, "mlp", SMALL, num_shards=2)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(read_dataset(tmp_path)[0]) == 24


def test_synth_main_writes_one_folder_per_kind(tmp_path):
    summary = synth_main(tmp_path, num_samples=8, seed=1, num_shards=2, in_features=4, image_size=4,
                         seq_len=5)
    assert set(summary["kinds"]) == set(KINDS)
    for kind in KINDS:
        assert summary["kinds"][kind]["rows"] == 8
        assert len(read_dataset(tmp_path / kind, kind)[0]) == 8


def test_wrong_kind_names_path_and_both_kinds(tmp_path):
    write_synthetic(tmp_path, "mlp", SMALL, num_shards=1)
    with pytest.raises(ValueError, match=r"data.path=.*part-00000.parquet: ampray.kind is 'mlp'; expected 'gpt'"):
        read_dataset(tmp_path, "gpt")


def test_missing_column_names_field_and_expected_columns(tmp_path):
    table = pa.table({"ids": pa.array([1, 2], pa.int64())}).replace_schema_metadata({"ampray.kind": "gpt"})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"column 'tokens' missing; expected columns \['tokens'\] for kind 'gpt'"):
        read_dataset(tmp_path)


def test_wrong_column_type_is_named(tmp_path):
    table = pa.table({"features": pa.array([[1.0, 2.0]], pa.list_(pa.float64())), "label": [0]})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"column 'features' has type .*; expected fixed_size_list<float>"):
        read_dataset(tmp_path, "mlp")


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r".*nope does not exist"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r".* holds no .parquet files; expected part-00000.parquet"):
        read_dataset(tmp_path)
    # The folder `ampray data synth --out` wrote (one sub-folder per kind): the error names them.
    write_dataset(tmp_path / "gpt", "gpt", *make_dataset("gpt", SMALL))
    with pytest.raises(FileNotFoundError, match=r"its folders \['gpt'\] do .*: name one of them, such as .*/gpt"):
        read_dataset(tmp_path)


def test_write_rejects_bad_inputs(tmp_path):
    x, y = make_dataset("gpt", SMALL)
    with pytest.raises(ValueError, match="shifted by one"):
        write_dataset(tmp_path, "gpt", x, y.flip(1))
    with pytest.raises(ValueError, match="num_shards=100"):
        write_dataset(tmp_path, "gpt", x, y, num_shards=100)
    with pytest.raises(ValueError, match="kind='rnn'"):
        write_dataset(tmp_path, "rnn", x, y)


# ---------------------------------------------------------------------------------------------------
# ShardedBatches
# ---------------------------------------------------------------------------------------------------


def _data(rows: int = 21):
    return torch.arange(rows, dtype=torch.float32)[:, None], torch.arange(rows)


def test_two_ranks_are_disjoint_and_cover_the_epoch():
    x, y = _data(21)
    seen = []
    for rank in range(2):
        batches = ShardedBatches(x, y, batch_size=5, rank=rank, world_size=2, seed=7, drop_last=False)
        assert batches.batches_per_epoch == 2  # 10 rows per rank: the 21st row is cut for equal counts
        seen.append(torch.cat([batches.next_batch()[1] for _ in range(batches.batches_per_epoch)]))
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(7))
    assert sorted(seen[0].tolist() + seen[1].tolist()) == sorted(perm[:20].tolist())


def test_epochs_differ_and_same_seed_repeats():
    x, y = _data()
    a, b = (ShardedBatches(x, y, 4, 0, 2, seed=1) for _ in range(2))
    first = [a.next_batch()[1] for _ in range(6)]
    assert all(torch.equal(f, b.next_batch()[1]) for f in first)
    assert not torch.equal(first[0], first[2])  # epoch 1 starts at batch 2 (10 rows // 4)
    assert ShardedBatches(x, y, 4, 0, 2, seed=2).next_batch()[1].tolist() != first[0].tolist()


@pytest.mark.parametrize("stop", [1, 2, 3])  # mid-epoch, at the boundary, in the second epoch
def test_resume_yields_the_same_batches(stop):
    x, y = _data()
    whole = ShardedBatches(x, y, 4, 1, 2, seed=5)
    expected = [whole.next_batch()[1] for _ in range(7)]
    first = ShardedBatches(x, y, 4, 1, 2, seed=5)
    for _ in range(stop):
        first.next_batch()
    state = first.state_dict()
    resumed = ShardedBatches(x, y, 4, 1, 2, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()[1], e) for e in expected[stop:])
    if stop == 2:
        assert state == {"epoch": 1, "batch_index": 0}


@pytest.mark.parametrize("kwargs, field", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=11), "batch_size=11"),
    (dict(rank=2), "rank=2"),
    (dict(rank=-1), "rank=-1"),
])
def test_validation_names_the_field(kwargs, field):
    x, y = _data()
    args = dict(batch_size=4, rank=0, world_size=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=field):
        ShardedBatches(x, y, **args)
    with pytest.raises(ValueError, match="batch_index=9"):
        ShardedBatches(x, y, 4, 0, 2, 0).load_state_dict({"epoch": 0, "batch_index": 9})
