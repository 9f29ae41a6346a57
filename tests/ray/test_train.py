"""`ampray train` on a real local Ray cluster: 2 CPU workers over gloo, every rank in TensorBoard, resume
after the driver is killed, restart after a worker is killed, and fast failures for impossible jobs."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ampray.actors.aggregator import read_hparams, read_scalars, read_text
from ampray.data.synthetic import uniform_loss
from ampray.orchestrator.cli import main
from ampray.job import JobConfig
from ampray.orchestrator.train import ResourceError, run_training

pytestmark = pytest.mark.ray

FAST = ["--model.options.hidden", "64", "--model.options.in_features", "32", "--data.num_samples", "1024",
        "--data.batch_size", "32"]


def _args(tmp_path: Path, name: str, steps: int, *extra: str) -> list[str]:
    return ["train", "--name", name, "--run.storage_path", str(tmp_path), "--run.steps", str(steps),
            "--run.report_every", "10", "--run.checkpoint_every", "40", *FAST, *extra]


def _progress(run_dir: Path, rank: int) -> dict:
    try:
        return json.loads((run_dir / "progress" / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for_step(run_dir: Path, rank: int, step: int, timeout: float = 180.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        p = _progress(run_dir, rank)
        if p.get("step", 0) >= step:
            return p
        time.sleep(0.05)
    raise TimeoutError(f"rank {rank} of {run_dir} did not reach step {step}")


def _starts(run_dir: Path, rank: int) -> list[int]:
    lines = (run_dir / "progress" / "starts.jsonl").read_text().splitlines()
    return [json.loads(x)["start_step"] for x in lines if json.loads(x)["rank"] == rank]


def test_train_end_to_end_on_parquet_with_every_rank_in_tensorboard(ray_address, tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "data"), "--kinds", "mlp", "--num-samples", "1024"]) == 0
    args = _args(tmp_path, "e2e", 80, "--address", ray_address, "--data.path", str(tmp_path / "data" / "mlp"),
                 "--model.options.in_features", "784")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{socket.gethostname()}:cpu" in out  # the final table's node:gpu column
    assert "e2e: step 80/80" in out  # into a pipe or log, progress comes as lines (no bar is drawn there)
    run_dir = tmp_path / "e2e"
    scalars = read_scalars(str(run_dir / "tensorboard"))
    for rank in (0, 1):
        for tag in ("scaler/scale", "scaler/growth_tracker", "scaler/overflows", "perf/skipped_steps",
                    "memory/rss_bytes", "memory/peak_allocated_bytes", "perf/samples_per_s", "loss"):
            assert f"rank{rank}/{tag}" in scalars, f"rank{rank}/{tag} missing"
        assert [s for s, _ in scalars[f"rank{rank}/loss"]] == list(range(10, 81, 10))
    for tag in ("all/scaler/scale/min", "all/scaler/scale/max", "all/perf/skipped_steps/total",
                "all/memory/peak_allocated_bytes/max", "all/scaler/scale_disagreements"):
        assert tag in scalars
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.5 * uniform_loss("mlp")
    (summary,) = read_text(str(run_dir / "tensorboard"), "summary")
    assert summary.count(f"| {socket.gethostname()}:cpu |") == 2  # each rank's node and GPU ("cpu")
    assert read_hparams(str(run_dir / "tensorboard"))["run.steps"] == 80
    saved = JobConfig.load(run_dir / "job.toml")
    assert saved.run.steps == 80 and saved.data.path.endswith("mlp")
    assert (saved.scaling.num_workers, saved.scaling.use_gpu) == (2, "false")  # what ran, not -1 and "auto"
    # The driver's progress file, written by the aggregator on the driver's node.
    assert json.loads((run_dir / "progress" / "all.json").read_text())["step"] == 80


def _run_in_thread(job: JobConfig) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["outcome"] = run_training(job)
        except BaseException as err:  # surfaced by the test below
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _final_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(checkpoint) / "state.pt", weights_only=True)["model"]


def test_killed_worker_restarts_from_checkpoint_and_ends_bitwise_equal(ray_address, tmp_path):
    def job(name: str) -> JobConfig:
        return JobConfig.load(None, {
            "run.name": name, "run.storage_path": str(tmp_path), "run.steps": 160, "run.report_every": 10,
            "run.checkpoint_every": 40, "run.max_failures": 1, "model.options.hidden": 64,
            "model.options.dropout": 0.1,  # every step draws from each rank's generator: RNG must resume too
            "model.options.in_features": 32, "data.num_samples": 1024, "data.batch_size": 32,
            "run.address": ray_address})

    thread, box = _run_in_thread(job("killed"))
    victim = _wait_for_step(tmp_path / "killed", 1, 60)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert _starts(tmp_path / "killed", 1)[0] == 0 and 40 <= _starts(tmp_path / "killed", 1)[1] <= 60
    reference = run_training(job("reference"))
    got, want = _final_weights(box["outcome"].checkpoint), _final_weights(reference.checkpoint)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # Each rank resumed its own engine state: rank 1's loss sum over its own shard of the data (restored
    # from its own file, not from rank 0's) ends where the uninterrupted rank 1's does.
    def engines(outcome) -> list[dict]:
        folder = Path(outcome.checkpoint)
        return [torch.load(folder / "state.pt", weights_only=True)["engine"],
                torch.load(folder / "engine_rank1.pt", weights_only=True)]

    (got0, got1), (want0, want1) = engines(box["outcome"]), engines(reference)
    assert got1["counters"]["loss_sum"] == want1["counters"]["loss_sum"] != want0["counters"]["loss_sum"]
    assert got0["counters"]["loss_sum"] == want0["counters"]["loss_sum"]


def test_killed_driver_resumes_from_the_last_checkpoint(ray_address, tmp_path):
    cmd = [sys.executable, "-m", "ampray.orchestrator.cli", *_args(tmp_path, "driver", 200, "--address", ray_address)]
    run_dir = tmp_path / "driver"
    first = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        at_kill = _wait_for_step(run_dir, 0, 90)["step"]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    for rank in (0, 1):  # the dead driver's workers go down with it before the rerun starts
        pid = _progress(run_dir, rank)["pid"]
        end = time.time() + 120
        while time.time() < end and _alive(pid):
            time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    starts = _starts(run_dir, 0)
    assert starts[0] == 0 and 40 <= starts[-1] <= at_kill and starts[-1] % 40 == 0
    scalars = read_scalars(str(run_dir / "tensorboard"))
    for tag in ("all/loss/mean", "rank0/scaler/scale", "rank1/loss"):
        steps = [s for s, _ in scalars[tag]]
        assert steps == sorted(set(steps)), f"{tag} went backwards: {steps}"
        assert steps[-1] == 200
    # A rerun that changes what was trained is refused before any worker starts, and the run is untouched.
    saved = (run_dir / "job.toml").read_text()
    t0 = time.time()
    third = subprocess.run([*cmd, "--optimizer.lr", "0.1", "--data.batch_size", "64"], capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 2, third.stderr[-3000:]
    assert "optimizer.lr: 0.003 in the checkpoint, 0.1 now" in third.stderr and "data.batch_size: 32" in third.stderr
    assert time.time() - t0 < 60 and (run_dir / "job.toml").read_text() == saved
    assert len(_starts(run_dir, 0)) == len(starts)  # no worker started


def test_ctrl_c_stops_the_run_and_says_how_to_resume(ray_address, tmp_path):
    cmd = [sys.executable, "-m", "ampray.orchestrator.cli", *_args(tmp_path, "intr", 2000, "--address", ray_address)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(tmp_path / "intr", 0, 50)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "ampray train: interrupted. Checkpoints written so far are kept in" in err and "Rerun the same command" in err
    assert _progress(tmp_path / "intr", 0)["step"] < 2000


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_impossible_requests_fail_within_seconds(ray_address, tmp_path, capsys):
    t0 = time.time()
    assert main(_args(tmp_path, "bad", 10, "--address", ray_address, "--scaling.num_workers", "64")) == 2
    assert main(_args(tmp_path, "bad", 10, "--address", ray_address, "--scaling.use_gpu", "true")) == 2
    assert main(_args(tmp_path, "bad", 10, "--address", ray_address, "--model.kind", "transformer")) == 2
    assert main(_args(tmp_path, "bad", 10, "--scaling.num_workers", "0")) == 2
    assert main(_args(tmp_path, "bad", 10, "--address", ray_address, "--data.batch_size", "4096")) == 2
    assert main(_args(tmp_path, "bad", 10, "--address", "127.0.0.1:1")) == 2  # nothing listens there
    (tmp_path / "afile").write_text("")
    assert main([*_args(tmp_path, "bad", 10, "--address", ray_address), "--run.storage_path", str(tmp_path / "afile")]) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert "run.address='127.0.0.1:1': no Ray cluster answers there" in err
    assert "afile/bad (Not a directory)" in err
    assert "data.batch_size=4096 is not allowed: expected at most 512" in err
    assert "scaling.num_workers=64" in err and "needs 64 CPUs" in err and "no GPU" in err
    assert "model.kind='transformer'" in err and "scaling.num_workers=0" in err
    assert not (tmp_path / "bad" / "progress").exists()  # no worker ever started
    with pytest.raises(ResourceError):
        run_training(JobConfig.load(None, {"scaling.gpus_per_worker": 2.0, "scaling.use_gpu": True,
                                           "run.address": ray_address}))


def test_compiled_model_trains_like_the_eager_one_under_ddp(ray_address, tmp_path):
    """`model.compile`: 2 workers train a torch.compile'd model under DDP (gloo) with gradient
    accumulation; in fp32 its final weights match the eager run's (fused kernels may round differently:
    a lost or doubled all-reduce would move them by about the learning rate), under the same keys."""
    def job(name: str, compile: bool) -> JobConfig:
        return JobConfig.load(None, {
            "run.name": name, "run.storage_path": str(tmp_path), "run.steps": 12, "run.report_every": 6,
            "run.checkpoint_every": 6, "model.options.hidden": 32, "model.options.in_features": 32,
            "model.compile": compile, "data.num_samples": 512, "data.batch_size": 32,
            "precision.dtype": "fp32", "precision.gradient_accumulation_steps": 2, "run.address": ray_address})

    compiled, eager = run_training(job("compiled", True)), run_training(job("eager", False))
    got, want = _final_weights(compiled.checkpoint), _final_weights(eager.checkpoint)
    assert got.keys() == want.keys() and not any("_orig_mod" in k for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert JobConfig.load(tmp_path / "compiled" / "job.toml").model.compile is True
    scalars = read_scalars(str(tmp_path / "compiled" / "tensorboard"))
    for rank in (0, 1):  # it did compile, on every rank, and did not recompile after the first report
        graphs = [v for _, v in scalars[f"rank{rank}/compile/graphs"]]
        assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    assert "rank0/compile/graphs" not in read_scalars(str(tmp_path / "eager" / "tensorboard"))
