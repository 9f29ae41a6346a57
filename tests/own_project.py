"""A user's project, written into a test's temporary folder (never importable from the package): a model
that takes two input columns as a dict, a custom loss, and Parquet data with column names of its own."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MODULE = textwrap.dedent('''
    """The user's own model and loss."""
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Net(nn.Module):
        def __init__(self, width: int, features: int, classes: int, dropout: float = 0.0):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(features + 1, width), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(width, classes))

        def forward(self, batch):
            x = torch.cat([batch["pixels"], batch["bonus"][:, None]], dim=1)
            return self.body(x)


    def build(width: int = 32, features: int = 16, classes: int = 4, dropout: float = 0.0) -> nn.Module:
        return Net(width, features, classes, dropout)


    def smoothed(output, target):
        return F.cross_entropy(output, target, label_smoothing=0.05)


    def not_a_module(**options):
        return {"weights": 1}
''')


def teacher_data(rows: int, features: int = 16, classes: int = 4, seed: int = 0) -> pa.Table:
    """Rows a model can learn: the class is the argmax of a fixed linear map of the inputs."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(1234).standard_normal((features + 1, classes))
    pixels = rng.standard_normal((rows, features)).astype(np.float32)
    bonus = rng.standard_normal(rows)  # float64: read back as float32
    klass = (np.concatenate([pixels, bonus[:, None]], axis=1) @ teacher).argmax(axis=1).astype(np.int64)
    return pa.table({"pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), features),
                     "bonus": pa.array(bonus), "klass": pa.array(klass), "note": pa.array(["x"] * rows)})


def write_project(root: Path, train_rows: int = 1024, val_rows: int = 256, files: int = 2) -> Path:
    """`root/mynets.py`, `root/data/train/part-*.parquet`, `root/data/val.parquet` and `root/job.toml`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mynets.py").write_text(MODULE)
    table = teacher_data(train_rows + val_rows)
    (root / "data" / "train").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, train_rows, files + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(a, b - a), root / "data" / "train" / f"part-{i}.parquet")
    pq.write_table(table.slice(train_rows, val_rows), root / "data" / "val.parquet")
    (root / "job.toml").write_text(textwrap.dedent('''
        [model]
        factory = "mynets:build"
        loss = "mynets:smoothed"
        [model.options]
        width = 64
        [data]
        path = "data/train"
        val_path = "data/val.parquet"
        input = ["pixels", "bonus"]
        target = "klass"
        batch_size = 32
        [optimizer]
        lr = 0.01
        [run]
        report_every = 10
        checkpoint_every = 40
    '''))
    return root
