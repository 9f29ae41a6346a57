"""Built-in datasets: the deterministic synthetic corpus (`synthetic.py`) and Parquet shards with a
documented schema per model kind (`parquet.py`: writing, reading, per-rank batching; needs pyarrow)."""

from ampray.data.synthetic import SyntheticConfig, make_dataset

__all__ = ["SyntheticConfig", "make_dataset"]
