"""`ampray ui`: a Gradio app over the interface functions (optional extra `ampray[ui]`).

Three tabs: Train (a real run through the orchestrator on the embedded local Ray; loss and loss scale
plotted as the run's TensorBoard events arrive), Benchmark (fp32 against every precision the hardware
runs) and Recommendations (detected hardware, what to use and why). Bad input shows an error line in the
page; the app keeps running. The server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

from ampray.amp.config import ConfigError
from ampray.orchestrator.interface import (MODEL_TYPES, benchmark_mixed_precision_interface, recommendation_view,
                                           stream_training)

BENCH_COLUMNS = ["precision", "median_ms", "samples_per_s", "speedup_percent", "peak_mib", "memory_savings_percent"]
SUMMARY_COLUMNS = ["rank", "step", "loss", "samples_per_s", "scale", "skipped_steps", "peak_memory_mib", "placement"]


def _frame(rows: list[dict[str, Any]], columns: list[str], numeric: tuple[str, ...] = ()):
    import pandas as pd

    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)
    return frame.astype({c: "float64" for c in numeric}) if numeric else frame


def _series(points: list[list[float]], name: str):
    """Typed even when empty: the plot decides its axes' kinds from the first frame it gets (an untyped
    empty frame would make them categorical)."""
    import pandas as pd

    return pd.DataFrame({"step": pd.Series([int(s) for s, _ in points], dtype="int64"),
                         name: pd.Series([float(v) for _, v in points], dtype="float64")})


def _int(field: str, value: Any) -> Any:
    """gr.Number hands over floats; whole numbers become ints, the rest stay for the check to name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _error(err: Exception) -> str:
    return f"**Error:** {err}"


def train_handler(model_type, num_epochs, batch_size, learning_rate, use_mixed_precision, adaptive, *,
                  storage_path: str, address: str, poll_s: float = 1.0) -> Iterator[tuple]:
    """Yields (status, loss plot, scale plot, summary table, TensorBoard line) as the run goes."""
    empty_loss, empty_scale = _series([], "loss"), _series([], "log2_scale")
    try:
        stream = stream_training(model_type, _int("num_epochs", num_epochs), _int("batch_size", batch_size),
                                 learning_rate, bool(use_mixed_precision), bool(adaptive),
                                 storage_path=storage_path, address=address, poll_s=poll_s)
        for snap in stream:
            done = snap["done"]
            status = (f"**{'Finished' if done else 'Training'}** `{snap['run_name']}`: step {snap['step']} / "
                      f"{snap['total_steps']}, {snap['workers']} {snap['device']} worker(s), {snap['precision']}, "
                      f"{snap['elapsed_s']:.0f} s" + (f", final loss {snap['final_loss']:.4f}" if done and
                                                       snap.get("final_loss") is not None else ""))
            summary = _frame(snap.get("summary", []), SUMMARY_COLUMNS)
            # Scales are powers of two: log2 keeps the axis labels short and a backoff one step down.
            log2_scale = [[s, math.log2(v)] for s, v in snap["scale"] if v > 0]
            yield (status, _series(snap["loss"], "loss"), _series(log2_scale, "log2_scale"), summary,
                   f"View it: `{snap['tensorboard']}`")
    except (ConfigError, ValueError) as err:
        yield _error(err), empty_loss, empty_scale, _frame([], SUMMARY_COLUMNS), ""
    except Exception as err:  # a run that failed: say so in the page and keep serving
        yield (_error(f"the training run failed: {type(err).__name__}: {err}"), empty_loss, empty_scale,
               _frame([], SUMMARY_COLUMNS), "")


PRECISION_ORDER = ("fp32", "tf32", "fp16", "bf16")


def bench_handler(model_type, batch_size, num_iterations) -> tuple:
    """(status, table, chart) of one benchmark."""
    try:
        result = benchmark_mixed_precision_interface(model_type, _int("batch_size", batch_size),
                                                     num_iterations=_int("num_iterations", num_iterations))
    except (ConfigError, ValueError) as err:
        return _error(err), _frame([], BENCH_COLUMNS), _frame([], ["precision", "median_ms"], ("median_ms",))
    status = (f"**{result['model']}** ({result['size']}), batch {result['batch_size']} on {result['device']}: "
              f"fastest is **{result['best']}**")
    return status, _frame(result["rows"], BENCH_COLUMNS), _frame(result["chart"], ["precision", "median_ms"], ("median_ms",))


def recommend_handler() -> tuple:
    view = recommendation_view()
    text = f"### {view['headline']}\n\n" + "\n".join(f"- {r}" for r in view["reasons"])
    return text, _frame(view["hardware"], ["property", "value"])


def _model_and_batch(gr, tab: str):
    """The model-type and batch-size inputs both tabs start with (typed-in model names get a clear error)."""
    model = gr.Dropdown(list(MODEL_TYPES), value="mlp", label="Model type", allow_custom_value=True,
                        elem_id=f"{tab}-model")
    return model, gr.Number(value=64, label="Batch size", elem_id=f"{tab}-batch")


def build_app(storage_path: str = "runs", address: str = "", poll_s: float = 1.0):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="ampray") as app:
        gr.Markdown("# ampray: mixed-precision training on Ray")
        with gr.Tab("Train", id="train"):
            with gr.Row():
                model, batch = _model_and_batch(gr, "train")
                epochs = gr.Number(value=2, label="Epochs", elem_id="train-epochs")
                lr = gr.Number(value=3e-3, label="Learning rate", elem_id="train-lr")
            with gr.Row():
                mixed = gr.Checkbox(value=True, label="Mixed precision", elem_id="train-mixed")
                adaptive = gr.Checkbox(value=False, label="Adaptive scaler", elem_id="train-adaptive")
                start = gr.Button("Train", variant="primary", elem_id="train-button")
            status = gr.Markdown("Set the run up and press Train.", elem_id="train-status")
            with gr.Row():
                loss_plot = gr.LinePlot(_series([], "loss"), x="step", y="loss", title="Loss (mean over ranks)",
                                        height=320, elem_id="loss-plot")
                scale_plot = gr.LinePlot(_series([], "log2_scale"), x="step", y="log2_scale",
                                         title="Loss scale, log2 (mean over ranks)", height=320, y_axis_format="d",
                                         elem_id="scale-plot")
            summary = gr.Dataframe(_frame([], SUMMARY_COLUMNS), label="Per-rank summary", elem_id="train-summary")
            tb = gr.Markdown("", elem_id="train-tensorboard")

            def train(m, e, b, r, mp, ad):
                yield from train_handler(m, e, b, r, mp, ad, storage_path=storage_path, address=address,
                                         poll_s=poll_s)

            start.click(train, [model, epochs, batch, lr, mixed, adaptive], [status, loss_plot, scale_plot, summary, tb])
        with gr.Tab("Benchmark", id="bench"):
            with gr.Row():
                b_model, b_batch = _model_and_batch(gr, "bench")
                b_iters = gr.Number(value=20, label="Timed iterations", elem_id="bench-iters")
                b_go = gr.Button("Run benchmark", variant="primary", elem_id="bench-button")
            b_status = gr.Markdown("fp32 against every precision this hardware runs.", elem_id="bench-status")
            b_table = gr.Dataframe(_frame([], BENCH_COLUMNS), label="Results", elem_id="bench-table")
            # Bars from zero (a bar's length is its value) and in the table's order, fp32 first.
            b_chart = gr.BarPlot(_frame([], ["precision", "median_ms"], ("median_ms",)), x="precision", y="median_ms",
                                 title="Median step time (ms)", elem_id="bench-chart", y_lim=[0, None],
                                 sort=list(PRECISION_ORDER))
            b_go.click(bench_handler, [b_model, b_batch, b_iters], [b_status, b_table, b_chart])
        with gr.Tab("Recommendations", id="recommend"):
            r_text = gr.Markdown(elem_id="recommend-text")
            r_table = gr.Dataframe(_frame([], ["property", "value"]), label="Detected hardware",
                                   elem_id="recommend-table")
            r_go = gr.Button("Detect again", elem_id="recommend-button")
            r_go.click(recommend_handler, [], [r_text, r_table])
        app.load(recommend_handler, [], [r_text, r_table])
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, storage_path: str = "runs", address: str = "",
           block: bool = True, announce=None):
    """Start the server; `announce(url)` is told where it serves as soon as it does (the CLI prints it).
    With block=False return (app, url) and keep serving in the background."""
    app = build_app(storage_path=storage_path, address=address)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, share=False,
                           quiet=True, footer_links=[])
    if announce is not None:
        announce(url)
    if block:
        app.block_thread()  # until Ctrl-C, which closes the server
    return app, url
