"""Per-rank reports -> TensorBoard, per rank and across ranks (a Ray Train `UserCallback`).

Each worker reports a flat dict (`step`, `rank`, `world_size`, `final`, `loss`, `scaler/*`, `perf/*`,
`memory/*`, `optim/lr` and, where the engine measures it, `optim/grad_norm`; the last report also carries
`hparams`). The callback runs on the Train controller and writes
into one run directory:

- `rank{r}/<key>`: every numeric key of rank r's report, at that rank's `step`.
- `all/<key>/min`, `all/<key>/max`, `all/<key>/mean`: for each numeric key that every rank reports.
- `all/scaler/scale_disagreement`: 1.0 when the ranks report different `scaler/scale`, else 0.0.
- `all/scaler/scale_disagreements`: cumulative count of reports with disagreeing scales.
- `all/perf/skipped_steps/total`, `all/perf/samples_per_s/total`: sums over ranks.
- `all/memory/peak_allocated_bytes/max`: the largest peak allocation of any rank.
- `all/val/loss/mean`, `all/val/accuracy/mean`, `all/val/samples/total`: held-out loss and accuracy over
  every rank's held-out samples (ranks weighted by their `val/samples`), at each evaluation.
- `summary` (text): a markdown table of each rank's final numbers, written with the final report.
- HParams: rank 0's resolved config against `all/loss/mean`, `all/val/loss/mean`, `all/val/accuracy/mean`
  (with a held-out set), `all/perf/skipped_steps/total` and `all/perf/samples_per_s/total`.

Bookkeeping keys (`step`, `rank`, `world_size`, `final`), booleans and non-numeric values are not scalars.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from typing import Any

import ray.train

logger = logging.getLogger(__name__)

_META_KEYS = frozenset({"step", "rank", "world_size", "final"})
_DISAGREEMENTS_TAG = "all/scaler/scale_disagreements"
_HPARAM_METRICS = ("all/loss/mean", "all/val/loss/mean", "all/val/accuracy/mean", "all/perf/skipped_steps/total",
                   "all/perf/samples_per_s/total")


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    # bool is an int subclass, and `final` is a flag rather than a measurement.
    return {
        k: float(v)
        for k, v in report.items()
        if k not in _META_KEYS and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def _min_max_mean(values: list[float]) -> tuple[float, float, float]:
    # Python's min/max with NaN depend on argument order; a NaN on any rank must show up in every stat.
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan, math.nan
    return min(values), max(values), sum(values) / len(values)


def aggregate(metrics: list[dict[str, Any]]) -> dict[str, float]:
    """Cross-rank aggregates of one round of reports (metrics[i] from world rank i); tags as above."""
    per_rank = [_scalars(m) for m in metrics]
    if not per_rank:
        return {}
    out: dict[str, float] = {}
    common = set(per_rank[0]).intersection(*per_rank[1:])
    for key in sorted(common):
        lo, hi, mean = _min_max_mean([r[key] for r in per_rank])
        out[f"{key}/min"], out[f"{key}/max"], out[f"{key}/mean"] = lo, hi, mean
    # The explicit tags use whichever ranks report the key, so a partial report still yields them.
    scales = [r["scaler/scale"] for r in per_rank if "scaler/scale" in r]
    out["scaler/scale_disagreement"] = 1.0 if len(set(scales)) > 1 else 0.0
    for key in ("perf/skipped_steps", "perf/samples_per_s"):
        values = [r[key] for r in per_rank if key in r]
        if values:
            out[f"{key}/total"] = sum(values)
    peaks = [r["memory/peak_allocated_bytes"] for r in per_rank if "memory/peak_allocated_bytes" in r]
    if peaks:
        out["memory/peak_allocated_bytes/max"] = max(peaks)
    out.update(_held_out(per_rank))
    return out


def _held_out(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Held-out loss and accuracy over all ranks' samples: ranks weighted by how many they evaluated (their
    shards differ by a row where the rows do not divide evenly), so `val/loss/mean` is the loss of the
    whole held-out set, and a rank with no rows does not count."""
    out: dict[str, float] = {}
    samples = [r.get("val/samples", 0.0) for r in per_rank]
    if not sum(samples):
        return out
    for key in ("val/loss", "val/accuracy"):
        pairs = [(r[key], n) for r, n in zip(per_rank, samples) if key in r and n > 0]
        if pairs:
            out[f"{key}/mean"] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    out["val/samples/total"] = sum(samples)
    return out


def _load(logdir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    # Purging would hide exactly the step regressions that callers of these readers look for.
    acc = ea.EventAccumulator(
        logdir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0}, purge_orphaned_data=False
    )
    acc.Reload()
    return acc


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under `logdir` (not its subdirectories) as (step, value), in order of writing."""
    if not os.path.isdir(logdir):
        return {}
    acc = _load(logdir)
    out = {}
    for tag in acc.Tags()["scalars"]:
        # Files load in name order, which is not writing order across writers; wall time is.
        events = sorted(acc.Scalars(tag), key=lambda e: e.wall_time)
        out[tag] = [(e.step, e.value) for e in events]
    return out


def read_text(logdir: str, tag: str) -> list[str]:
    """The texts written under `tag` with `SummaryWriter.add_text`, in order of writing."""
    acc = _load(logdir)
    for name in (tag, f"{tag}/text_summary"):
        if name in acc.Tags()["tensors"]:
            events = sorted(acc.Tensors(name), key=lambda e: e.wall_time)
            return [b"".join(e.tensor_proto.string_val).decode() for e in events]
    return []


def read_hparams(logdir: str) -> dict[str, Any]:
    """The hyperparameters of the last HParams session start written into `logdir` itself."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = _load(logdir).PluginTagToContent(metadata.PLUGIN_NAME)
    raw = content.get(metadata.SESSION_START_INFO_TAG)
    if raw is None:
        return {}
    info = plugin_data_pb2.HParamsPluginData.FromString(raw).session_start_info
    return {name: getattr(v, v.WhichOneof("kind")) for name, v in info.hparams.items()}


def _last_steps(logdir: str) -> tuple[dict[str, int], float]:
    """Largest step already written per tag prefix (`all`, `rank0`, ...) and the last disagreement count."""
    scalars = read_scalars(logdir)
    last: dict[str, int] = {}
    for tag, points in scalars.items():
        prefix = tag.split("/", 1)[0]
        last[prefix] = max([last.get(prefix, -1)] + [step for step, _ in points])
    # Resume the counter so that it stays cumulative across drivers of the same run.
    counts = scalars.get(_DISAGREEMENTS_TAG)
    return last, counts[-1][1] if counts else 0.0


def placement_label(record: dict[str, Any]) -> str:
    """"node:gpu" of one rank's record (the worker's `placement/...` strings); "?" for what is missing."""
    return f"{record.get('placement/node', '?')}:{record.get('placement/gpu', '?')}"


def _summary_table(metrics: list[dict[str, Any]]) -> str:
    mib = 1 << 20
    val = any("val/loss" in m for m in metrics)
    acc = any("val/accuracy" in m for m in metrics)
    rows = ["| rank | final loss |" + (" val loss |" if val else "") + (" val accuracy |" if acc else "")
            + " scale | skipped steps | peak allocated (MiB) | peak RSS (MiB) | samples/s | node:gpu |"]
    rows.append("|" + " ---: |" * (8 + val + acc))
    for rank, m in enumerate(metrics):
        held_out = (f" {m.get('val/loss', math.nan):.4g} |" if val else "") + (
            f" {m.get('val/accuracy', math.nan):.4f} |" if acc else "")
        rows.append(
            f"| {rank} | {m.get('loss', math.nan):.4g} |{held_out} {m.get('scaler/scale', math.nan):g} "
            f"| {m.get('perf/skipped_steps', 0)} | {m.get('memory/peak_allocated_bytes', 0) / mib:.1f} "
            f"| {m.get('memory/peak_rss_bytes', 0) / mib:.1f} | {m.get('perf/samples_per_s', math.nan):.1f} "
            f"| {placement_label(m)} |"
        )
    return "\n".join(rows)


def _plain(value: Any) -> Any:
    # The HParams protos take numbers, strings and bools only; anything else is shown as its repr.
    return value if isinstance(value, (bool, int, float, str)) else repr(value)


class TensorBoardAggregator(ray.train.UserCallback):
    """Writes every rank's reports and their cross-rank aggregates into one TensorBoard run directory.

    Steps never go backwards within a tag group: a report at or below the largest step already written
    (by this instance, or by an earlier driver of the same run found in `logdir`) is skipped.
    `last_aggregate` lives on the Train controller, which runs this callback.
    """

    def __init__(self, logdir: str, flush_every: int = 1):
        if flush_every < 1:
            raise ValueError(f"flush_every={flush_every!r}: must be an int >= 1")
        self.logdir = logdir
        self.flush_every = flush_every
        self.last_aggregate: dict[str, float] = {}
        self._writer = None
        self._last_step: dict[str, int] | None = None
        self._disagreements = 0.0
        self._reports = 0

    def __getstate__(self) -> dict[str, Any]:
        # The writer holds a thread and an open file; the copy that unpickles opens its own.
        state = self.__dict__.copy()
        state["_writer"] = None
        return state

    def _ensure_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # Scan before opening: a rerun must know what an earlier driver already wrote.
            if self._last_step is None:
                self._last_step, self._disagreements = _last_steps(self.logdir)
            self._writer = SummaryWriter(log_dir=self.logdir)
        return self._writer

    def _accept(self, prefix: str, step: int) -> bool:
        if step <= self._last_step.get(prefix, -1):
            return False
        self._last_step[prefix] = step
        return True

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint=None) -> None:
        steps = [m.get("step") for m in metrics]
        if not metrics or any(not isinstance(s, numbers.Integral) for s in steps):
            logger.warning("report without an integer 'step' on every rank (%s); not logged", steps)
            return
        writer = self._ensure_writer()
        step = max(steps)
        if all(m.get("reevaluated") for m in metrics):
            self._write_reevaluation(writer, step, metrics)
            return
        for index, report in enumerate(metrics):
            rank = report.get("rank", index)  # the rank the worker says it is (Ray lists them in rank order)
            if self._accept(f"rank{rank}", report["step"]):
                for key, value in _scalars(report).items():
                    writer.add_scalar(f"rank{rank}/{key}", value, report["step"])
        if not self._accept("all", step):
            logger.info("step %d already in %s; skipping its aggregates", step, self.logdir)
            return
        self.last_aggregate = aggregate(metrics)
        self._write_aggregate(writer, step, metrics)
        self._write_progress(step)
        self._reports += 1
        if any(m.get("final") for m in metrics):
            self._write_final(writer, step, metrics)
        elif self._reports % self.flush_every == 0:
            writer.flush()

    def _write_aggregate(self, writer, step: int, metrics: list[dict[str, Any]]) -> None:
        for tag, value in self.last_aggregate.items():
            writer.add_scalar(f"all/{tag}", value, step)
        if self.last_aggregate.get("scaler/scale_disagreement"):
            self._disagreements += 1
            scales = {rank: m.get("scaler/scale") for rank, m in enumerate(metrics)}
            logger.warning("loss scales disagree across ranks at step %d: %s", step, scales)
        writer.add_scalar(_DISAGREEMENTS_TAG, self._disagreements, step)

    def _write_progress(self, step: int) -> None:
        """`<run>/progress/all.json`: the step every rank has reported, on the driver's node (the Train
        controller runs there), where the driver's progress bar reads it; rank 0's own progress file is
        on whichever node rank 0 runs."""
        folder = os.path.join(os.path.dirname(os.path.abspath(self.logdir)), "progress")
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, ".all.json.tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step, "scale_disagreements": self._disagreements}, f)
            os.replace(tmp, os.path.join(folder, "all.json"))
        except OSError as err:  # progress is a convenience; the events are what counts
            logger.warning("cannot write progress into %s: %s", folder, err)

    def _write_reevaluation(self, writer, step: int, metrics: list[dict[str, Any]]) -> None:
        """A finished run rerun with a held-out set: its final model's new held-out figures, at the final step
        again (the readers take a tag's latest point), and the summary with them."""
        for index, report in enumerate(metrics):
            rank = report.get("rank", index)
            for key, value in _scalars(report).items():
                if key.startswith("val/"):
                    writer.add_scalar(f"rank{rank}/{key}", value, step)
        self.last_aggregate = aggregate(metrics)
        for tag, value in self.last_aggregate.items():
            if tag.startswith("val/"):
                writer.add_scalar(f"all/{tag}", value, step)
        writer.add_text("summary", _summary_table(metrics), step)
        writer.flush()

    def _write_final(self, writer, step: int, metrics: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer.add_text("summary", _summary_table(metrics), step)
        config = next((m["hparams"] for m in metrics if isinstance(m.get("hparams"), dict)), None)
        if config is not None:
            results = {tag: self.last_aggregate[tag[len("all/"):]] for tag in _HPARAM_METRICS
                       if tag[len("all/"):] in self.last_aggregate}
            # add_hparams would open a timestamped sub-run; writing the three summaries through our own
            # file writer keeps the HParams beside the scalars they refer to (the all/ tags above).
            for summary in hparams({k: _plain(v) for k, v in config.items()}, results):
                writer.file_writer.add_summary(summary, step)
        writer.flush()

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        failures = ", ".join(f"rank {r}: {type(e).__name__}" for r, e in sorted(worker_exceptions.items()))
        logger.warning("Train workers failed (%s); flushing TensorBoard at %s", failures, self.logdir)
        if self._writer is not None:
            self._writer.flush()
