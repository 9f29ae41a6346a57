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
