"""Self-healing: `run.on_divergence = "rollback"` turns a divergence of the engine into a rollback.

A divergence is a ScaleCollapseError, TrainingStalledError or NonFiniteLossError raised by the engine in
the worker's loop. Every rank raises it at the same optimizer step (the engine decides on inputs that
are the same on every rank: `ampray/amp/consensus.py`), so every rank rolls back together:

1. each rank hands over its queued reports (their checkpoints are then in the run's folder), and the ranks
   meet (one small all-reduce): every checkpoint reported so far is complete on storage;
2. each rank finds the newest checkpoint of the run that verifies against its manifests, at a step no
   later than the failure, and the ranks agree on the oldest of their answers; without one, the state
   the session started from (kept in memory when the run had no checkpoint to start from);
3. the model, optimizer, schedule, engine and RNG are restored from it; the data is not: it goes on from
   where the failure left it, so the batches between the checkpoint and the failure are skipped;
4. the engine eases the precision (`MixedPrecisionTrainer.ease_after_rollback`: fp16 -> bf16 where the
   device has it, else gentler loss scaling) and the rollback is recorded as an engine event (kind
   "rollback"), which later checkpoints keep and every report counts (`events/rollback`).

After `run.max_rollbacks` rollbacks the next divergence raises RollbackLimitError.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ampray.actors.checkpoint import newest_verified, restore, restore_folder, snapshot
from ampray.amp.policies import NonFiniteLossError, ScaleCollapseError, TrainingStalledError

DIVERGENCE = (ScaleCollapseError, TrainingStalledError, NonFiniteLossError)
"""The engine's errors that `on_divergence` answers."""
EVENT_KINDS = ("rollback", "stall", "scale_collapse")
"""The engine event kinds every report counts (`events/<kind>`)."""

ROLLBACK_LOG = "rollbacks.jsonl"
"""In `<run>/progress/`: one JSON line per rollback, written by rank 0."""

log = logging.getLogger(__name__)


class RollbackLimitError(FloatingPointError):
    """The run diverged again after `run.max_rollbacks` rollbacks."""


def event_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    """`events/<kind>`: how many engine events of each kind the run has recorded (report keys)."""
    return {f"events/{kind}": sum(1 for e in events if e.get("kind") == kind) for kind in EVENT_KINDS}


def rollback_notes(run_dir: Path) -> list[str]:
    """One line per rollback the run made (rank 0's log in the run's folder): the driver's notes."""
    try:
        lines = (Path(run_dir) / "progress" / ROLLBACK_LOG).read_text().splitlines()
    except FileNotFoundError:
        return []
    notes = []
    for line in lines:
        try:
            notes.append(describe(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash: the others still tell
    return notes


def describe(event: dict[str, Any]) -> str:
    return (f"rolled back at optimizer step {event['failed_at']} to {event['to']} (step {event['to_step']}) "
            f"after {event['error']}; remedy: {event['remedy']}; {event['skipped_steps']} step(s) of data "
            f"skipped")


class Rollback:
    """One worker session's rollbacks: its initial state (when needed) and the count so far."""

    def __init__(self, w, step: int, restored: bool) -> None:
        run = w.job.run
        self.enabled, self.limit = run.on_divergence == "rollback", run.max_rollbacks
        # With no checkpoint of its own to return to, the state this session starts from (in memory).
        self.initial = None
        if self.enabled and not restored:
            self.initial = snapshot(model=w.model, optimizer=w.optimizer, scheduler=w.scheduler, engine=w.engine,
                                    step=step)
        # Rollbacks of earlier sessions travel in the engine's events (kept by every later checkpoint).
        self.events = [e for e in w.engine.events if e.get("kind") == "rollback"]

    def recover(self, w, err: BaseException, step: int, reporter) -> int:
        """Roll every rank back after `err` (a DIVERGENCE) in the optimizer step after `step`; returns the
        step to continue from. Raises `err` itself with on_divergence="stop", RollbackLimitError after
        max_rollbacks. `reporter` is closed (every report handed over); the caller opens a new one."""
        if not self.enabled:
            raise err
        if len(self.events) >= self.limit:
            raise RollbackLimitError(
                f"the run diverged again after {len(self.events)} rollback(s) (run.max_rollbacks={self.limit}): "
                f"{type(err).__name__}: {err}") from err
        reporter.close()
        consensus = _consensus(w.model)
        consensus.max([0])  # every rank's reports, and the checkpoints they carry, are in storage now
        folder = newest_verified(w.run_dir, step)
        found = -1 if folder is None else int(folder.name.removeprefix("checkpoint_"))
        agreed = -consensus.max([-found])[0]  # the oldest answer: one every rank has seen verify
        if agreed >= 0:
            folder = w.run_dir / f"checkpoint_{agreed:06d}"
            to_step, _ = restore_folder(folder, w.rank, model=w.model, optimizer=w.optimizer,
                                        scheduler=w.scheduler, engine=w.engine, world=w.world)
            where = folder.name
        elif self.initial is not None:
            to_step = restore(self.initial, model=w.model, optimizer=w.optimizer, scheduler=w.scheduler,
                              engine=w.engine)
            where = "the session's initial state"
        else:
            raise RollbackLimitError(f"no verified checkpoint of {w.run_dir} to roll back to after "
                                     f"{type(err).__name__}: {err}") from err
        remedy = w.engine.ease_after_rollback()
        event = {"kind": "rollback", "optimizer_step": to_step, "failed_at": step + 1, "to": where,
                 "to_step": to_step, "error": f"{type(err).__name__}: {_first_line(err)}", "remedy": remedy,
                 "skipped_steps": step + 1 - to_step}
        self.events.append(event)
        loaded = w.engine.events
        w.engine.events = loaded + [e for e in self.events if e not in loaded]
        if w.rank == 0:
            _append_log(w.run_dir, event)
            log.warning("ampray: %s", describe(event))
        return to_step


def _consensus(model):
    from ampray.amp.consensus import Consensus

    return Consensus.resolve(model, "auto")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def _append_log(run_dir: Path, event: dict[str, Any]) -> None:
    folder = run_dir / "progress"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ROLLBACK_LOG, "a") as f:
        f.write(json.dumps(event) + "\n")
