"""Bad input for a user's own model and data ends on the driver, in seconds and before Ray starts, with an
error that names the field and the fix."""

import re
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ampray.amp.config import ConfigError
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
    # Other widths of integers and floats decode into the same tensors: int32 labels, float64 pixels are taken.
    pixels = table.column("pixels").combine_chunks()
    wider = table.set_column(table.schema.get_field_index("pixels"), "pixels", pa.FixedSizeListArray.from_arrays(
        pixels.flatten().cast(pa.float64()), 16)).set_column(
        table.schema.get_field_index("klass"), "klass", table.column("klass").cast(pa.int32()))
    pq.write_table(wider, project / "data" / "val_wider.parquet")
    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import check_model_and_data

    check_model_and_data(JobConfig.load("job.toml", {"data.val_path": "data/val_wider.parquet"}))
    # A variable-size list where the training data has fixed-size rows is not the same column.
    ragged = table.set_column(table.schema.get_field_index("pixels"), "pixels",
                              pa.array([list(r) for r in pixels.to_pylist()], pa.list_(pa.float32())))
    pq.write_table(ragged, project / "data" / "val_ragged.parquet")
    err = _fails(capsys, "--data.val_path", "data/val_ragged.parquet")
    assert "column 'pixels' has type list<float>; expected fixed_size_list<float>[16]" in err


def test_own_model_without_data_is_refused(project, capsys):
    err = _fails(capsys, "--data.path", "", "--data.val_path", "", "--data.input", "[]", "--data.target", "")
    assert "data.path is required with model.factory='mynets:build'" in err


def test_unused_parameters_are_found_on_one_batch(project):
    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import check_model_and_data
    from ampray.orchestrator.train import resolved

    (project / "mynets.py").write_text((project / "mynets.py").read_text() + textwrap.dedent('''
        class WithAux(nn.Module):
            def __init__(self):
                super().__init__()
                self.net, self.aux = build(), nn.Linear(17, 3)

            def forward(self, batch):
                return self.net(batch)  # the auxiliary head takes no part in the loss

        def with_aux():
            return WithAux()
    '''))
    job = JobConfig.load("job.toml", {"model.factory": "mynets:with_aux", "model.options": {}})
    plan = check_model_and_data(job)
    assert plan.unused_parameters == ("aux.weight", "aux.bias")
    assert resolved(job, 2, False, False, plan).scaling.find_unused_parameters == "true"
    plan = check_model_and_data(JobConfig.load("job.toml"))
    assert plan.unused_parameters == () and resolved(JobConfig.load("job.toml"), 2, False, False, plan) \
        .scaling.find_unused_parameters == "false"


def test_variable_length_columns_are_padded_to_one_width_everywhere(tmp_path, monkeypatch):
    """Rows of 1 to 5 tokens in training, up to 7 in the held-out set, and a second column of up to 3: every
    batch, in memory or streamed, and the driver's check, pad each column to its own longest row (7 and 3,
    kept in data.pad_widths), so a model of fixed widths fits all."""
    from ampray.actors.data import column_spec, one_batch
    from ampray.data.columns import read_columns
    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import check_model_and_data
    from ampray.orchestrator.train import resolved

    monkeypatch.chdir(tmp_path)
    (tmp_path / "seqnet.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.out = nn.Embedding(10, 4), nn.Linear((7 + 3) * 4, 2)

            def forward(self, x):
                return self.out(torch.cat([self.emb(x["tokens"]).flatten(1), self.emb(x["query"]).flatten(1)], 1))

        def build():
            return Net()
    '''))
    tokens = [[1] * (i % 5 + 1) for i in range(40)]
    query = [[2] * (i % 3 + 1) for i in range(40)]
    pq.write_table(pa.table({"tokens": tokens, "query": query, "y": [i % 2 for i in range(40)]}),
                   tmp_path / "train.parquet")
    pq.write_table(pa.table({"tokens": [[2] * 7, [3]], "query": [[1], [1]], "y": [0, 1]}), tmp_path / "val.parquet")
    try:
        job = JobConfig.load(None, {"model.factory": "seqnet:build", "data.path": "train.parquet",
                                    "data.val_path": "val.parquet", "data.input": ["tokens", "query"],
                                    "data.target": "y", "data.batch_size": 8})
        plan = check_model_and_data(job)  # the 2-row check batch has these widths too, or the Linear refuses it
        assert plan.pad_widths == {"tokens": 7, "query": 3}
        job = resolved(job, 2, False, False, plan)
        assert job.data.pad_widths == {"tokens": 7, "query": 3}
        x = read_columns("train.parquet", column_spec(job))[0]
        assert x["tokens"].shape == (40, 7) and x["query"].shape == (40, 3)
        assert one_batch(job, plan.spec)[0]["tokens"].shape == (2, 7)
        assert JobConfig.from_dict(job.to_dict()).data.pad_widths == {"tokens": 7, "query": 3}  # saved, read back
        # data.pad_to below a row (the held-out set's 7, past the 2-row check batch) and a pad_value the
        # integer column cannot hold: ConfigErrors on the driver, not a traceback or a worker's failure.
        fields = {"model.factory": "seqnet:build", "data.path": "train.parquet", "data.val_path": "val.parquet",
                  "data.input": ["tokens", "query"], "data.target": "y", "data.batch_size": 8}
        for extra, words in (({"data.pad_to": 5}, "data.pad_to=5: column 'tokens' has rows of up to 7 entries"),
                             ({"data.pad_to": 7, "data.pad_value": 0.5}, "data.pad_value=0.5 is not allowed")):
            with pytest.raises(ConfigError, match=re.escape(words)):
                check_model_and_data(JobConfig.load(None, {**fields, **extra}))
    finally:
        sys.modules.pop("seqnet", None)


def test_one_input_column_given_as_a_list_reaches_the_model_as_a_dict(project):
    from ampray.actors.data import column_spec
    from ampray.data.columns import read_columns
    from ampray.job import JobConfig

    as_list = JobConfig.load("job.toml", {"data.input": ["pixels"]})
    x, _ = read_columns("data/train", column_spec(as_list), max_rows=3)
    assert isinstance(x, dict) and x["pixels"].shape == (3, 16)
    bare = JobConfig.load("job.toml", {"data.input": "pixels"})
    assert read_columns("data/train", column_spec(bare), max_rows=3)[0].shape == (3, 16)


def test_in_memory_size_counts_decoded_tensors_and_every_worker(tmp_path):
    """uint8 pixels are 8 bytes each once decoded (int64): the size that decides streaming is the tensors',
    and the automatic limit is shared by the workers (each holds all the rows)."""
    import numpy as np

    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import DataPlan, check_model_and_data, streaming_mode

    flat = pa.array(np.zeros(100 * 64, dtype=np.uint8))
    pq.write_table(pa.table({"px": pa.FixedSizeListArray.from_arrays(flat, 64), "y": pa.array([0] * 100)}),
                   tmp_path / "d.parquet")
    (tmp_path / "tiny.py").write_text("from torch import nn\ndef build():\n    return nn.Linear(64, 2)\n")
    job = JobConfig.load(None, {"model.factory": "tiny:build", "data.path": str(tmp_path / "d.parquet"),
                                "data.input": "px", "data.target": "y", "data.batch_size": 4})
    sys.path.insert(0, str(tmp_path))
    try:
        plan = DataPlan(None, 100, 0, ["px", "y"])
        from ampray.orchestrator.preflight import _decoded_bytes

        assert _decoded_bytes(job, 100) == 100 * (64 * 8 + 8)
        plan.bytes = 100 * (64 * 8 + 8)
        assert not streaming_mode(job, plan, node_memory_bytes=4 * 2 * plan.bytes, num_workers=2)
        assert streaming_mode(job, plan, node_memory_bytes=4 * 2 * plan.bytes, num_workers=3)
        with pytest.raises(Exception):
            check_model_and_data(job)  # uint8 -> int64 into nn.Linear: the driver's batch check refuses it
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tiny", None)


def test_python_api_records_what_it_cannot_import_as_by_value(tmp_path):
    import functools

    import torch
    from torch import nn

    from ampray.orchestrator.api import _code, _table_to_parquet

    for value, label in ((lambda o, t: o.sum(), "lambda"), (nn.MSELoss(), "MSELoss"),
                         (functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.1), "partial")):
        job, objects = {"model": {}}, {}
        _code(value, "model.loss", job, objects)
        assert job["model"]["loss"].startswith(f"ampray_by_value:{label}_") and objects["model.loss"] is value
    # Two partials of one function record different names: a rerun with the other is refused, not resumed.
    names = []
    for smoothing in (0.0, 0.3):
        job = {"model": {}}
        _code(functools.partial(torch.nn.functional.cross_entropy, label_smoothing=smoothing), "model.loss", job, {})
        names.append(job["model"]["loss"])
    assert names[0] != names[1]
    job, objects = {"model": {}}, {}
    _code(torch.nn.functional.cross_entropy, "model.loss", job, objects)
    assert job["model"]["loss"] == "torch.nn.functional:cross_entropy" and not objects
    # A table is stored under its content's digest: the same rows, the same file; other rows, another.
    a = _table_to_parquet(pa.table({"x": [1, 2]}), tmp_path, "train")
    assert a == _table_to_parquet(pa.table({"x": [1, 2]}), tmp_path, "train")
    assert a != _table_to_parquet(pa.table({"x": [1, 3]}), tmp_path, "train")


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from torch import nn
from ampray.orchestrator.api import _code

class Net(nn.Module):  # a class of the script itself: cloudpickle gives it a random id per process
    def __init__(self, hidden={hidden}):
        super().__init__()
        self.fc = nn.Linear(4, hidden)

def build():
    return Net()

job = {{"model": {{}}}}
_code(build, "model.factory", job, {{}})
print(job["model"]["factory"])
"""


def test_a_script_rerun_records_the_same_by_value_name(tmp_path):
    """`ampray.fit(model=build)` from a script whose model class is its own: running the script again
    records the same name, so it resumes its run (a random per-process class id made every rerun a
    'different model', refused against its checkpoint); other code records another name."""
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    names = []
    # The same code from another file too: a notebook's cells are files of /tmp/ipykernel_<pid>/, renamed
    # with every kernel restart.
    for hidden, script in ((8, "script.py"), (8, "ipykernel_4242.py"), (16, "script.py")):
        (tmp_path / script).write_text(SCRIPT.format(root=root, hidden=hidden))
        done = subprocess.run([sys.executable, str(tmp_path / script)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        names.append(done.stdout.strip().splitlines()[-1])
    assert names[0].startswith("ampray_by_value:build_")
    assert names[0] == names[1] != names[2]


def test_a_by_value_path_in_a_job_file_is_refused_with_the_fix(project, capsys):
    err = _fails(capsys, "--model.loss", "ampray_by_value:loss")
    assert "was handed to ampray.fit by value" in err


def test_a_rerun_pads_as_its_checkpoint_was_trained(tmp_path):
    """A new held-out set with shorter rows keeps the trained width (a changed width would change the model's
    input); one with longer rows than the run was trained with is refused, naming the column."""
    import json

    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import DataPlan, keep_trained_padding

    job = JobConfig.load(None, {"run.name": "r", "run.storage_path": str(tmp_path)})
    checkpoint = tmp_path / "r" / "checkpoint_000010"
    checkpoint.mkdir(parents=True)
    (tmp_path / "r" / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": checkpoint.name}}))
    (checkpoint / "job.toml").write_text('[data]\npad_widths = { tokens = 9 }\n')
    plan = DataPlan(None, 10, 0, ["tokens", "y"], (), {"tokens": 7})
    assert keep_trained_padding(job, plan) == job
    assert plan.pad_widths == {"tokens": 9}
    with pytest.raises(Exception, match="column 'tokens' now has rows of 12 entries.*padded to 9"):
        keep_trained_padding(job, DataPlan(None, 10, 0, ["tokens", "y"], (), {"tokens": 12}))
    # A run saved before data.target_pad_value existed padded its target with data.pad_value: so does its rerun.
    own = JobConfig.load(None, {"run.name": "r", "run.storage_path": str(tmp_path), "model.factory": "m:f",
                                "data.path": str(tmp_path), "data.input": "tokens", "data.target": "y"})
    (checkpoint / "job.toml").write_text('[data]\npad_value = 3.0\n')
    assert keep_trained_padding(own, DataPlan(None, 10, 0, ["tokens", "y"])).data.target_pad_value == 3.0
    (checkpoint / "job.toml").write_text('[data]\npad_value = 3.0\ntarget_pad_value = "auto"\n')
    assert keep_trained_padding(own, DataPlan(None, 10, 0, ["tokens", "y"])).data.target_pad_value == "auto"
    # Its rerun saved the number: the next rerun ("auto" again) keeps it, and resumes.
    (checkpoint / "job.toml").write_text('[data]\npad_value = 3.0\ntarget_pad_value = 3.0\n')
    assert keep_trained_padding(own, DataPlan(None, 10, 0, ["tokens", "y"])).data.target_pad_value == 3.0


def test_sparse_gradients_with_an_oom_policy_that_needs_dense_ones_under_ddp(project, capsys):
    (project / "sparsenet.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        import torch.nn.functional as F

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.bias = nn.Embedding(1, 4, sparse=True)
                self.lin = nn.Linear(16, 4)

            def forward(self, batch):
                x = batch["pixels"]
                return self.lin(x) + self.bias(torch.zeros(x.shape[0], dtype=torch.long))

        def build(**options):
            return Net()
    '''))
    err = _fails(capsys, "--model.factory", "sparsenet:build", "--precision.oom_policy", "skip",
                 "--scaling.num_workers", "2")
    assert "precision.oom_policy='skip' is not allowed with scaling.num_workers=2 and sparse gradients" in err
    assert "bias.weight" in err


def test_the_default_loss_refuses_what_cross_entropy_would_misread(project, capsys):
    """Without model.loss the loss is cross-entropy: a regression target (float, the output's (N,) shape),
    which torch would take as one sample's soft labels and train on (to a loss of -6000, exit 0), and a
    label the model's output has no class for (which fails inside a worker) end on the driver."""
    (project / "mynets.py").write_text((project / "mynets.py").read_text() + textwrap.dedent('''
        def regressor(**options):
            class Reg(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(16, 1)

                def forward(self, pixels):
                    return self.fc(pixels).squeeze(-1)
            return Reg()
    '''))
    err = _fails(capsys, "--model.loss", "", "--model.factory", "mynets:regressor", "--data.target", "bonus",
                 "--data.input", "pixels")
    assert ("the default loss (cross-entropy) takes integer class indices, or class probabilities shaped like "
            "the output; got a float32 target (2,) for an output (2,): for regression set model.loss") in err
    # The factory's own option for its classes is not `num_classes`: the output's shape says 3 classes.
    err = _fails(capsys, "--model.loss", "", "--model.options.classes", "3")
    assert "holds class label 3 in column 'klass' (labels in [0, 3]); the model's output (2, 3) scores 3 classes" \
           in err and "expects labels in [0, 3) or -100 (ignored)" in err
    assert not (project / "runs").exists()


def test_empty_training_or_held_out_files_are_named(project, capsys):
    empty = teacher_data(4).slice(0, 0)
    pq.write_table(empty, project / "data" / "empty.parquet")
    err = _fails(capsys, "--data.val_path", "data/empty.parquet")
    assert "data.val_path='data/empty.parquet' holds 0 rows; expected a Parquet file or folder with data (or " \
           "data.val_path = \"\" for no held-out set)" in err
    err = _fails(capsys, "--data.path", "data/empty.parquet")
    assert "data.path='data/empty.parquet' holds 0 rows" in err


def test_the_default_loss_and_accuracy_read_logits_from_dicts_and_tuples():
    import torch

    from ampray.actors.evaluate import _classes
    from ampray.models.registry import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(5, 3, generator=g), torch.tensor([0, 2, 1, 1, -100])
    want = torch.nn.functional.cross_entropy(logits, target)
    for output in (logits, {"logits": logits, "aux": torch.ones(())}, (logits, torch.ones(()))):
        assert torch.equal(cross_entropy(output, target), want)
        assert _classes(output, target) == 1
    seg, mask = torch.randn(2, 4, 3, 3, generator=g), torch.randint(0, 4, (2, 3, 3), generator=g)
    assert torch.equal(cross_entropy(seg, mask), torch.nn.functional.cross_entropy(seg, mask))  # classes in dim 1
    assert _classes(seg, mask) == 1
    tokens, ids = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    assert torch.equal(cross_entropy(tokens, ids), torch.nn.functional.cross_entropy(tokens.reshape(-1, 7), ids.reshape(-1)))
    assert _classes(tokens, ids) == 2
    probs = torch.softmax(torch.randn(5, 3, generator=g), -1)
    assert torch.equal(cross_entropy(logits, probs), torch.nn.functional.cross_entropy(logits, probs))
    assert _classes({"aux": logits}, target) is None and _classes(logits, probs) is None
    with pytest.raises(TypeError, match="set model.loss"):
        cross_entropy({"aux": logits}, target)
    with pytest.raises(ValueError, match=r"got an output \(5, 3\) for a target \(4,\) int64"):
        cross_entropy(logits, target[:4])


def test_the_default_loss_names_a_bool_target_as_the_problem():
    import torch

    from ampray.models.registry import cross_entropy

    with pytest.raises(ValueError, match=r"takes integer class indices; got a bool target \(2,\): store the labels"):
        cross_entropy(torch.randn(2, 2), torch.tensor([True, False]))


def test_the_default_loss_takes_float_targets_only_as_class_probabilities():
    import torch

    from ampray.amp.config import ConfigError
    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import _check_default_loss_targets

    job = JobConfig.load(None, {"model.factory": "mynets:build", "data.input": "x", "data.target": "y"})
    scores = torch.randn(2, 3)
    _check_default_loss_targets(job, scores, torch.softmax(torch.randn(2, 3), -1), streamed=False)
    with pytest.raises(ConfigError, match=r"takes the float data.target='y' as class probabilities \(each row's "
                                          r"values in \[0, 1\], summing to 1\); its first rows hold \[1.5, -2.0"):
        _check_default_loss_targets(job, scores, torch.tensor([[1.5, -2.0, 0.0], [0.0, 0.0, 3.0]]), streamed=False)


def test_the_python_api_checks_model_options_against_the_model_passed(project):
    """ampray.fit(job, model=...): the job's model.options (a dict job, overrides, a job file) belong to the
    factory passed, not to the built-in mlp that a job without a factory names."""
    from ampray.job import JobConfig
    from ampray.orchestrator.api import _job, _with_code

    objects: dict = {}
    data = _job({"model": {"options": {"width": 8}}}, _with_code(None, "mynets:build", None, None, objects))
    job = JobConfig.from_dict(data)
    assert job.model.factory == "mynets:build" and job.model.options == {"width": 8} and not objects
    data = _job(None, _with_code({"model.options": {"width": 16}}, "mynets:build", None, None, objects))
    assert JobConfig.from_dict(data).model.options == {"width": 16}
    data = _job(None, _with_code({"model.options": {"width": 16}}, "mynets:build", None, {"width": 4}, objects))
    assert JobConfig.from_dict(data).model.options == {"width": 4}  # options= wins, as before


def test_fp32_modules_and_fsdp_parameter_dtypes_are_checked_on_the_driver(project):
    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import check_model_and_data

    (project / "mynets.py").write_text((project / "mynets.py").read_text() + textwrap.dedent('''
        def with_f64(**options):
            net = build(**options)
            net.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
            return net
    '''))
    with pytest.raises(ConfigError, match=r"precision.fp32_modules entry 'haed' selects no module of the model; "
                                          r"expected a qualified-name glob .* \(Dropout, GELU, Linear, Sequential\)"):
        check_model_and_data(JobConfig.load("job.toml", {"precision.fp32_modules": ["body.0", "haed"]}))
    check_model_and_data(JobConfig.load("job.toml", {"precision.fp32_modules": ["body.0", "Linear"]}))
    with pytest.raises(ConfigError, match=r"scaling.strategy='fsdp' is not allowed with the parameter 'scale' of "
                                          r"dtype float64 \(1 not float32\)"):
        check_model_and_data(JobConfig.load("job.toml", {"model.factory": "mynets:with_f64",
                                                         "scaling.strategy": "fsdp"}))
    check_model_and_data(JobConfig.load("job.toml", {"model.factory": "mynets:with_f64"}))  # ddp takes it


def test_a_padded_target_is_padded_with_what_the_loss_ignores(tmp_path, monkeypatch):
    """Token rows of different lengths as the target (language modelling on the user's data): under the
    default loss the target is padded with -100, which cross-entropy and the accuracy ignore, while the
    input keeps data.pad_value (0, a valid id; -100 would break the embedding). A try-out padded both with
    0 and scored a val accuracy of 0.44, mostly padding. With a loss of the user's own the driver notes
    what the padding is; data.target_pad_value sets it."""
    from ampray.actors.data import column_spec, one_batch
    from ampray.data.columns import read_columns
    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import check_model_and_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lmnet.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from torch import nn

        def build():
            return nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))

        def masked(out, target):
            return F.cross_entropy(out.flatten(0, 1), target.flatten(), ignore_index=7)
    '''))
    rows = [[1 + i % 5] * (i % 4 + 2) for i in range(16)]
    pq.write_table(pa.table({"ids": rows, "labels": rows}), tmp_path / "lm.parquet")
    fields = {"model.factory": "lmnet:build", "data.path": "lm.parquet", "data.input": "ids", "data.target": "labels",
              "data.batch_size": 4}
    try:
        job = JobConfig.load(None, fields)
        plan = check_model_and_data(job)
        assert not plan.notes
        job = JobConfig.load(None, {**fields, "data.pad_widths": plan.pad_widths})
        x, y = read_columns("lm.parquet", column_spec(job))
        assert x.shape == y.shape == (16, 5)
        assert x[0].tolist() == [1, 1, 0, 0, 0] and y[0].tolist() == [1, 1, -100, -100, -100]
        assert one_batch(job, plan.spec, 2)[1][0].tolist() == [1, 1, -100, -100, -100]
        own = JobConfig.load(None, {**fields, "model.loss": "lmnet:masked"})
        assert any("data.target='labels' holds rows of different lengths, padded with data.pad_value=0: make "
                   "model.loss ignore that value" in note for note in check_model_and_data(own).notes)
        own = JobConfig.load(None, {**fields, "model.loss": "lmnet:masked", "data.target_pad_value": 7,
                                    "data.pad_widths": plan.pad_widths})
        assert not check_model_and_data(own).notes
        assert read_columns("lm.parquet", column_spec(own))[1][0].tolist() == [1, 1, 7, 7, 7]
    finally:
        sys.modules.pop("lmnet", None)
    with pytest.raises(ConfigError, match="data.target_pad_value='none' is not allowed: expected auto or a finite "
                                          "number"):
        JobConfig.load(None, {"data.target_pad_value": "none"})


def test_a_rerun_after_the_model_code_changed_is_refused_before_ray(project):
    """The run's model gained a layer between two runs of the same command: the driver compares the model
    it builds (on the meta device) with the checkpoint's state dict keys and shapes (a memory map of
    state.pt) and refuses, where the workers used to fail on load_state_dict at every rerun."""
    import json

    import torch

    from ampray.job import JobConfig
    from ampray.orchestrator.checkpoints import SNAPSHOT
    from ampray.orchestrator.preflight import _check_model_matches, check_resume, resolve_model

    job = JobConfig.load("job.toml", {"run.name": "changed"})
    spec = resolve_model(job)
    folder = job.run_dir() / "checkpoint_000010"
    folder.mkdir(parents=True)
    torch.save({"model": spec.build_model(job.model.options).state_dict()}, folder / "state.pt")
    (job.run_dir() / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name":
                                                                                   folder.name}}))
    _check_model_matches(job, spec, folder)  # the same code: nothing to say
    wider = JobConfig.load("job.toml", {"run.name": "changed", "model.options.width": 16})
    (project / "mynets.py").write_text((project / "mynets.py").read_text().replace(
        "nn.Linear(width, classes))", "nn.Linear(width, width), nn.Linear(width, classes))"))
    sys.modules.pop("mynets", None)
    with pytest.raises(ConfigError) as err:
        check_resume(wider, 2, resolve_model(wider))
    text = str(err.value)
    assert "run 'changed' resumes from checkpoint_000010, but the model built now (mynets:build) does not match" in text
    assert "body.0.weight: (64, 17) in the checkpoint, (16, 17) now" in text
    assert "body.4.bias: not in the checkpoint" in text and "Start a new run with --name NEW" in text


def test_the_default_loss_takes_rows_that_match_up_to_dimensions_of_size_one():
    import torch

    from ampray.actors.evaluate import _classes
    from ampray.models.registry import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 1, 3, generator=g), torch.tensor([0, 2, 1, 1])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), target)
    assert torch.equal(cross_entropy(logits, target), want)  # (N, 1, C) with (N,), as before
    assert torch.equal(cross_entropy(logits.squeeze(1), target[:, None]), want)  # (N, C) with (N, 1)
    assert _classes(logits, target) == 2


def test_a_user_model_with_a_submodule_named_module_is_saved_whole(project):
    """`unwrap` takes the model out of DDP's wrapper only: a user's model whose submodule is called
    `module` was saved (and evaluated) as that submodule alone, and its resume check then refused it."""
    import torch
    from torch import nn

    from ampray.actors.checkpoint import unwrap

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.module, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.module(x))

    model = Wrapped()
    assert unwrap(model) is model and set(unwrap(model).state_dict()) == {"module.weight", "module.bias",
                                                                          "head.weight", "head.bias"}
    assert unwrap(torch.nn.DataParallel(model)) is model


def test_a_loss_named_by_its_class_is_built_without_arguments(project, capsys):
    """model.loss = "torch.nn:CrossEntropyLoss" is how PyTorch users name a loss: it is built once, with no
    arguments, and called as criterion(output, target); a class that needs arguments is refused, named."""
    import torch
    from torch import nn

    from ampray.job import JobConfig
    from ampray.models.registry import resolve_spec
    from ampray.orchestrator.preflight import check_model_and_data

    (project / "mynets.py").write_text((project / "mynets.py").read_text() + textwrap.dedent('''
        class Weighted(nn.Module):
            def __init__(self, weight):
                super().__init__()
                self.register_buffer("weight", torch.as_tensor(weight))

            def forward(self, output, target):
                return F.cross_entropy(output, target, weight=self.weight)


        class Learnt(nn.Module):
            def __init__(self):
                super().__init__()
                self.temperature = nn.Parameter(torch.ones(()))

            def forward(self, output, target):
                return F.cross_entropy(output / self.temperature, target)
    '''))
    job = JobConfig.load("job.toml", {"model.loss": "torch.nn:CrossEntropyLoss", "run.storage_path": "runs"})
    check_model_and_data(job)  # the real batch, its loss and backward pass
    spec = resolve_spec(job.model.kind, job.model.factory, job.model.loss)
    assert isinstance(spec.loss, nn.CrossEntropyLoss)
    out, target = torch.randn(3, 4), torch.tensor([0, 3, 1])
    assert torch.equal(spec.loss(out, target), torch.nn.functional.cross_entropy(out, target))
    err = _fails(capsys, "--model.loss", "mynets:Learnt")
    assert "model.loss='mynets:Learnt' has trainable parameters (temperature), which the optimizer would never" in err
    err = _fails(capsys, "--model.loss", "mynets:Weighted")
    assert "model.loss names the class mynets.Weighted, which cannot be built without arguments" in err
    assert "missing 1 required positional argument: 'weight'" in err


def test_the_python_api_knows_which_fields_its_caller_set(tmp_path):
    """ampray.fit applies `ampray train`'s defaults (precision for the workers found) to the fields left
    unset, which it tells from a job file, a dict, a JobConfig and the overrides."""
    from ampray.job import JobConfig
    from ampray.orchestrator.api import _given

    (tmp_path / "job.toml").write_text('[precision]\ndtype = "bf16"\n[run]\nsteps = 5\n')
    assert _given(str(tmp_path / "job.toml"), {"data.batch_size": 8}) == {"precision.dtype", "run.steps",
                                                                         "data.batch_size"}
    assert _given({"precision": {"dtype": "fp32"}}, {}) == {"precision.dtype"}
    assert _given(None, {"model.compile": True}) == {"model.compile"}
    job = JobConfig.load(None, {"run.steps": 7})
    assert _given(job, {}) == {"run.steps"}
    # A job file's fields set to their defaults are still the caller's (fp16 stays fp16 on a bf16 GPU).
    (tmp_path / "fp16.toml").write_text('[precision]\ndtype = "fp16"\n[data]\nbatch_size = 64\n')
    assert _given(JobConfig.load(tmp_path / "fp16.toml"), {}) == {"precision.dtype", "data.batch_size"}
    assert _given(JobConfig(), {}) == set()  # built in Python: what differs from the defaults


def test_a_parameter_created_in_forward_is_refused(project, capsys):
    """A parameter registered on the first forward is never stepped, never synchronised, and makes the
    checkpoint's model differ from the one a rerun builds: refused before Ray, naming it."""
    (project / "growing.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn


        class Growing(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Linear(17, 4)

            def forward(self, batch):
                if not hasattr(self, "scale"):
                    self.scale = nn.Parameter(torch.ones(4))
                return self.body(torch.cat([batch["pixels"], batch["bonus"][:, None]], 1)) * self.scale


        def build(**options):
            return Growing()
    '''))
    try:
        err = _fails(capsys, "--model.factory", "growing:build")
    finally:
        sys.modules.pop("growing", None)
    assert "model.factory='growing:build' creates scale in its forward" in err


def test_a_lazy_models_rerun_is_matched_by_its_keys(tmp_path, monkeypatch):
    """A model with nn.LazyLinear has no shapes on the meta device: the driver still compares its state dict
    keys with the checkpoint's (a layer added is refused), and does not trip over the missing shapes."""
    import torch

    from ampray.job import JobConfig
    from ampray.orchestrator.preflight import _check_model_matches, resolve_model

    (tmp_path / "lazyk.py").write_text(
        "from torch import nn\n"
        "def build(extra: bool = False):\n"
        "    layers = [nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2)] + ([nn.Linear(2, 2)] if extra else [])\n"
        "    return nn.Sequential(*layers)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        job = JobConfig.load(None, {"model.factory": "lazyk:build", "run.storage_path": str(tmp_path),
                                    "data.path": str(tmp_path), "data.input": "x", "data.target": "y"})
        spec = resolve_model(job)
        model = spec.build_model({})
        model(torch.randn(2, 5))
        folder = tmp_path / "checkpoint_000010"
        folder.mkdir()
        torch.save({"model": model.state_dict()}, folder / "state.pt")
        _check_model_matches(job, spec, folder)  # the same code
        extra = JobConfig.load(None, {**{k: v for k, v in job.flat().items() if k.startswith("data.")},
                                      "model.factory": "lazyk:build", "model.options": {"extra": True}})
        with pytest.raises(ConfigError, match="3.weight: not in the checkpoint"):
            _check_model_matches(extra, spec, folder)
    finally:
        sys.modules.pop("lazyk", None)
