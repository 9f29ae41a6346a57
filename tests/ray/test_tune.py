"""`ampray tune` on the session's local Ray cluster: ASHA over the scaler space, the results table,
HParams per trial, a best configuration that trains, and a bad space failing before any trial."""

import socket
import time

import pyarrow.parquet as pq
import pytest

from ampray.actors.aggregator import read_hparams
from ampray.orchestrator.cli import main
from ampray.orchestrator.search import RESULT_COLUMNS

pytestmark = pytest.mark.ray
JOB = ["--model.options.hidden", "32", "--model.options.in_features", "16", "--data.num_samples", "512",
       "--data.batch_size", "32", "--run.steps", "40", "--run.report_every", "10", "--run.checkpoint_every", "40"]


def test_asha_search_writes_table_hparams_and_a_best_config_that_trains(ray_address, tmp_path, capsys):
    args = ["tune", "--address", ray_address, "--space", "scaler", "--samples", "4", "--scheduler", "asha",
            "--name", "asha", "--run.storage_path", str(tmp_path), *JOB]
    assert main(args) == 0
    folder = tmp_path / "asha"
    table = pq.read_table(folder / "results.parquet").to_pylist()
    assert len(table) == 4
    for column in ("trial", "status", "precision.init_scale", "precision.growth_factor",
                   "precision.backoff_factor", "precision.growth_interval", "precision.hysteresis", *RESULT_COLUMNS):
        assert column in table[0], column
    assert {row["status"] for row in table} <= {"completed", "stopped_early"}
    # One CPU worker per trial, on this machine: where each trial ran is in its row.
    assert {row["placement"] for row in table} == {f"{socket.gethostname()}:cpu"}
    assert any(row["status"] == "completed" for row in table)
    for row in table:
        hp = read_hparams(str(folder / "trials" / row["trial"] / "tensorboard")) if row["status"] == "completed" else None
        if hp is not None:
            assert hp["precision.init_scale"] == pytest.approx(row["precision.init_scale"])
    out = capsys.readouterr().out
    assert "best.toml" in out
    assert main(["train", "--config", str(folder / "best.toml"), "--address", ray_address]) == 0
    assert (tmp_path / "asha-best" / "tensorboard").is_dir()


def test_bad_space_fails_before_any_trial(ray_address, tmp_path, capsys):
    space = tmp_path / "space.toml"
    space.write_text('[params]\n"precision.backoff_factor" = { uniform = [0.5, 1.5] }\n')
    t0 = time.time()
    assert main(["tune", "--address", ray_address, "--space", str(space), "--name", "bad",
                 "--run.storage_path", str(tmp_path), *JOB]) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert "backoff_factor" in err and "1.5" in err
    assert not (tmp_path / "bad" / "trials").exists()


def test_cpu_binding_is_refused_before_any_trial(ray_address, tmp_path, capsys):
    assert main(["tune", "--address", ray_address, "--name", "bound", "--run.storage_path", str(tmp_path),
                 "--scaling.bind_cpus", "true", *JOB]) == 2
    err = capsys.readouterr().err
    assert "scaling.bind_cpus=True is not allowed" in err and "expected false" in err
    assert not (tmp_path / "bound").exists()
