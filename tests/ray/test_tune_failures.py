"""`ampray tune` fails loudly: a search whose every trial fails exits non-zero with each reason, and a name
already used by a search is refused instead of mixing two searches in one folder."""

import textwrap

import pyarrow.parquet as pq
import pytest

from ampray.job import JobConfig
from ampray.orchestrator.cli import main
from tests.own_project import write_project

pytestmark = pytest.mark.ray

# The user's factory refuses a dropout the search draws: the driver's pre-flight builds the base job's model
# (no dropout) and passes, so the failure happens where users meet it, in every trial's workers.
BOOM = textwrap.dedent('''
    from mynets import build as _build


    def build(dropout: float = 0.0, **options):
        if dropout > 0.5:
            raise ValueError(f"this net cannot train with dropout={dropout}")
        return _build(dropout=dropout, **options)
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "proj", train_rows=256, val_rows=64)
    (root / "boom.py").write_text(BOOM)
    (root / "space.toml").write_text('[params]\n"model.options.dropout" = { choice = [0.7, 0.9] }\n')
    monkeypatch.chdir(root)
    yield root


def _args(address: str, project, name: str, *extra: str) -> list[str]:
    return ["tune", "--config", "job.toml", "--address", address, "--name", name, "--samples", "2",
            "--scheduler", "fifo", "--max-concurrent", "2", "--run.storage_path", str(project / "runs"),
            "--run.steps", "10", "--run.report_every", "5", "--run.checkpoint_every", "10", *extra]


def test_a_search_whose_every_trial_fails_exits_non_zero_with_the_reasons(ray_address, project, capsys):
    assert main(_args(ray_address, project, "doomed", "--space", "space.toml", "--model.factory", "boom:build")) == 1
    captured = capsys.readouterr()
    err = captured.err
    rows = pq.read_table(project / "runs" / "doomed" / "results.parquet").to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"error"}
    for row in rows:
        assert row["error"].endswith(f"ValueError: this net cannot train with dropout={row['model.options.dropout']}"), row
        # Each distinct reason is one short line naming the trials that gave it (rank 0's, not Ray's wrappers).
        assert row["error"].startswith("rank 0: ValueError")
        assert any(row["trial"] in line and line.endswith(f": {row['error']}") for line in err.splitlines()), err
    assert "2 of 2 trial(s) failed" in err and "no trial ran to a result, so there is no best configuration" in err
    assert not (project / "runs" / "doomed" / "best.toml").exists()
    assert "Best configuration" not in captured.out

    # The same name again: refused before Ray runs anything, with the two ways on.
    assert main(_args(ray_address, project, "doomed", "--space", "space.toml", "--model.factory", "boom:build")) == 2
    err = capsys.readouterr().err
    assert "search 'doomed' already exists in" in err and "`ampray tune --resume doomed`" in err
    assert "new --name" in err and "Traceback" not in err
    assert len(pq.read_table(project / "runs" / "doomed" / "results.parquet")) == 2  # untouched


def test_cpu_trials_default_to_bf16_and_best_toml_says_so(ray_address, project, capsys):
    (project / "lr.toml").write_text('[params]\n"optimizer.lr" = { choice = [0.01, 0.02] }\n')
    assert main(_args(ray_address, project, "lr", "--space", "lr.toml")) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "precision.dtype='bf16' chosen for CPU workers (none was set)" in out
    best = JobConfig.load(project / "runs" / "lr" / "best.toml")
    assert best.precision.to_dict()["dtype"] == "bfloat16" and best.scaling.num_workers == 1
    rows = pq.read_table(project / "runs" / "lr" / "results.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"completed"}
    # The table shows every trial's whole id (its folder under trials/), one row each.
    for row in rows:
        assert row["trial"] in out and (project / "runs" / "lr" / "trials" / row["trial"]).is_dir()


def test_ctrl_c_in_tune_exits_130_and_names_the_resume_command(ray_address, project):
    """A real `ampray tune` process interrupted once its trials report: exit status 130, the resume command
    in ampray's words, not Tune's `Tuner.restore(...)`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = _args(ray_address, project, "stopped", "--space", "space.toml", "--run.steps", "400",
                 "--run.report_every", "5", "--run.checkpoint_every", "50")
    (project / "space.toml").write_text('[params]\n"model.options.dropout" = { choice = [0.0, 0.1] }\n')
    proc = subprocess.Popen([sys.executable, "-m", "ampray.orchestrator.cli", *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    trials = project / "runs" / "stopped" / "trials"
    deadline = time.monotonic() + 150
    try:
        # Interrupt once a trial's workers have reported (a progress file exists under a trial's run folder).
        while time.monotonic() < deadline and proc.poll() is None:
            if trials.is_dir() and any(trials.glob("*/progress/rank0.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "ampray tune: interrupted" in err and "ampray tune --resume stopped" in err, err[-3000:]
    assert "Tuner.restore(" not in out + err
