"""`ampray bench` and `ampray recommend` print (and write) the numbers of the functions under them; the
interface functions check their input and name the field."""

import re

import pyarrow.parquet as pq
import pytest

from ampray import benchmark_mixed_precision_interface, get_mixed_precision_recommendations
from ampray.amp.config import ConfigError
from ampray.orchestrator.cli import main
from ampray.orchestrator.interface import recommendation_view, training_job


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells and cells[0].rstrip(" *") in ("fp32", "tf32", "fp16", "bf16"):
            rows[cells[0].rstrip(" *")] = cells[1:]
    return rows


def test_bench_prints_and_writes_the_functions_numbers(tmp_path, capsys):
    out = tmp_path / "results.parquet"
    assert main(["bench", "--model", "mlp", "--batch-size", "16", "--iterations", "3", "--warmup", "1",
                 "--size", "small", "--out", str(out)]) == 0
    printed = _table_rows(capsys.readouterr().out)
    table = pq.read_table(out).to_pylist()
    assert [r["precision"] for r in table] == ["fp32", "fp16", "bf16"] == list(printed)
    fp32 = table[0]
    for r in table:
        assert r["model"] == "mlp" and r["batch_size"] == 16 and r["device"] == "cpu"
        # What was printed is what was written, and both are the benchmark's own figures.
        assert printed[r["precision"]][0] == f"{r['median_ms']:.3f}"
        assert printed[r["precision"]][1] == f"{r['samples_per_s']:.1f}"
        assert printed[r["precision"]][2] == f"{r['tflops_per_s']:.2f}" and r["tflops_per_s"] > 0
        assert printed[r["precision"]][3] == "-" and r["mfu"] is None  # no known peak for a CPU
        assert printed[r["precision"]][4] == f"{r['speedup_percent']:+.1f}"
        assert r["samples_per_s"] == pytest.approx(16 / (r["median_ms"] / 1e3), rel=2e-3)
        assert r["speedup_percent"] == pytest.approx((fp32["median_ms"] / r["median_ms"] - 1) * 100, abs=0.2)
    assert sum(r["best"] for r in table) == 1


def test_bench_compile_compiles_and_says_so(tmp_path, capsys):
    from torch._dynamo.utils import counters

    out = tmp_path / "compiled.parquet"
    before = counters["stats"]["unique_graphs"]
    assert main(["bench", "--model", "mlp", "--batch-size", "8", "--iterations", "1", "--warmup", "1",
                 "--size", "small", "--precisions", "fp32", "--compile", "--out", str(out)]) == 0
    assert counters["stats"]["unique_graphs"] > before  # the timed steps were compiled ones
    assert "torch.compile" in capsys.readouterr().out
    assert [(r["precision"], r["compiled"]) for r in pq.read_table(out).to_pylist()] == [("fp32", True)]


def test_bench_interface_returns_rows_and_chart_for_each_precision():
    result = benchmark_mixed_precision_interface("gpt", 2, num_iterations=2, warmup=1, size="small")
    assert result["options"] == {"preset": "micro"}
    assert [r["precision"] for r in result["rows"]] == [c["precision"] for c in result["chart"]]
    raw = result["raw"]["results"]
    for row, chart in zip(result["rows"], result["chart"]):
        assert chart["median_ms"] == row["median_ms"] == round(raw[row["precision"]]["median_step_time_s"] * 1e3, 3)


def test_recommend_prints_the_recommendation(capsys):
    assert main(["recommend"]) == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    rec = get_mixed_precision_recommendations()
    view = recommendation_view(rec)
    assert view["headline"] in text
    for reason in rec["reasons"]:
        assert re.sub(r"\s+", " ", reason) in text
    for row in view["hardware"]:
        assert row["value"] in text
    assert view["recommended_dtype"] == rec["recommended_dtype"]


@pytest.mark.parametrize("args,needle", [
    (dict(model_type="resnet"), "model_type='resnet' is not allowed; expected one of ['mlp', 'cnn', 'gpt']"),
    (dict(batch_size=-5), "batch_size=-5 is not allowed; expected an integer >= 1"),
    (dict(batch_size=4096), "batch_size=4096 is not allowed; expected at most 1024"),
    (dict(num_epochs=1.5), "num_epochs=1.5 is not allowed"),
    (dict(learning_rate=0.0), "learning_rate=0.0 is not allowed"),
    (dict(use_mixed_precision="yes"), "use_mixed_precision='yes' is not allowed"),
])
def test_training_interface_names_the_bad_field(args, needle):
    base = dict(model_type="mlp", num_epochs=1, batch_size=32, learning_rate=1e-3, use_mixed_precision=True,
                adaptive=False)
    with pytest.raises(ConfigError) as err:
        training_job(**{**base, **args}, num_workers=2)
    assert needle in str(err.value)


def test_training_job_turns_epochs_into_steps():
    job = training_job("gpt", 3, 16, 1e-3, True, True, num_workers=2, num_samples=512)
    assert job.run.steps == 3 * (512 // (16 * 2))
    assert job.model.options == {"preset": "micro"} and job.run.adaptive
    assert job.precision.to_dict()["dtype"] == "float16"
    off = training_job("mlp", 1, 16, 1e-3, False, False, num_workers=1)
    assert not off.precision.enabled
    with pytest.raises(ConfigError, match="size='huge' is not allowed"):
        benchmark_mixed_precision_interface("mlp", 4, size="huge")


def test_a_failed_run_says_whether_a_rerun_resumes(tmp_path):
    """After a failure `ampray train` says to rerun and resume only where a checkpoint was registered; with
    none (an error of the model at step 0, say) a rerun would start over and fail the same way."""
    import json

    from ampray.orchestrator.checkpoints import SNAPSHOT
    from ampray.orchestrator.cli import _after_failure

    assert _after_failure(tmp_path).startswith(f"No checkpoint was written ({tmp_path}): a rerun starts at step 0")
    (tmp_path / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name":
                                                                              "checkpoint_000040"}}))
    assert _after_failure(tmp_path) == (f"Its checkpoints are kept in {tmp_path}: rerun the same command to resume "
                                        "from the latest (checkpoint_000040; run.max_failures restarts crashed "
                                        "workers by itself).")
