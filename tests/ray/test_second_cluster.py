"""An embedded `ampray train` and `ampray tune` beside an unrelated Ray cluster on the same host (another
user's `ray start`): each finds its own cluster by address and completes; and workers that cannot start
stop the run with a clear error within the startup timeout instead of waiting forever.

The other cluster gets a Ray temp folder of its own (RAY_TMPDIR), and so do the runs beside it: its
`ray_current_cluster` file, which Ray's auto-detection prefers, is then seen by these runs only, not by
other Ray sessions on the machine."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
import psutil

from ampray.actors.aggregator import read_scalars
from ampray.orchestrator.cli import main
from tests.unit.helpers import free_port

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
JOB = ["--model.options.hidden", "32", "--model.options.in_features", "16", "--data.num_samples", "512",
       "--data.batch_size", "32", "--run.report_every", "10", "--run.checkpoint_every", "40"]
DEADLINE_S = 240


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def other_cluster():
    """A second Ray head (`ray start --head --block`, with a dashboard and so a state API) in its own
    process group; teardown ends that group and whatever of its processes is left, by pid."""
    temp = tempfile.mkdtemp(prefix="ar2-", dir="/tmp")  # short: Ray's socket paths live below it
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = temp
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
                             "--node-ip-address", "127.0.0.1", "--include-dashboard", "true",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        address_file = Path(temp) / "ray" / "ray_current_cluster"
        while not (address_file.is_file() and _answers(port) and _answers(dashboard)):
            assert head.poll() is None and time.time() < end, "the second Ray cluster did not start"
            time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        procs = [head]
        try:
            procs += psutil.Process(head.pid).children(recursive=True)
        except psutil.Error:
            pass
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs([p for p in procs if isinstance(p, psutil.Process)], timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ampray.orchestrator.cli", *args], env=env, capture_output=True,
                          text=True, timeout=DEADLINE_S)


def test_embedded_train_and_tune_beside_another_cluster(other_cluster, tmp_path):
    env = other_cluster["env"]
    t0 = time.time()
    trained = _cli(["train", "--name", "beside", "--run.storage_path", str(tmp_path), "--run.steps", "80",
                    "--scaling.num_workers", "2", *JOB], env)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "beside: step 80/80" in trained.stdout
    scalars = read_scalars(str(tmp_path / "beside" / "tensorboard"))
    for rank in (0, 1):
        assert [s for s, _ in scalars[f"rank{rank}/loss"]] == list(range(10, 81, 10))
    assert sorted(p.name for p in (tmp_path / "beside").glob("checkpoint_*"))  # the step-80 one at least
    train_s = time.time() - t0

    tuned = _cli(["tune", "--space", "scaler", "--samples", "3", "--scheduler", "fifo", "--name", "near",
                  "--run.storage_path", str(tmp_path), "--run.steps", "40", *JOB], env)
    assert tuned.returncode == 0, tuned.stdout[-2000:] + tuned.stderr[-3000:]
    rows = pq.read_table(tmp_path / "near" / "results.parquet").to_pylist()
    assert len(rows) == 3 and {row["status"] for row in rows} == {"completed"}, rows
    assert (tmp_path / "near" / "best.toml").is_file()
    # The other cluster saw none of it: it is still up, and no job of these runs reached it.
    jobs = subprocess.run([RAY, "list", "jobs", "--address", other_cluster["address"], "--format", "json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    assert "ampray" not in jobs.stdout, jobs.stdout[-2000:]
    print(f"train {train_s:.0f} s, tune {time.time() - t0 - train_s:.0f} s")


def test_workers_that_cannot_start_stop_the_run_with_a_clear_error(ray_address, tmp_path, capsys, monkeypatch):
    from ray.util.placement_group import placement_group, remove_placement_group

    # A placement group left behind (as a dead cleaner leaves a stopped trial's) holds 3 of the 4 CPUs:
    # the pre-flight sees a cluster of 4, the 2 one-CPU workers never get theirs.
    held = placement_group([{"CPU": 3}])
    ray.get(held.ready(), timeout=60)
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")  # the controller inherits it
    try:
        t0 = time.time()
        code = main(["train", "--name", "starved", "--address", ray_address, "--run.storage_path", str(tmp_path),
                     "--run.steps", "20", "--scaling.num_workers", "2", *JOB])
        took = time.time() - t0
    finally:
        remove_placement_group(held)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "the run's 2 worker(s) (cpus_per_worker=1) did not start within 5 s" in err
    assert "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in err
    assert took < 60, took
