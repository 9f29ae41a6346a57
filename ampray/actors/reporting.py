"""Reports leave a worker from a background thread (`Reporter`), with the checkpoint copies they carry."""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_progress(run_dir: Path, rank: int, step: int) -> None:
    """Where a rank is, and its pid: read by people and by the fault tests."""
    import json

    folder = run_dir / "progress"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "step": step}))
    os.replace(tmp, folder / f"rank{rank}.json")


# Local copies of checkpoints waiting for upload: <tmp>/ampray-ckpt-<pid>-*. A worker killed meanwhile
# leaves its copy behind; the next worker on the node removes those of processes that no longer exist.
CHECKPOINT_TMP_PREFIX = "ampray-ckpt-"


def remove_stale_checkpoint_copies(tmp: str | None = None) -> list[Path]:
    import shutil

    removed = []
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{CHECKPOINT_TMP_PREFIX}*-*"):
        try:
            pid = int(path.name.removeprefix(CHECKPOINT_TMP_PREFIX).split("-", 1)[0])
            os.kill(pid, 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except PermissionError:
            continue  # alive, someone else's
    return removed


class Reporter:
    """Calls `ray.train.report` from a background thread, in order, so that training never waits for it.

    Ray Train V2 hands each report to the controller through a queue of size one that the controller
    polls (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and synchronises a checkpoint name across ranks:
    done inline, a report every few steps can stall a fast GPU loop for most of a poll interval. Every
    rank submits the same reports in the same order, so the cross-rank barrier inside stays aligned.
    """

    def __init__(self, run_dir: Path, rank: int, report: Callable[..., None] | None = None) -> None:
        self.run_dir, self.rank = run_dir, rank
        self._report = report or _ray_report
        self._queue: queue.Queue = queue.Queue()
        # One checkpoint in flight at most: each holds a full copy of the state on local disk until Ray has
        # uploaded it, so a storage slower than checkpoint_every makes training wait instead of filling it.
        self._checkpoint_slot = threading.BoundedSemaphore(1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ampray-reporter", daemon=True)
        self._thread.start()

    def submit(self, metrics: dict[str, Any], folder: tempfile.TemporaryDirectory | None, name: str) -> None:
        """Queue one report (and the checkpoint folder that goes with it, which the thread deletes once Ray
        has it). Raises the thread's error, if it stopped on one; the folder is deleted then too."""
        try:
            self._raise_if_stopped()
            if folder is not None:
                while not self._checkpoint_slot.acquire(timeout=1.0):
                    self._raise_if_stopped()
        except BaseException:
            if folder is not None:
                folder.cleanup()
            raise
        self._queue.put((metrics, folder, name))

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("the report thread has stopped")

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                metrics, folder, name = item
                try:
                    self._report(metrics, folder.name if folder is not None else None, name)
                    # Progress means "handed to Ray": a checkpoint named here is one a restart can use.
                    write_progress(self.run_dir, self.rank, metrics["step"])
                finally:
                    if folder is not None:
                        try:
                            folder.cleanup()
                        finally:
                            self._checkpoint_slot.release()
        except BaseException as err:  # surfaced by the training thread at its next submit or close
            self._error = err
            while True:  # what is still queued will not be reported: delete its checkpoint copies
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[1] is not None:
                    item[1].cleanup()

    def close(self) -> None:
        """Wait until every report has been handed over (the run must not end before)."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _ray_report(metrics: dict[str, Any], folder: str | None, name: str) -> None:
    import ray.train

    if folder is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)


def optimizer_records(scheduler, step) -> dict[str, float]:
    """The optimizer's side of a report: `optim/lr`, the learning rate the next step uses (first param
    group), and `optim/grad_norm`, the global norm of the last step's unscaled gradients where the engine
    measures it (loss scaling or precision.max_grad_norm on; inf for a step that overflowed). Reading the
    norm is one sync, once per report."""
    out = {"optim/lr": float(scheduler.get_last_lr()[0])}
    norm = getattr(step, "grad_norm", None)
    if norm is not None:
        out["optim/grad_norm"] = float(norm)
    return out
