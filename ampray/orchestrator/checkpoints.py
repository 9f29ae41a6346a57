"""Which checkpoint a rerun resumes from: the newest one that verifies.

Ray Train resumes from the checkpoint its snapshot (`checkpoint_manager_snapshot.json`) names last. Before
it starts, the driver verifies the checkpoints against their manifests (`ampray/actors/manifest.py`),
newest first. One that does not verify (a flipped bit, a truncated, zero-byte or deleted file, a rank's
part missing) is moved into `unverified/` in the run's folder, with the reason, and Ray's snapshot is
rewritten to end at the newest checkpoint that verifies, so that Ray itself resumes from it. A snapshot
that cannot be read is rebuilt from the checkpoints that verify. When checkpoints exist and none verifies,
the run stops with the reasons: nothing that was saved is silently trusted or silently dropped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ampray.actors.manifest import verify
from ampray.amp.config import ConfigError

SET_ASIDE = "unverified"

# Ray Train's own list of the run's checkpoints, written once every rank's upload of one is complete.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder a rerun resumes from: the one Ray Train registered last in its snapshot.
    A folder it did not register (every rank copies its files in on its own; a crash during that copy
    leaves a part) is never resumed from by Ray, so it is not compared against either; without a
    snapshot Ray starts the run over, and so None."""
    try:
        latest = json.loads((run_dir / SNAPSHOT).read_text()).get("latest_checkpoint_result") or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ConfigError(f"run {run_dir.name!r}: Ray's checkpoint list {run_dir / SNAPSHOT} cannot be read "
                          f"({err}); give this run a new --name") from None
    name = latest.get("checkpoint_dir_name")
    return run_dir / name if name else None


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder holds, from its name (checkpoint_000040); -1 for another name."""
    try:
        return int(folder.name.removeprefix("checkpoint_"))
    except ValueError:
        return -1


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _set_aside(run_dir: Path, folder: Path) -> Path:
    target_dir = run_dir / SET_ASIDE
    target_dir.mkdir(exist_ok=True)
    target, n = target_dir / folder.name, 1
    while target.exists():
        target, n = target_dir / f"{folder.name}~{n}", n + 1
    folder.rename(target)
    return target


def _rebuilt_snapshot(folders: list[Path]) -> dict[str, Any]:
    """Ray's snapshot for `folders` (oldest first, every one verified), from each one's rank-0 report."""
    import ray

    results = [{"version": 0, "checkpoint_dir_name": f.name,
                "metrics": json.loads((f / "report_rank0.json").read_text())} for f in folders]
    return {"ray_version": ray.__version__, "checkpoint_results": results,
            "checkpoint_report_indices": list(range(len(results))), "latest_checkpoint_result": results[-1],
            "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(results),
            "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": []}


def remove_partial_checkpoints(run_dir: Path, snapshot: dict[str, Any] | None = None) -> list[str]:
    """Remove the checkpoint folders that Ray never registered and that do not verify: the parts left by a
    write that failed (a full disk, a crash during the upload). Ray never resumes from them and would write
    over them; left in place they look like checkpoints. A folder that verifies is kept. `snapshot`: Ray's
    list as read already (None: read it here; without a readable one nothing is removed, since then
    registration cannot be told). Returns a note per folder removed."""
    import shutil

    if snapshot is None:
        try:
            snapshot = json.loads((run_dir / SNAPSHOT).read_text())
        except (OSError, ValueError):
            return []
    if not isinstance(snapshot, dict) or not isinstance(snapshot.get("checkpoint_results"), list):
        return []
    registered = {r.get("checkpoint_dir_name") for r in snapshot["checkpoint_results"] if isinstance(r, dict)}
    notes = []
    for folder in sorted(run_dir.glob("checkpoint_*"), key=checkpoint_step):
        if not folder.is_dir() or checkpoint_step(folder) < 0 or folder.name in registered:
            continue
        reason = verify(folder)
        if reason is None:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        notes.append(f"{folder.name} was never completed ({reason}): removed (Ray never registered it)")
    return notes


def settle_checkpoints(run_dir: Path) -> list[str]:
    """Verify the run's checkpoints, newest first; set aside those that do not verify and point Ray's
    snapshot at the newest one that does. Returns notes for the user (empty when all is well); raises
    ConfigError when checkpoints exist and none verifies."""
    snapshot_path = run_dir / SNAPSHOT
    folders = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)
    snapshot: dict[str, Any] | None = None
    unreadable = None
    if snapshot_path.exists():
        try:
            snapshot = json.loads(snapshot_path.read_text())
            if not isinstance(snapshot, dict) or not isinstance(snapshot.get("checkpoint_results"), list):
                raise ValueError("not a checkpoint list")
        except (OSError, ValueError) as err:
            snapshot, unreadable = None, err
    if snapshot is None and unreadable is None:
        return []  # Ray never registered a checkpoint: the run starts at step 0
    notes: list[str] = []
    if snapshot is not None:  # only what Ray registered counts (a folder it never registered is a partial copy)
        notes += remove_partial_checkpoints(run_dir, snapshot)
        registered = {r.get("checkpoint_dir_name") for r in snapshot["checkpoint_results"]} - {None}
        present = {f.name for f in folders}
        # A registered checkpoint whose folder is gone (deleted, a partial copy of the run folder) is one
        # that does not verify: the snapshot is pointed at the newest that does.
        missing = [run_dir / name for name in registered - present if checkpoint_step(run_dir / name) >= 0]
        folders = sorted([f for f in folders if f.name in registered] + missing, key=checkpoint_step)
    bad, good = [], None
    for folder in reversed(folders):
        reason = verify(folder) if folder.is_dir() else "its folder is missing"
        if reason is None:
            good = folder
            break
        bad.append((folder, reason))
    if good is None and (bad or unreadable is not None):
        why = "; ".join(f"{f.name}: {r}" for f, r in bad) or "no checkpoint folder"
        what = f"Ray's checkpoint list cannot be read ({unreadable}) and " if unreadable is not None else ""
        raise ConfigError(f"run {run_dir.name!r}: {what}no checkpoint verifies ({why}); nothing is resumed from "
                          "a checkpoint that does not verify: start a new run with --name NEW")
    for folder, reason in bad:
        if not folder.is_dir():
            notes.append(f"{folder.name}, which Ray registered, is missing: taken off its checkpoint list")
            continue
        where = _set_aside(run_dir, folder)
        notes.append(f"{folder.name} does not verify ({reason}): set aside in {where.relative_to(run_dir)}")
    if snapshot is None:
        kept = [f for f in folders if checkpoint_step(f) < checkpoint_step(good) and verify(f) is None] + [good]
        _write_json(snapshot_path, _rebuilt_snapshot(kept))
        notes.append(f"Ray's checkpoint list could not be read ({unreadable}): rebuilt from the {len(kept)} "
                     "checkpoint(s) that verify")
    elif bad:
        gone = {f.name for f, _ in bad}
        pairs = [(r, i) for r, i in zip(snapshot["checkpoint_results"], snapshot.get("checkpoint_report_indices", []))
                 if r.get("checkpoint_dir_name") not in gone]
        snapshot["checkpoint_results"] = [r for r, _ in pairs]
        snapshot["checkpoint_report_indices"] = [i for _, i in pairs]
        snapshot["latest_checkpoint_result"] = next(r for r, _ in pairs if r.get("checkpoint_dir_name") == good.name)
        snapshot["pending_training_results"] = [r for r in snapshot.get("pending_training_results", [])
                                                if r.get("checkpoint_dir_name") not in gone]
        _write_json(snapshot_path, snapshot)
    if bad or snapshot is None:
        notes.append(f"falling back to {good.name}, the newest checkpoint that verifies")
    return notes
