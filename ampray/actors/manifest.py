"""Checkpoint manifests: a checkpoint without a complete, matching manifest does not exist.

Every rank hashes the files it puts into a checkpoint while writing them (no second read) and writes
`manifest_rank<r>.json` last: file name, size and SHA-256 of each, and (rank 0) the number of ranks. A
checkpoint verifies when every rank's manifest is there and every file it lists has that size and hash.
`torch.load` does not check the zip's CRC, so without this a bit-flipped `state.pt` would load and train
on garbage; a truncated or zero-byte file, a file deleted, a rank's upload cut short all fail here too,
with the reason, so that a resume can fall back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch

MANIFEST = "manifest_rank{rank}.json"
FORMAT = 1
_CHUNK = 8 << 20


class _HashingWriter:
    """A binary file that hashes what is written to it (torch.save writes through it). A large chunk is
    hashed on a second thread while this one writes it (both release the GIL), and both are done before
    `write` returns: the caller may free the buffer then (torch's temporary copy of a CUDA tensor)."""

    _BIG = 1 << 20

    def __init__(self, f, pool):
        self.f, self.sha, self.size, self.pool = f, hashlib.sha256(), 0, pool

    def write(self, data) -> int:
        view = memoryview(data)
        self.size += view.nbytes
        if view.nbytes < self._BIG:
            self.sha.update(view)
            return self.f.write(view)
        hashing = self.pool.submit(self.sha.update, view)
        try:
            return self.f.write(view)
        finally:
            hashing.result()

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def flush(self) -> None:
        self.f.flush()


class Files:
    """The files one rank writes into a checkpoint folder, each hashed as it is written (atomically:
    a temporary file renamed into place)."""

    def __init__(self, folder: str | os.PathLike, rank: int):
        self.folder, self.rank = Path(folder), rank
        self.entries: dict[str, dict[str, Any]] = {}
        self.folder.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, write) -> Path:
        path = self.folder / name
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="ampray-hash") as pool:
                w = _HashingWriter(f, pool)
                write(w)
                digest = w.hexdigest()
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.entries[name] = {"size": w.size, "sha256": digest}
        return path

    def save(self, name: str, obj: Any) -> Path:
        """torch.save(obj) to folder/name."""
        return self._write(name, lambda w: torch.save(obj, w))

    def text(self, name: str, text: str) -> Path:
        return self._write(name, lambda w: w.write(text.encode()))

    def seal(self, world: int | None = None) -> Path:
        """Write this rank's manifest, last: until it is there, the rank's part of the checkpoint is not."""
        manifest = {"format": FORMAT, "rank": self.rank, "files": self.entries}
        if world is not None:
            manifest["world"] = int(world)
        path = self.folder / MANIFEST.format(rank=self.rank)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _manifest(folder: Path, rank: int) -> dict[str, Any]:
    path = folder / MANIFEST.format(rank=rank)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing (rank {rank}'s part was never completed)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path.name} cannot be read ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path.name} is not an ampray manifest of format {FORMAT}")
    return manifest


def saved_world(folder: str | os.PathLike) -> int | None:
    """The number of ranks that wrote the checkpoint in `folder` (rank 0's manifest), None if unreadable."""
    try:
        world = _manifest(Path(folder), 0).get("world")
    except ValueError:
        return None
    return world if isinstance(world, int) else None


def verify(folder: str | os.PathLike, ranks: Iterable[int] | None = None) -> str | None:
    """None when the checkpoint in `folder` is complete and every file matches its manifest; else the
    reason it does not verify, naming the file. `ranks`: hash only the files of these ranks (every file's
    presence and size are still checked): what one rank reads of a sharded checkpoint."""
    folder = Path(folder)
    try:
        first = _manifest(folder, 0)
        world = first.get("world")
        if not isinstance(world, int) or world < 1:
            return f"{MANIFEST.format(rank=0)} names no number of ranks"
        manifests = [first] + [_manifest(folder, r) for r in range(1, world)]
    except ValueError as err:
        return str(err)
    hashed = set(range(len(manifests)) if ranks is None else ranks)
    for r, manifest in enumerate(manifests):
        for name, entry in sorted(manifest["files"].items()):
            path = folder / name
            try:
                size = path.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != entry.get("size"):
                return f"{name} has {size} bytes, its manifest says {entry.get('size')}"
            if r not in hashed:
                continue
            try:
                digest = _sha256(path)
            except OSError as err:
                return f"{name} cannot be read ({err})"
            if digest != entry.get("sha256"):
                return f"{name} does not match its SHA-256 (the file changed after it was written)"
    return None
