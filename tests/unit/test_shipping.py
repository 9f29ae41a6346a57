"""Which of the user's modules go to the Ray workers, and how many bytes Ray would upload for them (no
cluster: the sizes are checked against the zip Ray's own packaging writes)."""

import sys
import types
import uuid
from pathlib import Path

import pytest

from ampray.amp.config import ConfigError
from ampray.orchestrator.shipping import check_size, modules_to_ship, package_size, ship_excludes, worker_runtime_env


@pytest.fixture(autouse=True)
def clean_imports():
    """The tests import modules from their tmp folders: forget them (and the folders) afterwards."""
    path = list(sys.path)
    yield
    for name in [m for m in sys.modules if m.startswith("shp_")]:  # only ours: a re-imported ray crashes
        del sys.modules[name]
    sys.path[:] = path


def _name(prefix: str = "shp") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _package(root: Path, name: str) -> Path:
    pkg = root / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "nets.py").write_text("def build():\n    return 42\n\n\ndef loss(a, b):\n    return a - b\n")
    return pkg


def test_a_package_in_the_working_folder_is_shipped_once(tmp_path, monkeypatch):
    name = _name()
    pkg = _package(tmp_path, name)
    monkeypatch.chdir(tmp_path)  # the user runs ampray beside their code; it is not on sys.path
    fields = {"model.factory": f"{name}.sub.nets:build", "model.loss": f"{name}.sub.nets:loss"}
    assert modules_to_ship(fields) == [pkg.resolve()]
    assert modules_to_ship(list(fields.values())) == [pkg.resolve()]
    env = worker_runtime_env(fields)
    assert env["py_modules"] == [str(pkg.resolve())]
    assert "__pycache__" in env["excludes"] and ".git" in env["excludes"]


def test_a_single_file_module_on_the_path_is_shipped(tmp_path, monkeypatch):
    name = _name()
    (tmp_path / "code").mkdir()
    file = tmp_path / "code" / f"{name}.py"
    file.write_text("def build():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    pkg_name = _name()
    pkg = _package(tmp_path / "code", pkg_name)
    fields = {"model.factory": f"{name}:build", "model.loss": f"{pkg_name}.sub.nets:loss", "empty": ""}
    assert modules_to_ship(fields) == [file.resolve(), pkg.resolve()]
    assert worker_runtime_env(fields)["py_modules"] == [str(file.resolve()), str(pkg.resolve())]


@pytest.mark.parametrize("path", ["torch.nn.functional:relu", "math:sqrt", "os.path:join", "json:dumps",
                                  "sys:exit", "ampray.models.registry:cross_entropy"])
def test_what_every_node_has_is_not_shipped(path):
    assert modules_to_ship({"model.loss": path}) == []
    assert worker_runtime_env({"model.loss": path}) == {}


def test_what_does_not_import_on_the_driver_names_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.factory='nowhere_to_be_found:build'.*no module named"):
        modules_to_ship({"model.factory": "nowhere_to_be_found:build"})


def test_a_namespace_package_over_two_folders_is_refused(tmp_path, monkeypatch):
    name = _name()
    for side in ("a", "b"):
        (tmp_path / side / name).mkdir(parents=True)
        monkeypatch.syspath_prepend(str(tmp_path / side))
    (tmp_path / "a" / name / "nets.py").write_text("def build():\n    return 0\n")
    with pytest.raises(ConfigError, match=rf"model\.factory='{name}\.nets:build'.*namespace package.*2 folders"
                                          r".*install it as a package on every node"):
        modules_to_ship({"model.factory": f"{name}.nets:build"})


def test_a_one_folder_namespace_package_is_shipped(tmp_path, monkeypatch):
    name = _name()
    (tmp_path / name).mkdir()
    (tmp_path / name / "nets.py").write_text("def build():\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert modules_to_ship({"model.factory": f"{name}.nets:build"}) == [(tmp_path / name).resolve()]


def test_a_compiled_extension_outside_site_packages_is_refused(tmp_path):
    name = _name()
    so = tmp_path / f"{name}.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"\x7fELF")
    module = types.ModuleType(name)
    module.__file__ = str(so)
    module.build = lambda: None
    sys.modules[name] = module  # as if imported from tmp_path (the fixture forgets it)
    with pytest.raises(ConfigError, match=rf"model\.factory='{name}:build'.*compiled extension.*outside "
                                          r"site-packages.*install it as a package on every node"):
        modules_to_ship({"model.factory": f"{name}:build"})


def _ray_zip_size(location: Path, tmp_path: Path) -> int:
    """The size of the zip Ray's own packaging writes for this py_modules entry."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"ray-{uuid.uuid4().hex}.zip"
    create_package(str(location), target, include_gitignore=True, include_parent_dir=location.is_dir(),
                   excludes=ship_excludes())
    return target.stat().st_size


def _messy_package(root: Path, name: str) -> Path:
    pkg = _package(root, name)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"x" * 5000)
    (pkg / "sub" / "__pycache__").mkdir()
    (pkg / "sub" / "__pycache__" / "nets.cpython-311.pyc").write_bytes(b"y" * 7000)
    (pkg / ".git").mkdir()
    (pkg / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (pkg / "empty").mkdir()
    (pkg / "data").mkdir()
    (pkg / "data" / "weights.bin").write_bytes(b"\0" * 20000)  # ignored by the package's own .gitignore
    (pkg / "data" / "table.csv").write_bytes(b"1,2\n" * 1000)
    (pkg / ".gitignore").write_text("*.bin\n")
    (pkg / "sub" / ".rayignore").write_text("scratch.txt\n")
    (pkg / "sub" / "scratch.txt").write_bytes(b"z" * 3000)
    (pkg / "ünï.py").write_text("X = 1\n")
    (root / ".gitignore").write_text(f"{name}/data/\n")  # the project's: Ray does not read it for py_modules
    return pkg


def test_check_size_counts_the_bytes_ray_would_upload(tmp_path):
    name = _name()
    pkg = _messy_package(tmp_path / "proj", name)
    single = tmp_path / "proj" / "single.py"
    single.write_text("def build():\n    return 3\n" * 50)
    for location in (pkg, single):
        size, _ = package_size(location)
        assert size == _ray_zip_size(location, tmp_path)
    assert check_size([pkg, single]) == package_size(pkg)[0] + package_size(single)[0]
    assert check_size({pkg: ["model.factory='x:y'"]}) == package_size(pkg)[0]


def test_pycache_git_and_ignored_files_are_not_counted(tmp_path):
    name = _name()
    pkg = _messy_package(tmp_path / "proj", name)
    size, largest = package_size(pkg)
    assert not any("__pycache__" in p or ".git" + "/" in p or p.endswith((".bin", "scratch.txt")) for _, p in largest)
    for junk in (pkg / "__pycache__", pkg / "sub" / "__pycache__", pkg / ".git"):
        for file in junk.iterdir():
            file.unlink()
        junk.rmdir()
    (pkg / "data" / "weights.bin").unlink()
    (pkg / "sub" / "scratch.txt").unlink()
    assert package_size(pkg)[0] == size  # none of it was counted
    (pkg / "data" / "more.csv").write_bytes(b"5" * 100)
    assert package_size(pkg)[0] > size  # the project's .gitignore (outside the package) excludes nothing


def test_over_the_limit_names_the_field_the_module_and_sizes(tmp_path, monkeypatch):
    name = _name()
    pkg = _messy_package(tmp_path / "proj", name)
    monkeypatch.chdir(tmp_path / "proj")
    fields = {"model.factory": f"{name}.sub.nets:build", "model.loss": f"{name}.sub.nets:loss"}
    size = package_size(pkg)[0]
    assert worker_runtime_env(fields, limit_bytes=size + 1)["py_modules"] == [str(pkg.resolve())]
    with pytest.raises(ConfigError) as err:
        worker_runtime_env(fields, limit_bytes=size)  # Ray refuses a package of the limit itself
    text = str(err.value)
    assert f"model.factory='{name}.sub.nets:build', model.loss='{name}.sub.nets:loss'" in text
    assert f"the module {name!r}" in text and f"{size / 1024 ** 2:.2f} MiB" in text
    assert f"limit of {size / 1024 ** 2:.2f} MiB" in text
    assert "table.csv" in text  # the largest file, where the bytes are
    assert "Move data files out of the package folder" in text and "install the package on every node" in text
    with pytest.raises(ConfigError, match=r"the module 'single'.*limit of 0\.00 MiB"):
        single = tmp_path / "single.py"
        single.write_text("A = 1\n")
        check_size([single], limit_bytes=10)


def test_the_default_limit_is_rays(monkeypatch, tmp_path):
    from ray._private.runtime_env import packaging

    single = tmp_path / "single.py"
    single.write_text("A = 1\n")
    assert packaging.GCS_STORAGE_MAX_SIZE == 512 * 1024 ** 2
    check_size([single])
    monkeypatch.setattr(packaging, "GCS_STORAGE_MAX_SIZE", 50)
    with pytest.raises(ConfigError, match="limit of 0.00 MiB"):
        check_size([single])
