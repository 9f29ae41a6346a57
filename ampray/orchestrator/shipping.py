"""Ship the user's own code (`model.factory = "mynets:build"`) to the Ray workers.

The driver imports the user's modules from its working folder (or PYTHONPATH); a Ray worker on another
node has neither, so the runtime_env carries them as `py_modules` entries: the top-level package folder
(or single `.py` file) of each import path, zipped and uploaded by Ray. What every node has anyway (the
standard library, what is installed in this interpreter's site-packages, ampray itself) is not shipped.

How Ray packs a `py_modules` folder (ray._private.runtime_env.packaging and py_modules): it walks the
folder and skips what the runtime_env's `excludes` patterns match and what `.gitignore` / `.rayignore`
files *inside* the folder match (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1; a .gitignore above the folder
is not read). Ray's default excludes (`.git`, `.venv`, `venv`, `__pycache__`) apply to a `working_dir`
only, so `worker_runtime_env` names them in `excludes` itself. The zip is stored uncompressed; Ray refuses
one of GCS_STORAGE_MAX_SIZE bytes or more.

Ray accepts local paths only in a job's runtime_env (`ray.init(runtime_env=...)`, which uploads them); a
task's or actor's runtime_env (Train's `worker_runtime_env`) takes URIs only, so `probe_imports` uploads
local entries first and rewrites the runtime_env in place to their `gcs://` URIs.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import logging
import os
import site
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ampray.amp.config import ConfigError
from ampray.models.registry import ImportPathError, import_object, split_import_path

_WALK_LOG = logging.getLogger(__name__ + ".walk")  # Ray's walk logs each ignore file it honours, at INFO
_WALK_LOG.setLevel(logging.WARNING)

_INSTALL_HINT = ("install it as a package on every node instead (pip install, or a runtime_env with pip / a "
                 "py_modules URI)")


def _normalise(fields: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """{field: import path}, empty paths dropped; a plain list of paths is keyed by the paths themselves."""
    items = fields.items() if isinstance(fields, Mapping) else ((str(p), p) for p in fields)
    return {str(field): str(path) for field, path in items if path}


def _installed_roots() -> list[Path]:
    """Folders whose modules every node has: this interpreter's standard library and site-packages (not
    sys.prefix as a whole: with a system Python that is /usr, and a project may live in /usr/src)."""
    roots: set[str] = set()
    for scheme_vars in (None, {"base": sys.prefix, "platbase": sys.prefix},
                        {"base": sys.base_prefix, "platbase": sys.base_prefix,
                         "installed_base": sys.base_prefix, "installed_platbase": sys.base_prefix}):
        paths = sysconfig.get_paths(vars=scheme_vars) if scheme_vars else sysconfig.get_paths()
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths)
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # an old virtualenv's site module
        pass
    try:
        roots.add(site.getusersitepackages())
    except AttributeError:
        pass
    roots.update(p for p in sys.path if Path(p).name in ("site-packages", "dist-packages"))
    return [Path(r).resolve() for r in roots if r]


def _is_installed(location: Path, roots: Sequence[Path]) -> bool:
    return any(part in ("site-packages", "dist-packages") for part in location.parts) or \
        any(location.is_relative_to(root) for root in roots)


def _location(name: str, module: Any, field: str, path: str) -> Path | None:
    """Where the top-level module `name` lives, or None when every node has it."""
    if name == "ampray" or name in sys.builtin_module_names:
        return None
    if name == "__main__":
        raise ConfigError(f"{field}={path!r}: the driver's __main__ cannot be shipped to the Ray workers; "
                          "move the function into a module (a .py file beside the job) and name that")
    roots = _installed_roots()
    search = getattr(module, "__path__", None)
    if search is not None:  # a package (regular or namespace)
        folders = list(search)
        if len(folders) != 1:
            raise ConfigError(f"{field}={path!r}: {name!r} is a namespace package spread over {len(folders)} "
                              f"folders ({', '.join(map(str, folders))}), which Ray's py_modules cannot ship; "
                              f"{_INSTALL_HINT}")
        location = Path(folders[0]).resolve()
    else:
        file = getattr(module, "__file__", None)
        if not file:  # built into the interpreter or frozen: every node has it
            return None
        location = Path(file).resolve()
        if _is_installed(location, roots):
            return None
        if location.suffix != ".py":
            kind = ("a compiled extension" if any(location.name.endswith(s) for s in
                                                  importlib.machinery.EXTENSION_SUFFIXES)
                    else f"a {location.suffix or 'suffix-less'} file")
            raise ConfigError(f"{field}={path!r}: {name!r} is {kind} ({location}) outside site-packages, which "
                              f"Ray's py_modules cannot ship (it takes .py files and folders); {_INSTALL_HINT}")
        return location
    return None if _is_installed(location, roots) else location


def _modules_by_location(fields: Mapping[str, str] | Iterable[str]) -> dict[Path, list[str]]:
    """{location of a top-level module to ship: [the fields whose paths need it]}, in the fields' order."""
    found: dict[Path, list[str]] = {}
    for field, path in _normalise(fields).items():
        try:
            import_object(path, field)  # imports the module as the driver's job would (working folder first)
        except ImportPathError as err:
            raise ConfigError(str(err)) from None
        module_name, _ = split_import_path(path, field)
        top = module_name.partition(".")[0]
        location = _location(top, sys.modules.get(top) or importlib.import_module(top), field, path)
        if location is not None:
            found.setdefault(location, []).append(f"{field}={path!r}")
    return found


def modules_to_ship(fields: Mapping[str, str] | Iterable[str]) -> list[Path]:
    """The top-level package folders and single-file modules the workers need for these import paths
    ({field: "pkg.module:function"}, or a list of paths), deduplicated; nothing for the standard library,
    site-packages and ampray. Imports them on the driver; raises ConfigError naming the field for what
    cannot be imported or cannot be shipped (a namespace package over several folders, a compiled
    extension outside site-packages)."""
    return list(_modules_by_location(fields))


def ship_excludes() -> list[str]:
    """The `excludes` patterns of a shipped package: Ray's default excludes of a working_dir
    (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES overrides them), which Ray does not apply to py_modules."""
    from ray._private import ray_constants

    return list(ray_constants.get_runtime_env_default_excludes())


def _include_gitignore() -> bool:
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE

    return os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def package_size(location: Path | str, excludes: Sequence[str] | None = None) -> tuple[int, list[tuple[int, str]]]:
    """(bytes of the zip Ray would upload for this py_modules entry, [(bytes, path) of its largest files]).
    Ray's own walk decides what goes in (its excludes, .gitignore / .rayignore inside the folder); the
    size is that of Ray's uncompressed zip: each file's bytes plus its local and central headers."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = ship_excludes() if excludes is None else list(excludes)
    root = Path(location).absolute()
    if not root.exists():
        raise ConfigError(f"{root} does not exist: nothing to ship")
    base = root.parent if root.is_file() else root
    with_parent = root.is_dir()  # py_modules zips a folder under its own name, a file without one
    total = 22  # end of central directory record
    files: list[tuple[int, str]] = []

    def handler(path: Path) -> None:
        nonlocal total
        if path.is_dir() and next(path.iterdir(), None) is None or path.is_file():
            arcname = path.relative_to(base)
            if with_parent:
                arcname = base.name / arcname
            info = zipfile.ZipInfo.from_file(path, arcname, strict_timestamps=False)
            name = len(info.filename.encode("utf-8"))
            total += (30 + name) + (46 + name) + info.file_size  # local header, central header, data
            if info.file_size:
                files.append((info.file_size, str(path)))

    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=_include_gitignore(),
                logger=_WALK_LOG)
    return total, sorted(files, reverse=True)[:3]


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 1024 ** 2:.2f} MiB"


def check_size(paths: Mapping[Path, Sequence[str]] | Iterable[Path | str], limit_bytes: int | None = None,
               excludes: Sequence[str] | None = None) -> int:
    """The bytes Ray would upload for these py_modules entries, all together; raises ConfigError for each
    entry at or over `limit_bytes` (default Ray's GCS_STORAGE_MAX_SIZE, which Ray applies to each package),
    naming the fields that need it (when `paths` maps entries to them), its size, the limit and the fix."""
    from ray._private.runtime_env import packaging

    limit = packaging.GCS_STORAGE_MAX_SIZE if limit_bytes is None else int(limit_bytes)
    owners = paths if isinstance(paths, Mapping) else {Path(p): [] for p in paths}
    total, problems = 0, []
    for location, fields in owners.items():
        location = Path(location)
        size, largest = package_size(location, excludes)
        total += size
        if size >= limit:
            what = f"{', '.join(fields)}: " if fields else ""
            biggest = ", ".join(f"{p} ({_mib(b)})" for b, p in largest)
            problems.append(f"{what}the module {location.stem!r} ({location}) is {_mib(size)} as Ray would upload "
                            f"it, at or over Ray's limit of {_mib(limit)} for a runtime_env package "
                            f"(largest files: {biggest or 'none'})")
    if problems:
        raise ConfigError("; ".join(problems) + ". Move data files out of the package folder (or list them in a "
                          ".rayignore inside it), or install the package on every node (pip install) / use a "
                          "runtime_env py_modules URI (a zip in cloud storage) instead of shipping it")
    return total


def worker_runtime_env(fields: Mapping[str, str] | Iterable[str], limit_bytes: int | None = None) -> dict[str, Any]:
    """The runtime_env that ships the user's modules to every worker: {"py_modules": [local paths],
    "excludes": [...]}, or {} when there is nothing to ship; checked against Ray's size limit. Fit for
    `ray.init(runtime_env=...)` as it is (which uploads and rewrites it in place); a task's or actor's
    runtime_env (Train's worker_runtime_env) needs the paths uploaded first, which `probe_imports` does."""
    found = _modules_by_location(fields)
    if not found:
        return {}
    excludes = ship_excludes()
    check_size(found, limit_bytes, excludes)
    return {"py_modules": [str(p) for p in found], "excludes": excludes}


def _is_uri(entry: Any) -> bool:
    from ray._private.runtime_env.py_modules import _check_is_uri

    return isinstance(entry, str) and _check_is_uri(entry)


def _folder_uri(folder: Path, excludes: Sequence[str]) -> str:
    """A content-addressed gcs:// URI for a package folder that, unlike Ray's, depends on the folder's name
    too: Ray hashes the files relative to the folder, yet zips them under the folder's name, so two
    packages of the same files under different names share one URI and the second imports as the first."""
    import hashlib

    from ray._private.runtime_env.packaging import RAY_PKG_PREFIX, get_uri_for_directory

    ray_uri = get_uri_for_directory(str(folder), include_gitignore=_include_gitignore(), excludes=list(excludes))
    digest = hashlib.sha1(f"{folder.name}\0{ray_uri}".encode()).hexdigest()[:16]
    return f"gcs://{RAY_PKG_PREFIX}{digest}.zip"


def upload_modules(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Upload the local py_modules entries of `runtime_env` (as `ray.init` does for a job's runtime_env)
    and rewrite it in place: the entries become `gcs://` URIs and `excludes` goes. Needs Ray initialised."""
    from ray._private.runtime_env.packaging import upload_package_if_needed
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    excludes = list(runtime_env.get("excludes") or [])
    uris = []
    with tempfile.TemporaryDirectory(prefix="ampray-ship-") as scratch:
        for entry in runtime_env.get("py_modules") or []:
            if _is_uri(entry):
                uris.append(entry)
                continue
            try:
                folder = Path(entry)
                if folder.is_dir():
                    uri = _folder_uri(folder, excludes)
                    upload_package_if_needed(uri, scratch, str(folder), include_gitignore=_include_gitignore(),
                                             include_parent_dir=True, excludes=excludes)
                else:  # a .py file (its name is in Ray's hash), a wheel: Ray's own upload
                    one = {"py_modules": [entry], "excludes": excludes}
                    uri = upload_py_modules_if_needed(one, include_gitignore=_include_gitignore(),
                                                      scratch_dir=scratch)["py_modules"][0]
            except Exception as err:  # RuntimeEnvSetupError / RuntimeError (the upload), ValueError (refused)
                text = " ".join(str(err).split())
                raise ConfigError(f"shipping the user's code ({entry}) to the Ray cluster failed: {text}") from None
            uris.append(uri)
    if "py_modules" in runtime_env:
        runtime_env["py_modules"] = uris
    runtime_env.pop("excludes", None)
    return runtime_env


def _probe(fields: dict[str, str]) -> dict[str, str]:
    """Runs on a Ray worker: {field: error text} for each import path that does not import there."""
    errors = {}
    for field, path in fields.items():
        try:
            import_object(path, field)
        except Exception as err:  # reported to the driver, never raised here
            errors[field] = str(err) if isinstance(err, ImportPathError) else f"{type(err).__name__}: {err}"
    return errors


def probe_imports(fields: Mapping[str, str] | Iterable[str], runtime_env: dict[str, Any],
                  timeout_s: float = 120) -> dict[str, Any]:
    """Import each path on a Ray worker with `runtime_env` (one small task, no CPU) and raise ConfigError
    naming every field that fails there, or when the task cannot start (the runtime_env cannot be set up)
    or does not answer within `timeout_s`. Local py_modules entries are uploaded first and `runtime_env`
    is rewritten in place to their URIs (pass the same dict to Train afterwards); returns it. Needs Ray
    initialised. One worker on one node answers: a node set up differently can still fail later."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    fields = _normalise(fields)
    if not fields:
        return runtime_env
    if not ray.is_initialized():
        raise RuntimeError("probe_imports needs Ray initialised (call it after ray.init)")
    upload_modules(runtime_env)
    task = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        ref = task.options(runtime_env=runtime_env or None).remote(fields)
    except (ValueError, TypeError) as err:  # a runtime_env Ray refuses
        raise ConfigError(f"the runtime_env that ships the user's code is not allowed: {err}") from None
    try:
        errors = ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # finished or gone meanwhile
            pass
        raise ConfigError(f"probing the imports of {', '.join(fields)} on the Ray workers did not finish within "
                          f"{timeout_s:g} s (the cluster has no free worker, or setting up the runtime_env "
                          f"{runtime_env} hangs); check `ray status` and the cluster's runtime_env logs") from None
    except RayError as err:  # RuntimeEnvSetupError, a worker that died, ...
        text = " ".join(str(err).split())
        raise ConfigError(f"the Ray workers could not start a task to import {', '.join(fields)} with the runtime_env "
                          f"{runtime_env}: {type(err).__name__}: {text}") from None
    if errors:
        shipped = runtime_env.get("py_modules") or []
        parts = []
        for field, text in errors.items():
            path = fields[field]
            prefix = f"{field}={path!r}: "
            parts.append(f"{field}={path!r} cannot be imported on the Ray workers: "
                         f"{text[len(prefix):] if text.startswith(prefix) else text}")
        raise ConfigError("; ".join(parts) + f" (shipped to them: {shipped or 'nothing'}; a module that imports "
                          "other local code outside its own package needs that installed on every node, or "
                          "moved into the package)")
    return runtime_env
