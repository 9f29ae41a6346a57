"""Turn scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, UCI ML repository) into Parquet:
`data/train/` (four files) and `data/val.parquet` (a held-out fifth), with columns of our own choosing:
`pixels` (64 float32 values per image) and `digit` (its label, int64).

    python make_data.py            # writes ./data
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits


def table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    flat = pa.array(images.astype(np.float32).reshape(-1))
    return pa.table({"pixels": pa.FixedSizeListArray.from_arrays(flat, 64), "digit": pa.array(labels.astype(np.int64))})


def main(out: Path, seed: int = 0) -> None:
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    val, train = order[: len(order) // 5], order[len(order) // 5:]
    (out / "train").mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(train, 4)):
        pq.write_table(table(digits.data[part], digits.target[part]), out / "train" / f"part-{i}.parquet")
    pq.write_table(table(digits.data[val], digits.target[val]), out / "val.parquet")
    print(f"{len(train)} training and {len(val)} held-out digits in {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", type=Path)
    main(parser.parse_args().out)
