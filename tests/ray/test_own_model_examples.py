"""README's "Train your own model" examples run: its job file (with a model and data of that shape), the
`examples/own-model` project on scikit-learn's real digits, and the Python API block."""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ampray.actors.aggregator import read_scalars
from ampray.orchestrator.cli import main

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTION = README[README.index("## Train your own model"):README.index("## Training on Ray")]


@pytest.fixture
def clean_modules():
    yield
    for name in ("mynets", "digits_net"):
        sys.modules.pop(name, None)


def test_examples_own_model_learns_the_digits(ray_address, tmp_path, monkeypatch, clean_modules, capsys):
    pytest.importorskip("sklearn")
    project = tmp_path / "own-model"
    shutil.copytree(ROOT / "examples" / "own-model", project)
    assert "cd examples/own-model && python make_data.py && ampray train --config job.toml" in SECTION
    made = subprocess.run([sys.executable, "make_data.py"], cwd=project, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "1438 training and 359 held-out digits" in made.stdout
    monkeypatch.chdir(project)
    assert main(["train", "--config", "job.toml", "--address", ray_address, "--run.steps", "150"]) == 0, \
        capsys.readouterr().err[-3000:]
    scalars = read_scalars(str(project / "runs" / "digits" / "tensorboard"))
    assert [s for s, _ in scalars["all/val/accuracy/mean"]] == [50, 100, 150]
    assert scalars["all/val/accuracy/mean"][-1][1] > 0.85  # real digits, 10 classes
    assert scalars["all/val/samples/total"][-1][1] == 359
    # The same real data over a memory limit below its size (1438 rows of 64 float32 pixels and an int64
    # label, 0.36 MiB as tensors): `auto` streams it through Ray Data, four files into two equal shards.
    assert main(["train", "--config", "job.toml", "--address", ray_address, "--run.steps", "100",
                 "--name", "digits-streamed", "--data.max_in_memory_mb", "0.25"]) == 0, capsys.readouterr().err[-3000:]
    from ampray.job import JobConfig

    assert JobConfig.load(project / "runs" / "digits-streamed" / "job.toml").data.streaming == "true"
    streamed = read_scalars(str(project / "runs" / "digits-streamed" / "tensorboard"))
    assert streamed["all/val/accuracy/mean"][-1][1] > 0.8


def test_readme_job_file_and_python_block(ray_address, tmp_path, monkeypatch, clean_modules):
    from tests.own_project import teacher_data

    import pyarrow.parquet as pq

    toml = re.search(r"```toml\n(.*?)```", SECTION, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynets.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from torch import nn

        def build(width=16):
            return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))

        def loss(output, target):
            return F.cross_entropy(output, target)
    '''))
    (tmp_path / "data" / "train").mkdir(parents=True)
    rows = teacher_data(600).rename_columns(["pixels", "bonus", "label", "note"])
    pq.write_table(rows.slice(0, 500), tmp_path / "data" / "train" / "part-0.parquet")
    pq.write_table(rows.slice(500), tmp_path / "data" / "val.parquet")
    (tmp_path / "job.toml").write_text(toml + textwrap.dedent(f'''
        steps = 50
        report_every = 25
        checkpoint_every = 50
        address = "{ray_address}"
        storage_path = "{tmp_path / 'runs'}"
    '''))
    block = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
    fit_part = block.split("outcome = ampray.search")[0]  # the search is `ampray tune`, tested on its own
    scope: dict = {}
    exec(compile(fit_part.replace('"run.steps": 400', '"run.steps": 50'), "README.md", "exec"), scope)
    result = scope["result"]
    assert result.metrics["val/samples/total"] == 100 and result.job.run.steps == 50
    assert result.job.run.eval_every == 50 and result.checkpoint.endswith("checkpoint_000050")
