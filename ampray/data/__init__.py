"""Built-in datasets: a deterministic synthetic corpus per model kind (Parquet shards come later)."""

from ampray.data.synthetic import SyntheticConfig, make_dataset

__all__ = ["SyntheticConfig", "make_dataset"]
