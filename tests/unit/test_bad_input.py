"""Bad input gets a clear error before any worker starts (the field, the value, what is allowed; no
traceback), contradictory precision settings get a note, CPU workers default to bf16, and the smaller
frictions of issue 17: the storage probe writes a real amount, `ampray ui` prints its URL, the CPU memory
peak is never below the current figure, and reports carry the learning rate and gradient norm.

Docs: docs/bad_input.md lists every case with its message and where it is caught."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.job import ConfigError, JobConfig, choose_precision, given_fields, precision_notes
from ampray.orchestrator.cli import _precision_chooser, main, search_table
from ampray.orchestrator.search import check_new_search
from tests.unit.helpers import batches, tiny_mlp

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process: its exit code and what it wrote to stderr, which must hold no traceback."""
    t0 = time.time()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert time.time() - t0 < 15, "a bad input must fail in seconds, before Ray"
    return code, err


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_binary_job_file_is_named_as_not_toml(tmp_path, capsys, command):
    binary = tmp_path / "model.pt"
    torch.save({"w": torch.arange(600, dtype=torch.float32)}, binary)  # a zip archive: not UTF-8
    code, err = run_cli(capsys, command, "--config", str(binary))
    assert code == 2
    assert f"--config '{binary}': not a TOML text file" in err and "is not UTF-8" in err
    assert "expected a job file" in err


def test_tune_seed_out_of_range_names_the_flag_and_the_range(capsys):
    code, err = run_cli(capsys, "tune", "--seed", "-1")
    assert code == 2
    assert "ampray tune: error: --seed=-1 is not allowed: expected an integer in [0, 4294967295]" in err


def test_tune_storage_path_that_is_a_file_fails_before_ray(tmp_path, capsys):
    import ray

    afile = tmp_path / "afile"
    afile.write_text("")
    before = ray.is_initialized()  # the Ray tests' session cluster may be up when the whole suite runs
    code, err = run_cli(capsys, "tune", "--name", "s", "--run.storage_path", str(afile))
    assert code == 2
    assert f"run.storage_path='{afile}' is not allowed: cannot create and write the storage folder" in err
    assert "MiB free on the file system of" in err and "expected a writable folder" in err
    assert ray.is_initialized() == before  # refused before Ray was started


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("name,shown", [("a/b", "'a/b'"), ("", "''"), (".hidden", "'.hidden'")])
def test_train_and_tune_refuse_the_same_bad_names(capsys, command, name, shown):
    code, err = run_cli(capsys, command, "--name", name)
    flag = "run.name" if command == "train" else "--name"
    assert code == 2
    assert f"{flag}={shown} is not allowed: expected a non-empty folder name without '/'" in err


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_300_character_name_blames_the_name_not_the_storage_path(capsys, command):
    code, err = run_cli(capsys, command, "--name", "n" * 300)
    assert code == 2
    assert "name='nnnnnnnnnnnnnnnnnnnn...' is not allowed: expected a name of at most 200 bytes" in err
    assert "this one has 300" in err and "storage_path" not in err


def test_tune_refuses_scaling_num_workers_it_would_overwrite(tmp_path, capsys):
    code, err = run_cli(capsys, "tune", "--scaling.num_workers", "1000", "--run.storage_path", str(tmp_path))
    assert code == 2
    assert ("scaling.num_workers=1000 is not used by ampray tune: every trial runs --workers-per-trial=1 "
            "worker(s); expected --workers-per-trial 1000") in err
    assert not (tmp_path / "ampray-tune").exists()


def test_tune_refuses_data_fill_gpu_before_ray_starts(tmp_path, capsys):
    code, err = run_cli(capsys, "tune", "--data.fill_gpu", "true", "--run.storage_path", str(tmp_path))
    assert code == 2
    assert "data.fill_gpu=True is not allowed with ampray tune: trials share GPUs" in err
    assert not (tmp_path / "ampray-tune").exists()


def test_tune_refuses_fractional_gpus_for_trials_of_several_workers(tmp_path, capsys):
    code, err = run_cli(capsys, "tune", "--workers-per-trial", "2", "--gpus-per-trial", "0.5",
                        "--run.storage_path", str(tmp_path))
    assert code == 2
    assert ("--gpus-per-trial=0.5 is not allowed with --workers-per-trial=2: each worker of a trial gets that "
            "share of a GPU, and two ranks cannot share one") in err
    assert not (tmp_path / "ampray-tune").exists()


def test_a_search_name_in_use_is_refused_with_both_ways_on(tmp_path):
    (tmp_path / "old").mkdir()
    check_new_search(tmp_path / "old", "old")  # an empty folder (a refused attempt) holds no search
    (tmp_path / "old" / "search.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        check_new_search(tmp_path / "old", "old")
    assert str(err.value) == (f"search 'old' already exists in {tmp_path / 'old'}: `ampray tune --resume old` "
                              "continues it (if it was interrupted), or give this search a new --name")


# --- precision: notes on contradictions, the CPU default --------------------------------------------

def test_contradictory_precision_settings_get_a_note_naming_them():
    fp16 = JobConfig.load(None, {"precision.dtype": "fp16", "precision.bf16_grad_scaling": True})
    assert precision_notes(fp16) == [
        "precision.bf16_grad_scaling=true has no effect with precision.dtype='fp16': it asks for loss scaling under "
        "bf16 (fp16 is loss-scaled unless precision.use_grad_scaling=false)"]
    fp32 = JobConfig.load(None, {"precision.dtype": "fp32", "precision.init_scale": 1024.0,
                                 "precision.growth_interval": 100})
    assert precision_notes(fp32) == [
        "precision.init_scale=1024.0, precision.growth_interval=100 have no effect: precision.dtype='fp32' runs "
        "without loss scaling (the loss scaler runs for fp16, or for bf16 with precision.bf16_grad_scaling=true)"]
    off = JobConfig.load(None, {"precision.enabled": False, "precision.hysteresis": 3})
    assert precision_notes(off)[0].startswith("precision.hysteresis=3 has no effect: precision.enabled=false")
    # Consistent settings: no note (bf16 scaled on request, the defaults, fp32 with default scaler fields).
    for overrides in ({"precision.dtype": "bf16", "precision.bf16_grad_scaling": True, "precision.init_scale": 8.0},
                      {}, {"precision.dtype": "fp32"}):
        assert precision_notes(JobConfig.load(None, overrides)) == []


def test_given_fields_are_the_file_and_the_overrides(tmp_path):
    (tmp_path / "job.toml").write_text('[precision]\ndtype = "fp32"\n[model.options]\nhidden = 8\n')
    assert given_fields(tmp_path / "job.toml", {"run.steps": 3}) == {"precision.dtype", "model.options.hidden",
                                                                     "run.steps"}
    assert given_fields(None, {}) == set()


def test_cpu_workers_default_to_bf16_and_gpus_keep_fp16():
    job = JobConfig.load(None, {})
    assert job.precision.dtype == torch.float16  # the engine's default, kept on GPUs
    on_gpu, note = choose_precision(job, True, set())
    assert on_gpu.precision.dtype == torch.float16 and note is None
    on_cpu, note = choose_precision(job, False, set())
    assert on_cpu.precision.dtype == torch.bfloat16 and not on_cpu.precision.scaling_enabled
    assert note.startswith("precision.dtype='bf16' chosen for CPU workers (none was set): fp16 autocast is "
                           "emulated on CPU")
    assert job.precision.dtype == torch.float16  # the job given is not changed in place


def test_an_explicit_fp16_on_cpu_stays_with_a_note_on_speed():
    job = JobConfig.load(None, {"precision.dtype": "fp16"})
    kept, note = choose_precision(job, False, {"precision.dtype"})
    assert kept.precision.dtype == torch.float16
    assert note.startswith("precision.dtype='fp16' on CPU workers: fp16 autocast is emulated on CPU: the models "
                           "run 15-30x slower")
    bf16, note = choose_precision(JobConfig.load(None, {"precision.dtype": "bf16"}), False, {"precision.dtype"})
    assert bf16.precision.dtype == torch.bfloat16 and note is None


def test_scaler_settings_or_a_trained_run_keep_their_precision_on_cpu():
    job = JobConfig.load(None, {"precision.init_scale": 1024.0})
    kept, note = choose_precision(job, False, {"precision.init_scale"})
    assert kept.precision.dtype == torch.float16
    assert "precision.dtype='fp16' (the default) kept on CPU workers, since precision.init_scale act only with " \
           "loss scaling" in note
    fp16_wire = JobConfig.load(None, {"scaling.allreduce_dtype": "fp16"})
    assert choose_precision(fp16_wire, False, {"scaling.allreduce_dtype"})[0].precision.dtype == torch.float16
    # A rerun of a run trained at fp16 (before this default) resumes at fp16 instead of being refused.
    rerun, note = choose_precision(JobConfig.load(None, {}), False, set(), trained="float16")
    assert rerun.precision.dtype == torch.float16 and note == "precision.dtype='fp16': as the run was trained"
    off = JobConfig.load(None, {"precision.enabled": False})
    assert choose_precision(off, False, set()) == (off, None)


def test_the_cli_chooser_reads_the_runs_trained_dtype_and_prints_the_notes(tmp_path):
    job = JobConfig.load(None, {"run.storage_path": str(tmp_path), "precision.dtype": "fp32",
                                "precision.max_scale": 2.0**20})
    notes: list[str] = []
    choose = _precision_chooser({"precision.dtype", "precision.max_scale"}, notes.append)
    assert choose(job, False).precision.dtype == torch.float32
    assert notes == ["precision.max_scale=1048576.0 has no effect: precision.dtype='fp32' runs without loss scaling "
                     "(the loss scaler runs for fp16, or for bf16 with precision.bf16_grad_scaling=true)"]
    run_dir = tmp_path / "ampray"
    run_dir.mkdir()
    (run_dir / "job.toml").write_text(JobConfig.load(None, {"precision.dtype": "fp16"}).to_toml())
    notes.clear()
    assert _precision_chooser(set(), notes.append)(JobConfig.load(None, {"run.storage_path": str(tmp_path)}),
                                                   False).precision.dtype == torch.float16
    assert notes == ["precision.dtype='fp16': as the run was trained"]


# --- tune's table ------------------------------------------------------------------------------------

def test_the_search_table_shows_whole_trial_ids_on_a_narrow_terminal():
    params = ["precision.init_scale", "precision.growth_factor", "precision.backoff_factor",
              "precision.growth_interval", "precision.hysteresis"]
    rows = [{"trial": f"trial_30d4e_{i:05d}", "status": "completed", "objective": 0.1 + i, "loss": 0.5,
             "skip_rate": 0.0, "samples_per_s": 1000.0, **{p: 1.5 for p in params}} for i in range(4)]
    console = Console(width=80, record=True, force_terminal=False)
    console.print(search_table({"rows": rows, "params": params}, 5))
    text = console.export_text()
    assert all(f"trial_30d4e_{i:05d}" in text for i in range(4)), text


# --- the storage probe, the UI's URL, memory figures, lr and grad_norm -------------------------------

def test_the_storage_probe_writes_megabytes_and_reports_free_space(tmp_path):
    # A process whose files may not grow past 1 MiB stands in for a nearly full disk: the old empty probe
    # passed there, and the run died later writing its first checkpoint.
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))\n"
        "from ampray.job import ConfigError, JobConfig\n"
        "from ampray.orchestrator.train import make_run_dir\n"
        f"job = JobConfig.load(None, {{'run.storage_path': {str(tmp_path)!r}}})\n"
        "try:\n    make_run_dir(job)\nexcept ConfigError as err:\n    print(err)\n    sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"run.storage_path='{tmp_path}' is not allowed: cannot create and write the run folder" in proc.stdout
    assert "(File too large)" in proc.stdout and "MiB free on the file system of" in proc.stdout
    assert "this check writes 8 MiB" in proc.stdout
    assert list((tmp_path / "ampray").iterdir()) == []  # the probe is removed again
    from ampray.orchestrator.train import make_run_dir

    assert make_run_dir(JobConfig.load(None, {"run.storage_path": str(tmp_path)})) == tmp_path / "ampray"


def test_ampray_ui_prints_the_url_it_serves_on():
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ampray.orchestrator.cli", "ui", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        line = proc.stdout.readline()
        match = re.match(r"ampray ui: serving on (http://\S+) ", line)
        assert match, line
        with urllib.request.urlopen(match.group(1), timeout=30) as response:
            assert response.status == 200
        assert f":{port}" in match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cpu_peak_memory_is_never_below_the_current_figure():
    from ampray.amp.memory import memory_stats

    held = torch.ones(64 * 2**20 // 4)  # 64 MiB touched: RSS grows past the lazily updated high-water mark
    stats = memory_stats("cpu")
    assert stats.peak_rss_bytes >= stats.rss_bytes and stats.peak_allocated_bytes >= stats.allocated_bytes
    assert stats.rss_bytes > held.numel() * 4
    del held


def test_reports_carry_the_learning_rate_and_the_unscaled_gradient_norm():
    from ampray.actors.reporting import optimizer_records
    from ampray.actors.worker import build_scheduler
    from ampray.job import OptimizerSection

    results = {}
    for label, clip in (("scaled", None), ("clipped", 1e30)):  # clipping's norm is the reference
        torch.manual_seed(0)
        model = tiny_mlp()
        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="fp16", init_scale=1024.0, max_grad_norm=clip),
                                       device="cpu")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = build_scheduler(optimizer, OptimizerSection(lr=0.1, warmup_steps=4), 10)
        x, y = batches(1, batch=8)[0]
        out = engine.train_step(model, optimizer, F.cross_entropy, x, y, scheduler)
        engine.stepper.settle()
        results[label] = optimizer_records(scheduler, out)
    assert results["scaled"]["optim/lr"] == pytest.approx(0.1 * 2 / 4)  # warm-up: the next step's rate
    norm = results["scaled"]["optim/grad_norm"]
    assert 0 < norm < float("inf")
    assert norm == pytest.approx(results["clipped"]["optim/grad_norm"], rel=1e-6)
    unscaled = optimizer_records(scheduler, type("Step", (), {"grad_norm": None})())
    assert set(unscaled) == {"optim/lr"}


# --- GPU defaults (issue 18): bf16 where the GPUs have it, compile where it pays ----------------------

def test_gpus_with_bf16_default_to_bf16_unless_the_job_says_otherwise():
    from ampray.job import choose_compile  # noqa: F401  (imported here: the section's second function)

    job = JobConfig.load(None, {})
    chosen, note = choose_precision(job, True, set(), gpu_bf16=True)
    assert chosen.precision.dtype == torch.bfloat16 and not chosen.precision.scaling_enabled
    assert note.startswith("precision.dtype='bf16' chosen for GPU workers (none was set)")
    # fp16 stays where the GPUs lack bf16, where the driver cannot tell (a remote cluster), where the user
    # asked for a dtype or scaler settings, and for a run trained at fp16 before.
    assert choose_precision(job, True, set(), gpu_bf16=False) == (job, None)
    assert choose_precision(job, True, set(), gpu_bf16=None) == (job, None)
    fp16 = JobConfig.load(None, {"precision.dtype": "fp16"})
    assert choose_precision(fp16, True, {"precision.dtype"}, gpu_bf16=True) == (fp16, None)
    scaled = JobConfig.load(None, {"precision.growth_interval": 500})
    assert choose_precision(scaled, True, {"precision.growth_interval"}, gpu_bf16=True)[0].precision.dtype == \
        torch.float16
    rerun, note = choose_precision(job, True, set(), trained="float16", gpu_bf16=True)
    assert rerun.precision.dtype == torch.float16 and note == "precision.dtype='fp16': as the run was trained"
    # A run trained in the bf16 chosen here resumes in bf16 where the driver cannot see the GPUs (--address).
    for unknown in (None, False):
        rerun, note = choose_precision(job, True, set(), trained="bfloat16", gpu_bf16=unknown)
        assert rerun.precision.dtype == torch.bfloat16 and note == "precision.dtype='bf16': as the run was trained"


def test_compile_is_chosen_for_long_gpt_runs_on_gpus_only():
    from ampray.job import COMPILE_PAYS_AFTER_STEPS, choose_compile

    long_gpt = JobConfig.load(None, {"model.kind": "gpt", "run.steps": COMPILE_PAYS_AFTER_STEPS})
    chosen, note = choose_compile(long_gpt, True, set())
    assert chosen.model.compile is True and note.startswith("model.compile=true chosen for the gpt on GPU workers")
    assert long_gpt.model.compile is False  # not changed in place
    short = JobConfig.load(None, {"model.kind": "gpt", "run.steps": COMPILE_PAYS_AFTER_STEPS - 1})
    kept, note = choose_compile(short, True, set())
    assert kept.model.compile is False and "does not pay for compiling" in note
    assert choose_compile(long_gpt, False, set()) == (long_gpt, None)  # CPU defaults stay quick
    assert choose_compile(long_gpt, True, {"model.compile"}) == (long_gpt, None)  # the user's choice stands
    mlp = JobConfig.load(None, {"model.kind": "mlp", "run.steps": 10 * COMPILE_PAYS_AFTER_STEPS})
    assert choose_compile(mlp, True, set()) == (mlp, None)


def test_this_machine_without_nvidia_smi_cannot_tell_bf16():
    import shutil

    from ampray.orchestrator.train import local_gpus_bf16

    if shutil.which("nvidia-smi") is None:
        assert local_gpus_bf16() is None
    else:
        assert local_gpus_bf16() in (True, False, None)
