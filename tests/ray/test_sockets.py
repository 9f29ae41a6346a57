"""An embedded `ampray train` listens on loopback only: every TCP socket that the run's processes (the
driver, the Ray processes it starts, the Train controller and workers with their rendezvous store and
gloo pairs) listen on while two CPU workers train is bound to 127.0.0.1 or ::1."""

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
import psutil

pytestmark = pytest.mark.ray

DEADLINE_S = 150


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _session_dirs(procs: list[psutil.Process]) -> set[str]:
    """The Ray session folders named on the tree's command lines (raylet, GCS, workers)."""
    found = set()
    for proc in procs:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        for arg in cmdline:
            for flag in ("--session-dir=", "--session_dir=", "--session-name="):
                if arg.startswith(flag) and "session_" in arg:
                    found.add(arg[len(flag):].rstrip("/").rpartition("/")[2])
    return found


def _run_processes(root: psutil.Process) -> list[psutil.Process]:
    """The driver, its descendants, and any process naming the driver's Ray session (one that left the
    tree, such as a reparented worker)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    sessions = _session_dirs(procs)
    if sessions:
        known = {p.pid for p in procs}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if proc.pid not in known and any(s in cmdline for s in sessions):
                procs.append(proc)
    return procs


def _listening(procs: list[psutil.Process]) -> dict[tuple[str, int], str]:
    """(ip, port) -> 'pid name' of every listening TCP socket of `procs`."""
    out = {}
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
            name = proc.name()
        except psutil.Error:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                out[(conn.laddr.ip, conn.laddr.port)] = f"{proc.pid} {name}"
    return out


def _rank_pids(run_dir: Path) -> set[int]:
    pids = set()
    for rank in (0, 1):
        try:
            pids.add(json.loads((run_dir / "progress" / f"rank{rank}.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    return pids


def test_embedded_train_listens_on_loopback_only(tmp_path):
    run_dir = tmp_path / "sockets"
    cmd = [sys.executable, "-m", "ampray.orchestrator.cli", "train", "--name", "sockets",
           "--run.storage_path", str(tmp_path), "--run.steps", "300", "--run.report_every", "20",
           "--run.checkpoint_every", "100", "--scaling.num_workers", "2", "--model.options.hidden", "32",
           "--model.options.in_features", "16", "--data.num_samples", "512", "--data.batch_size", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[tuple[str, int], str] = {}
    ranks: set[int] = set()
    end = time.time() + DEADLINE_S
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None and time.time() < end:
            procs = _run_processes(root)
            seen.update(_listening(procs))
            ranks |= _rank_pids(run_dir) & {p.pid for p in procs}
            time.sleep(0.2)
        out, err = proc.communicate(timeout=max(1.0, end - time.time()))
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "sockets: step 300/300" in out
    # The check saw the run itself: both training workers, and the sockets they and Ray listen on.
    assert len(ranks) == 2, ranks
    workers = [where for where in seen.values() if int(where.split()[0]) in ranks]
    assert workers, f"no listening socket of the training workers {ranks} was seen: {seen}"
    broad = {f"{ip}:{port}": where for (ip, port), where in seen.items() if not _loopback(ip)}
    assert not broad, f"listening beyond loopback: {broad} (all: {sorted(seen)})"
