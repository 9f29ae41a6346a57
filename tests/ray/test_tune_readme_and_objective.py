"""The README's space file validates; a search where fp16 overflows often prefers fewer skipped steps."""

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ampray.job import JobConfig
from ampray.orchestrator.search import SearchConfig, apply_params, run_search
from ampray.tune_spaces import load_space

pytestmark = pytest.mark.ray
README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_space_file_loads(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    text = next(b for b in blocks if "[params]" in b)
    (tmp_path / "space.toml").write_text(text)
    base = JobConfig().to_dict()
    space = load_space(tmp_path / "space.toml", validate=lambda o: apply_params(base, o))
    assert set(space.params) == {"precision.init_scale", "precision.hysteresis"}
    assert space.fixed == {"run.adaptive": True}


def test_search_prefers_settings_with_fewer_skipped_steps(ray_address, tmp_path):
    # A growth interval of 1 doubles the fp16 loss scale after every clean step, so it overflows again
    # and again; an interval of 1000 settles after the first backoffs. Same model, data and loss budget.
    space = tmp_path / "space.toml"
    space.write_text('[params]\n"precision.growth_interval" = { choice = [1, 1000] }\n'
                     '[fixed]\n"precision.init_scale" = 16777216.0\n"precision.dtype" = "fp16"\n')
    job = JobConfig.load(None, {"model.options.hidden": 32, "model.options.in_features": 16,
                                "data.num_samples": 512, "data.batch_size": 32, "run.steps": 40,
                                "run.report_every": 20, "run.checkpoint_every": 40, "run.adaptive": False,
                                "run.storage_path": str(tmp_path), "run.address": ray_address})
    out = run_search(job, SearchConfig(space=str(space), samples=4, scheduler="fifo", name="overflow", seed=1))
    rows = pq.read_table(out["folder"] / "results.parquet").to_pylist()
    by_interval = {}
    for row in rows:
        assert row["status"] == "completed"
        by_interval.setdefault(row["precision.growth_interval"], []).append(row)
    assert set(by_interval) == {1, 1000}, "the seed must sample both values"
    worst_1 = min(r["skip_rate"] for r in by_interval[1])
    best_1000 = max(r["skip_rate"] for r in by_interval[1000])
    assert worst_1 > best_1000  # the overflow-prone setting really skips more
    assert out["best"]["precision.growth_interval"] == 1000
    assert out["best"]["skip_rate"] == min(r["skip_rate"] for r in rows)
