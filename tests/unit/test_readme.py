"""README's engine example runs as written (with a model and loader supplied)."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_engine_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## The engine in a notebook\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = {
        "my_model": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
        "loader": [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(8)],
    }
    exec(compile(block, "README.md", "exec"), scope)
    summary = scope["engine"].get_performance_summary()
    assert summary["performance"]["training_steps"] == 8 and summary["performance"]["optimizer_steps"] == 2
    assert torch.load(tmp_path / "engine.pt", weights_only=True)["counters"]["training_steps"] == 8


def test_readme_job_file_ships_as_the_example_and_loads():
    from ampray.job import JobConfig

    block = re.search(r"resolved config is saved as\n.*?```toml\n(.*?)```", README.read_text(), re.S).group(1)
    example = README.parent / "examples" / "gpt-fp16.toml"
    assert example.read_text() == block
    job = JobConfig.load(example)
    assert (job.model.kind, job.precision.dtype, job.run.name) == ("gpt", torch.float16, "gpt-fp16")
