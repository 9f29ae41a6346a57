"""Datasets as Parquet shards (pure pyarrow + torch), and per-rank deterministic batching.

Schema per model kind (schema version 1):

| kind | column     | Arrow type                                  | holds                                  |
| ---- | ---------- | ------------------------------------------- | -------------------------------------- |
| mlp  | `features` | `fixed_size_list<float32>[in_features]`     | one input row                          |
| mlp  | `label`    | `int64`                                     | class index                            |
| cnn  | `image`    | `fixed_size_list<float32>[C*H*W]`           | one image, flattened row-major (CHW)   |
| cnn  | `label`    | `int64`                                     | class index                            |
| gpt  | `tokens`   | `fixed_size_list<int32>[seq_len+1]`         | inputs = tokens[:-1], targets = tokens[1:] |

Parquet schema metadata, on every file:

| key                     | value                                                              |
| ----------------------- | ------------------------------------------------------------------ |
| `ampray.kind`           | `mlp`, `cnn` or `gpt`                                              |
| `ampray.schema_version` | `1`                                                                |
| `ampray.shape`          | JSON shape of one input row: `[in_features]`, `[C, H, W]`, `[seq_len]` |
| `ampray.vocab_size`     | gpt only: the vocabulary size                                      |

A dataset folder holds `part-00000.parquet`, `part-00001.parquet`, ... (rows split contiguously, in
order) and a `_dataset.json` manifest. Tokens are stored as int32 to halve the bytes and read back
as int64, the dtype `cross_entropy` wants; floats are stored as float32, so a round trip is bitwise.
Every data page carries a CRC-32 checksum (Parquet's page checksum), verified whenever a shard is read:
a shard damaged in the middle fails to read, naming the file, instead of training on garbage.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ampray.amp.config import ConfigError
from ampray.data.columns import leaves, num_rows, select_rows, unreadable
from ampray.data.synthetic import SyntheticConfig, make_dataset

SCHEMA_VERSION = 1
KINDS = ("mlp", "cnn", "gpt")
MANIFEST = "_dataset.json"
_INPUT_COLUMN = {"mlp": "features", "cnn": "image", "gpt": "tokens"}
_VALUE_TYPE = {"mlp": pa.float32(), "cnn": pa.float32(), "gpt": pa.int32()}
_COLUMNS = {"mlp": ["features", "label"], "cnn": ["image", "label"], "gpt": ["tokens"]}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; expected one of {list(KINDS)}")


# --- Writing ----------------------------------------------------------------------------------------


def _encode(kind: str, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows x width matrix of the list column, labels or None), after checking shapes and dtypes."""
    want_ndim = {"mlp": 2, "cnn": 4, "gpt": 2}[kind]
    if inputs.ndim != want_ndim or len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(f"write_dataset: kind {kind!r} wants inputs with {want_ndim} dims and as many "
                         f"(>= 1) rows as targets; got inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)}")
    if kind == "gpt":
        if inputs.is_floating_point() or inputs.shape != targets.shape:
            raise ValueError(f"write_dataset: gpt wants integer inputs and targets of one shape; got "
                             f"{inputs.dtype} {tuple(inputs.shape)} and {targets.dtype} {tuple(targets.shape)}")
        # One `tokens` column stores both only if targets are the inputs shifted by one token.
        if not torch.equal(inputs[:, 1:], targets[:, :-1]):
            raise ValueError("write_dataset: gpt targets must be the inputs shifted by one (targets[:, :-1] "
                             "== inputs[:, 1:]), since one `tokens` column stores both")
        tokens = torch.cat([inputs, targets[:, -1:]], dim=1)
        if tokens.min() < 0 or tokens.max() >= 2**31:
            raise ValueError("write_dataset: gpt tokens must lie in [0, 2**31) to be stored as int32")
        return tokens.to(torch.int32).numpy(), None
    if not inputs.is_floating_point() or targets.ndim != 1 or targets.is_floating_point():
        raise ValueError(f"write_dataset: {kind} wants float inputs and 1-d integer labels; got "
                         f"{inputs.dtype} inputs and {targets.dtype} targets {tuple(targets.shape)}")
    # reshape is logical, so a channels_last tensor still flattens in CHW order.
    return inputs.to(torch.float32).reshape(len(inputs), -1).numpy(), targets.to(torch.int64).numpy()


def _shard_table(kind: str, mat: np.ndarray, labels: np.ndarray | None, meta: dict[str, str]) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(mat).reshape(-1), type=_VALUE_TYPE[kind])
    columns = {_INPUT_COLUMN[kind]: pa.FixedSizeListArray.from_arrays(flat, mat.shape[1])}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    return pa.table(columns).replace_schema_metadata(meta)


def _atomic_write(path: Path, write) -> None:
    # A reader (or a crashed writer) never sees a half-written file under the final name: the temp
    # name is hidden and does not end in .parquet, so read_dataset skips it.
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_dataset(out_dir: str | Path, kind: str, inputs: torch.Tensor, targets: torch.Tensor,
                  num_shards: int = 4, *, seed: int | None = None, vocab_size: int | None = None,
                  source: dict | None = None) -> list[Path]:
    """Write (inputs, targets) as `num_shards` Parquet files plus a manifest; returns the shard paths.

    `seed` and `source` (how the data was made) are recorded in the manifest; `vocab_size` (gpt) is
    max token + 1 when not given.
    """
    _check_kind(kind)
    mat, labels = _encode(kind, inputs, targets)
    rows = len(mat)
    if not 1 <= num_shards <= rows:
        raise ValueError(f"write_dataset: num_shards={num_shards} is not allowed; expected 1 <= num_shards "
                         f"<= rows ({rows})")
    meta = {"ampray.kind": kind, "ampray.schema_version": str(SCHEMA_VERSION),
            "ampray.shape": json.dumps(list(inputs.shape[1:]))}
    if kind == "gpt":
        seen = int(mat.max()) + 1
        if vocab_size is not None and vocab_size < seen:
            raise ValueError(f"write_dataset: vocab_size={vocab_size} is smaller than max token + 1 ({seen})")
        vocab_size = vocab_size or seen
        meta["ampray.vocab_size"] = str(vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bounds = [i * rows // num_shards for i in range(num_shards + 1)]
    paths = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = _shard_table(kind, mat[a:b], None if labels is None else labels[a:b], meta)
        path = out / f"part-{i:05d}.parquet"
        _atomic_write(path, lambda tmp, t=table: pq.write_table(t, tmp, write_page_checksum=True))
        paths.append(path)
    # Shards left by an earlier, larger write would otherwise be read as part of this dataset.
    for stale in set(out.glob("part-*.parquet")) - set(paths):
        stale.unlink()
    manifest = {"kind": kind, "schema_version": SCHEMA_VERSION, "rows": rows,
                "shards": [{"file": p.name, "rows": b - a} for p, a, b in zip(paths, bounds, bounds[1:])],
                "input_shape": list(inputs.shape), "target_shape": list(targets.shape),
                "seed": seed, "vocab_size": vocab_size, "source": source}
    _atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return paths


def write_synthetic(out_dir: str | Path, kind: str, cfg: SyntheticConfig | None = None,
                    num_shards: int = 4) -> list[Path]:
    """Write the built-in synthetic corpus of `kind` (see `make_dataset`) as Parquet shards."""
    cfg = cfg or SyntheticConfig()
    inputs, targets = make_dataset(kind, cfg)
    return write_dataset(out_dir, kind, inputs, targets, num_shards, seed=cfg.seed,
                         vocab_size=cfg.vocab_size if kind == "gpt" else None,
                         source={"synthetic": asdict(cfg)})


def synth_main(out_dir: str | Path, kinds: tuple[str, ...] = KINDS, num_samples: int = 4096,
               seed: int = 0, num_shards: int = 4, **overrides) -> dict:
    """`ampray data synth`: one sub-folder per kind under `out_dir`; returns a summary per kind.

    `overrides` are further SyntheticConfig fields (seq_len=..., image_size=...).
    """
    for kind in kinds:
        _check_kind(kind)
    cfg = SyntheticConfig(num_samples=num_samples, seed=seed, **overrides)
    summary = {"out_dir": str(out_dir), "kinds": {}}
    for kind in kinds:
        paths = write_synthetic(Path(out_dir) / kind, kind, cfg, num_shards)
        manifest = json.loads((Path(out_dir) / kind / MANIFEST).read_text())
        summary["kinds"][kind] = {"path": str(Path(out_dir) / kind), "rows": manifest["rows"],
                                  "shards": len(paths), "input_shape": manifest["input_shape"],
                                  "bytes": sum(p.stat().st_size for p in paths)}
    return summary


# --- Reading ----------------------------------------------------------------------------------------


def _shard_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a Parquet file or a folder of them")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        kinds = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
        hint = (f"; its folders {kinds} do (`ampray data synth` writes one per model kind): name one of them, "
                f"such as {path / kinds[0]}" if kinds else "; expected part-00000.parquet, ...")
        raise FileNotFoundError(f"{path} holds no .parquet files{hint}")
    return files


def schema_version(meta: dict[str, str], where: str) -> int:
    """The file's `ampray.schema_version` (1 when absent); ConfigError unless this ampray can read it."""
    text = meta.get("ampray.schema_version", str(SCHEMA_VERSION))
    try:
        version = int(text)
    except ValueError:
        version = None
    if version is None or not 1 <= version <= SCHEMA_VERSION:
        raise ConfigError(f"{where}: ampray.schema_version is {text!r}; this ampray reads schema versions 1 to "
                          f"{SCHEMA_VERSION} (a newer version was written by a newer ampray: upgrade to read it)")
    return version


def _file_kind(schema: pa.Schema, requested: str | None, where: str) -> tuple[str, dict[str, str]]:
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    found = meta.get("ampray.kind")
    schema_version(meta, where)
    if requested is not None and found is not None and found != requested:
        raise ConfigError(f"{where}: ampray.kind is {found!r}; expected {requested!r}")
    kind = requested or found
    if kind is None:
        raise ConfigError(f"{where}: no ampray.kind in the Parquet metadata; pass kind= (one of {list(KINDS)})")
    _check_kind(kind)
    return kind, meta


def _check_type(schema: pa.Schema, name: str, kind: str, where: str) -> None:
    if name not in schema.names:
        raise ConfigError(f"{where}: column {name!r} missing; expected columns {_COLUMNS[kind]} for kind {kind!r}")
    t = schema.field(name).type
    want = "int64" if name == "label" else f"fixed_size_list<{_VALUE_TYPE[kind]}>"
    ok = (t == pa.int64() if name == "label" else
          pa.types.is_fixed_size_list(t) and t.value_type == _VALUE_TYPE[kind])
    if not ok:
        raise ConfigError(f"{where}: column {name!r} has type {t}; expected {want} for kind {kind!r}")


def _shape(meta: dict[str, str], kind: str, width: int, where: str) -> list[int]:
    try:
        shape = json.loads(meta["ampray.shape"]) if "ampray.shape" in meta else None
        ok = shape is None or (isinstance(shape, list) and shape and all(type(n) is int and n > 0 for n in shape))
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}: ampray.shape is {meta['ampray.shape']!r}; expected a JSON list of sizes > 0")
    if kind == "cnn" and (shape is None or len(shape) != 3):
        got = "no ampray.shape in the Parquet metadata" if shape is None else f"ampray.shape is {shape}"
        raise ConfigError(f"{where}: {got}; expected [C, H, W] for kind 'cnn'")
    expected_width = int(np.prod(shape)) + (kind == "gpt") if shape is not None else width
    if expected_width != width:
        raise ConfigError(f"{where}: column {_INPUT_COLUMN[kind]!r} holds lists of {width}; expected "
                          f"{expected_width} from ampray.shape={shape}")
    return shape or [width - (kind == "gpt")]


def check_shard_schema(schema: pa.Schema, kind: str | None, where: str) -> tuple[str, list[int]]:
    """(kind, shape of one input row) of one shard in ampray's schema, from its schema alone: the schema
    version, the kind (agreeing with `kind` when given), the columns and their types, the list width
    against `ampray.shape`. Raises ConfigError naming `where`."""
    kind, meta = _file_kind(schema, kind, where)
    for name in _COLUMNS[kind]:
        _check_type(schema, name, kind, where)
    return kind, _shape(meta, kind, schema.field(_INPUT_COLUMN[kind]).type.list_size, where)


def _column(table: pa.Table, name: str, where: str) -> pa.Array:
    col = table.column(name).combine_chunks()
    if col.null_count or (name != "label" and col.flatten().null_count):
        raise ValueError(f"{where}: column {name!r} holds nulls; expected every value present")
    return col


def _decode(table: pa.Table, kind: str | None, where: str):
    """(kind, rows x width matrix, labels or None, shape of one input row) of one shard."""
    kind, shape = check_shard_schema(table.schema, kind, where)
    col = _column(table, _INPUT_COLUMN[kind], where)
    mat = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    labels = _column(table, "label", where).to_numpy() if kind != "gpt" else None
    return kind, mat, labels, shape


def read_shard(file: Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, its page checksums verified where it has them; an unreadable file (damaged pages,
    not Parquet) raises ConfigError naming it."""
    try:
        return pq.read_table(file, columns=columns, page_checksum_verification=True)
    except OSError as err:  # pyarrow's IOError: a failed page checksum, a corrupt page or footer
        raise unreadable(file, err) from None


def read_dataset(path: str | Path, kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from one Parquet file or every shard of a folder, in file order.

    `kind` None takes the kind from the files' metadata; otherwise the metadata must agree with it.
    """
    if kind is not None:
        _check_kind(kind)
    mats, labels, first_shape = [], [], None
    for file in _shard_files(Path(path)):
        where = f"data.path={file}"
        table = read_shard(file)
        kind, mat, lab, shape = _decode(table, kind, where)  # the first file fixes the kind for the others
        if first_shape is not None and shape != first_shape:
            raise ValueError(f"{where}: ampray.shape is {shape}; expected {first_shape} like the earlier shards")
        first_shape = shape
        mats.append(mat)
        labels.append(lab)
    # np.concatenate copies into one writable array, so torch.from_numpy shares it without a warning.
    x = torch.from_numpy(np.concatenate(mats))
    if kind == "gpt":
        tokens = x.long()
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return x.reshape(len(x), *first_shape), torch.from_numpy(np.concatenate(labels))


# --- Per-rank batching ------------------------------------------------------------------------------


class ShardedBatches:
    """Deterministic per-rank batches over in-memory tensors, for data-parallel training.

    `inputs` is a tensor, or a tuple or dict of tensors (several input columns), all with the rows of
    `targets`; a batch holds the same rows of each.

    Epoch e permutes all rows with `torch.Generator().manual_seed(seed + epoch)`; rank r takes
    positions r::world_size of it, so ranks are disjoint and, since the permutation is cut to a
    multiple of world_size, equal in size: DDP ranks must run the same number of steps, or an
    all-reduce waits forever.
    """

    def __init__(self, inputs: torch.Tensor | tuple | dict, targets: torch.Tensor, batch_size: int, rank: int,
                 world_size: int, seed: int, drop_last: bool = True):
        rows = num_rows(inputs)
        if rows != len(targets):
            raise ValueError(f"ShardedBatches: inputs have {rows} rows but targets {len(targets)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatches: rank={rank}, world_size={world_size} is not allowed; "
                             "expected world_size >= 1 and 0 <= rank < world_size")
        self.rows, self.rows_per_rank = rows, rows // world_size
        if not 1 <= batch_size <= self.rows_per_rank:
            raise ValueError(f"ShardedBatches: batch_size={batch_size} is not allowed; expected 1 <= batch_size "
                             f"<= rows per rank ({self.rows_per_rank} = {rows} rows // world_size {world_size})")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.drop_last = drop_last
        self.epoch, self.batch_index = 0, 0
        self._cached: tuple[int, torch.Tensor] | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.rows_per_rank, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def _rank_indices(self, epoch: int) -> torch.Tensor:
        # Cached: recomputing a permutation of every row on each batch would cost O(rows) per step.
        if self._cached is None or self._cached[0] != epoch:
            perm = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch))
            mine = perm[: self.rows_per_rank * self.world_size][self.rank :: self.world_size]
            # On the data's device: indexing GPU tensors with a CPU index would copy it every batch.
            self._cached = (epoch, mine.to(leaves(self.inputs)[0].device))
        return self._cached[1]

    def next_batch(self) -> tuple[torch.Tensor | tuple | dict, torch.Tensor]:
        """The next (x, y); after the last batch of an epoch, the next epoch begins."""
        start = self.batch_index * self.batch_size
        idx = self._rank_indices(self.epoch)[start : start + self.batch_size]
        self.batch_index += 1
        # Roll over here, so that state_dict always names the batch to be yielded next.
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        return select_rows(self.inputs, idx), self.targets[idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"ShardedBatches.load_state_dict: epoch={epoch}, batch_index={index} is not allowed; "
                             f"expected epoch >= 0 and 0 <= batch_index < {self.batches_per_epoch}")
        self.epoch, self.batch_index = epoch, index
