"""The interactive face's API: train, benchmark, recommend. Each function returns plain data (tables as lists
of row dicts, series as [[step, value], ...], text) that the CLI (`ampray bench`, `ampray recommend`) and
the web UI (`ampray ui`) render; neither adds numbers of its own.

- `train_model_with_mixed_precision_interface(...)`: a real `ampray train` run through the orchestrator
  (local embedded Ray unless an address is given); `stream_training(...)` yields the same run's progress
  as it happens (loss and loss scale series read back from the run's TensorBoard events).
- `benchmark_mixed_precision_interface(model_type, batch_size)`: `benchmark_mixed_precision` for fp32 and
  each precision the hardware supports, as a table and a chart series.
- `get_mixed_precision_recommendations()` (from `ampray.amp.advice`): the detected hardware and what to
  use, with the reasons; `recommendation_view` lays it out as a table and text.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from ampray.amp.config import ConfigError

MODEL_TYPES = ("mlp", "cnn", "gpt")
# Model options per size: "small" trains in seconds on a CPU; "large" is what a GPU benchmark should see.
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {"mlp": {}, "cnn": {}, "gpt": {"preset": "micro"}},
    "large": {"mlp": {"in_features": 1024, "hidden": 4096, "depth": 4}, "cnn": {"arch": "resnet50", "image_size": 224,
              "num_classes": 1000}, "gpt": {"preset": "small"}},
}


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field}={value!r} is not allowed; expected {allowed}")


def _check_int(field: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < low:
        _fail(field, value, f"an integer >= {low}")
    return int(value)


def _check_model(model_type: Any) -> str:
    if model_type not in MODEL_TYPES:
        _fail("model_type", model_type, f"one of {list(MODEL_TYPES)}")
    return model_type


def _check_size(size: str, device_type: str) -> str:
    if size == "auto":
        return "large" if device_type == "cuda" else "small"
    if size not in MODEL_SIZES:
        _fail("size", size, f"one of {['auto', *MODEL_SIZES]}")
    return size


# -- training --------------------------------------------------------------------------------------
def training_job(model_type: str, num_epochs: int, batch_size: int, learning_rate: float,
                 use_mixed_precision: bool, adaptive: bool, *, num_workers: int, num_samples: int = 2048,
                 storage_path: str = "runs", name: str | None = None, address: str = "",
                 dtype: str = "auto", use_gpu: bool = False):
    """The JobConfig of a UI training run; every argument is checked first (ConfigError names it)."""
    from ampray.job import JobConfig

    _check_model(model_type)
    epochs = _check_int("num_epochs", num_epochs)
    batch = _check_int("batch_size", batch_size)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not 0 < learning_rate <= 10:
        _fail("learning_rate", learning_rate, "a number in (0, 10]")
    for field, value in (("use_mixed_precision", use_mixed_precision), ("adaptive", adaptive)):
        if not isinstance(value, bool):
            _fail(field, value, "true or false")
    per_epoch = num_samples // (batch * num_workers)
    if per_epoch < 1:
        _fail("batch_size", batch_size, f"at most {num_samples // num_workers} (the built-in dataset has "
              f"{num_samples} samples over {num_workers} workers)")
    steps = epochs * per_epoch
    if dtype == "auto":
        dtype = "fp16"  # loss-scaled, so the scale plot has something to show; bf16 needs no scaling
    name = name or f"ui-{model_type}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    overrides = {
        "model.kind": model_type, "model.options": dict(MODEL_SIZES["small"][model_type]),
        "data.num_samples": num_samples, "data.batch_size": batch,
        "precision.enabled": bool(use_mixed_precision), "precision.dtype": dtype if use_mixed_precision else "fp32",
        "optimizer.lr": float(learning_rate), "scaling.num_workers": num_workers,
        "scaling.use_gpu": "true" if use_gpu else "false",
        "run.name": name, "run.storage_path": storage_path, "run.steps": steps, "run.adaptive": bool(adaptive),
        "run.report_every": max(1, steps // 40), "run.checkpoint_every": steps, "run.address": address,
    }
    return JobConfig.load(None, overrides)


def stream_training(model_type: str = "mlp", num_epochs: int = 1, batch_size: int = 64,
                    learning_rate: float = 3e-3, use_mixed_precision: bool = True, adaptive: bool = False, *,
                    storage_path: str = "runs", address: str = "", num_workers: int = -1,
                    num_samples: int = 2048, poll_s: float = 1.0, name: str | None = None) -> Iterator[dict[str, Any]]:
    """Start a training run and yield its progress every `poll_s` seconds; the last item has done=True
    and the summary. Bad arguments raise ConfigError before Ray starts any worker. A caller that stops
    iterating early leaves the run going to its end (its TensorBoard events and checkpoints are written
    as usual)."""
    import ray

    from ampray.orchestrator.train import init_ray, resolve_scaling, run_training

    _check_model(model_type)
    init_ray(address)
    resources = ray.cluster_resources()
    from ampray.job import JobConfig

    # Epochs become steps through the number of workers: resolve it first (-1: one per GPU, if any).
    workers, use_gpu = resolve_scaling(JobConfig.load(None, {"scaling.num_workers": num_workers}), resources)
    job = training_job(model_type, num_epochs, batch_size, learning_rate, use_mixed_precision, adaptive,
                       num_workers=workers, num_samples=num_samples, storage_path=storage_path, name=name,
                       address=address, use_gpu=use_gpu)
    logdir = job.run_dir() / "tensorboard"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["outcome"] = run_training(job)
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    t0 = time.time()
    thread = threading.Thread(target=run, name="ampray-ui-train", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
        if thread.is_alive():
            yield _progress(job, logdir, workers, use_gpu, time.time() - t0, done=False)
    if "error" in box:
        raise box["error"]
    final = _progress(job, logdir, workers, use_gpu, time.time() - t0, done=True)
    final["summary"] = summary_rows(box["outcome"].final)
    final["final_loss"] = final["loss"][-1][1] if final["loss"] else None
    yield final


def train_model_with_mixed_precision_interface(model_type: str = "mlp", num_epochs: int = 1, batch_size: int = 64,
                                               learning_rate: float = 3e-3, use_mixed_precision: bool = True,
                                               adaptive: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Train through the orchestrator and return the run's series, summary table and TensorBoard line."""
    last: dict[str, Any] = {}
    for last in stream_training(model_type, num_epochs, batch_size, learning_rate, use_mixed_precision,
                                adaptive, **kwargs):
        pass
    return last


def _progress(job, logdir: Path, workers: int, use_gpu: bool, elapsed: float, done: bool) -> dict[str, Any]:
    from ampray.actors.aggregator import read_scalars

    scalars = read_scalars(str(logdir)) if logdir.is_dir() else {}
    loss = [[int(s), float(v)] for s, v in scalars.get("all/loss/mean", [])]
    scale = [[int(s), float(v)] for s, v in scalars.get("all/scaler/scale/mean", [])]
    step = loss[-1][0] if loss else 0
    return {"done": done, "run_name": job.run.name, "step": step, "total_steps": job.run.steps,
            "workers": workers, "device": "GPU" if use_gpu else "CPU", "elapsed_s": round(elapsed, 1),
            "loss": loss, "scale": scale, "logdir": str(logdir),
            "tensorboard": f"tensorboard --logdir {logdir}",
            "precision": _short(job.precision.to_dict()["dtype"]) if job.precision.enabled else "fp32"}


def _short(dtype: str) -> str:
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def summary_rows(final: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rank from its last report (the same figures `ampray train` prints)."""
    from ampray.actors.aggregator import placement_label

    rows = []
    for rank, rec in sorted(final.items()):
        rows.append({"rank": rank, "step": int(rec.get("step", 0)), "loss": round(float(rec.get("loss", float("nan"))), 4),
                     "samples_per_s": round(float(rec.get("perf/samples_per_s", 0.0)), 1),
                     "scale": float(rec.get("scaler/scale", 0.0)),
                     "skipped_steps": int(rec.get("perf/skipped_steps", 0)),
                     "peak_memory_mib": round(max(float(rec.get("memory/peak_allocated_bytes", 0)), 0.0) / 2**20, 1),
                     "placement": placement_label(rec)})
    return rows


# -- benchmark -------------------------------------------------------------------------------------
def benchmark_mixed_precision_interface(model_type: str = "mlp", batch_size: int = 64, *, num_iterations: int = 20,
                                        warmup: int = 5, size: str = "auto", device: str | None = None,
                                        precisions: list[str] | None = None, compile: bool = False) -> dict[str, Any]:
    """fp32 and every precision the device runs, on one model type and batch size: table rows and a chart
    series (precision -> step time); speedup and memory saving are relative to fp32 (compiled too with
    `compile`)."""
    import torch

    from ampray.amp.autocast import default_device
    from ampray.amp.bench import available_precisions, benchmark_mixed_precision, format_bench_table
    from ampray.models import build_criterion, build_model, example_batch

    _check_model(model_type)
    batch = _check_int("batch_size", batch_size)
    iters = _check_int("num_iterations", num_iterations)
    dev = torch.device(device) if device else default_device()
    size = _check_size(size, dev.type)
    options = MODEL_SIZES[size][model_type]
    torch.manual_seed(0)
    model = build_model(model_type, **options)
    data = example_batch(model_type, options, batch, generator=torch.Generator().manual_seed(0))
    result = benchmark_mixed_precision(model, data, num_iterations=iters, warmup=warmup,
                                       criterion=build_criterion(model_type), device=dev,
                                       precisions=precisions or available_precisions(dev), compile=compile)
    rows = [{"model": model_type, "size": size, "batch_size": batch, **row} for row in format_bench_table(result)]
    _add_mfu(rows, model_type, model, data, dev)
    return {"device": result["device"], "model": model_type, "size": size, "options": options, "batch_size": batch,
            "compiled": result["compiled"], "rows": rows, "chart": [{"precision": r["precision"], "median_ms": r["median_ms"]} for r in rows],
            "best": result["best"], "raw": result}


def _add_mfu(rows: list[dict[str, Any]], model_type: str, model, data, device) -> None:
    """Each row's `tflops_per_s` and `mfu` (achieved training flops over the device's dense peak for that
    row's precision; None where the peak is unknown, as on CPUs without AMPRAY_PEAK_TFLOPS)."""
    import torch

    from ampray.amp.flops import peak_flops
    from ampray.models.registry import model_flops_per_sample, resolve_spec

    inputs = data[0] if isinstance(data, (tuple, list)) else data
    try:
        per_sample = model_flops_per_sample(resolve_spec(model_type), model, inputs)
    except Exception:  # noqa: BLE001 - a figure that cannot be computed is left out, never fatal
        per_sample = None
    for row in rows:
        achieved = row["samples_per_s"] * per_sample if per_sample else None
        peak = peak_flops(torch.device(device), None, precision=row["precision"]) if achieved else None
        row["tflops_per_s"] = None if achieved is None else float(f"{achieved / 1e12:.4g}")  # 4 digits: a CPU run is far below 0.001
        row["mfu"] = None if not (achieved and peak) else float(f"{achieved / peak:.4g}")


# -- recommendations -------------------------------------------------------------------------------
def recommendation_view(rec: dict[str, Any] | None = None, device: str | None = None) -> dict[str, Any]:
    """`get_mixed_precision_recommendations()` (the API both faces call) as a hardware table, a headline and
    the reasons."""
    from ampray.amp.advice import get_mixed_precision_recommendations

    rec = rec if rec is not None else get_mixed_precision_recommendations(device=device)
    hw = rec["hardware"]
    memory = hw.get("total_memory_bytes")
    hardware = [
        {"property": "device", "value": str(hw.get("device_name"))},
        {"property": "device type", "value": str(hw.get("device_type"))},
        {"property": "compute capability", "value": str(hw.get("compute_capability") or "-")},
        {"property": "tensor cores", "value": "yes" if hw.get("tensor_cores") else "no"},
        {"property": "bf16 supported", "value": "yes" if hw.get("bf16") else "no"},
        {"property": "bf16 accelerated", "value": "yes" if hw.get("bf16_accelerated") else "no"},
        {"property": "tf32", "value": "yes" if hw.get("tf32") else "no"},
        {"property": "memory", "value": f"{memory / 2**30:.1f} GiB" if memory else "-"},
    ]
    headline = (f"Use {rec['recommended_dtype']}" + (" with TF32 for fp32 matmuls" if rec["use_tf32"] else "")
                if rec["use_mixed_precision"] else "Stay in fp32" + (" (with TF32)" if rec["use_tf32"] else ""))
    return {"hardware": hardware, "recommended_dtype": rec["recommended_dtype"],
            "use_mixed_precision": rec["use_mixed_precision"], "use_tf32": rec["use_tf32"],
            "headline": headline, "reasons": list(rec["reasons"]), "config": rec["config"]}


__all__ = ["MODEL_SIZES", "MODEL_TYPES", "benchmark_mixed_precision_interface",
           "recommendation_view", "stream_training", "summary_rows",
           "train_model_with_mixed_precision_interface", "training_job"]
