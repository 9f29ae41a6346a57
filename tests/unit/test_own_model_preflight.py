"""Bad input for a user's own model and data ends on the driver, in seconds and before Ray starts, with an
error that names the field and the fix."""

import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampray.orchestrator.cli import main
from tests.own_project import teacher_data, write_project


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "proj", train_rows=64, val_rows=16, files=1)
    monkeypatch.chdir(root)
    yield root
    for name in ("mynets", "broken"):
        sys.modules.pop(name, None)


def _fails(capsys, *extra: str) -> str:
    t0 = time.time()
    code = main(["train", "--config", "job.toml", "--run.storage_path", "runs", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert time.time() - t0 < 10
    return err


def test_factory_and_loss_that_cannot_be_imported(project, capsys):
    err = _fails(capsys, "--model.factory", "nosuch:build")
    assert "model.factory='nosuch:build': no module named 'nosuch' in the working folder" in err
    err = _fails(capsys, "--model.factory", "mynets:biuld")
    assert "module 'mynets'" in err and "has no 'biuld'" in err and "build" in err
    err = _fails(capsys, "--model.loss", "mynets.nothing")
    assert "model.loss='mynets.nothing' is not allowed: expected an import path" in err
    (project / "broken.py").write_text("raise RuntimeError('needs a GPU license')\n")
    err = _fails(capsys, "--model.factory", "broken:build")
    assert "importing 'broken' raised RuntimeError: needs a GPU license" in err
    assert not (project / "runs").exists()  # nothing started, nothing written


def test_factory_that_returns_no_module(project, capsys):
    err = _fails(capsys, "--model.factory", "mynets:not_a_module")
    assert "model.factory='mynets:not_a_module' returned a dict, not a torch.nn.Module" in err
    err = _fails(capsys, "--model.options.depth", "3")
    assert "model.options" in err and "depth" in err


def test_missing_and_mistyped_columns(project, capsys):
    err = _fails(capsys, "--data.input", "pixel")
    assert "data.input='pixel'" in err and "pixels" in err and "klass" in err  # names what is there
    err = _fails(capsys, "--data.target", "note")
    assert "data.target='note'" in err and "string" in err
    err = _fails(capsys, "--data.input", "[]", "--data.target", "")
    assert "data.input and data.target are required with model.factory" in err


def test_model_that_rejects_the_data_shape(project, capsys):
    err = _fails(capsys, "--model.options.features", "8")
    assert "model.factory='mynets:build' rejects a batch of the data" in err and "pixels: (2, 16) float32" in err
    err = _fails(capsys, "--data.input_format", "tuple")
    assert "rejects a batch" in err  # the model indexes a dict


def test_loss_that_is_not_a_number(project, capsys):
    (project / "mynets.py").write_text((project / "mynets.py").read_text() + textwrap.dedent('''
        def per_sample(output, target):
            return F.cross_entropy(output, target, reduction="none")
    '''))
    err = _fails(capsys, "--model.loss", "mynets:per_sample")
    assert "model.loss='mynets:per_sample' returned (2,) float32; expected a 0-d floating-point tensor" in err


def test_validation_set_whose_columns_differ(project, capsys):
    table = teacher_data(16)
    pq.write_table(table.set_column(table.schema.get_field_index("klass"), "klass",
                                    pa.array([float(v) for v in table.column("klass").to_pylist()])),
                   project / "data" / "val_float.parquet")
    err = _fails(capsys, "--data.val_path", "data/val_float.parquet")
    assert "data.val_path='data/val_float.parquet': column 'klass' has type double; expected int64" in err
    pq.write_table(table.drop(["bonus"]), project / "data" / "val_less.parquet")
    err = _fails(capsys, "--data.val_path", "data/val_less.parquet")
    assert "data.val_path" in err and "'bonus'" in err


def test_own_model_without_data_is_refused(project, capsys):
    err = _fails(capsys, "--data.path", "", "--data.val_path", "", "--data.input", "[]", "--data.target", "")
    assert "data.path is required with model.factory='mynets:build'" in err
