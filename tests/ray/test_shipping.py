"""The user's own code reaches the Ray workers: a module in the test's temporary folder (on the driver's
sys.path only, never on the workers') is shipped as py_modules, and probe_imports says which import
paths fail on the workers before any training starts."""

import sys
import uuid

import pytest

from ampray.amp.config import ConfigError
from ampray.models.registry import import_object
from ampray.orchestrator.shipping import probe_imports, worker_runtime_env

pytestmark = pytest.mark.ray


def _call(path: str) -> tuple[object, str]:
    """Runs on a worker: what the function `path` names returns, and where its module came from."""
    fn = import_object(path, "test")
    return fn(), sys.modules[fn.__module__].__file__


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package `shpray_<hex>` in tmp_path, importable on the driver only; yields its name."""
    name = f"shpray_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "code" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("def build():\n    return 'built on a worker'\n")
    (pkg / "driver_only.py").write_text(  # imports on the driver only: the variable is set after Ray started
        "import os\n"
        "if not os.environ.get('AMPRAY_SHIPPING_DRIVER'):\n"
        "    raise ImportError('AMPRAY_SHIPPING_DRIVER is not set here')\n"
        "def build():\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setenv("AMPRAY_SHIPPING_DRIVER", "1")
    yield name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def test_shipped_code_imports_and_runs_on_the_workers(ray_address, user_package):
    import ray

    fields = {"model.factory": f"{user_package}.nets:build"}
    env = worker_runtime_env(fields)
    assert env["py_modules"][0].endswith(user_package)
    assert probe_imports(fields, env) is env
    assert env["py_modules"][0].startswith("gcs://") and "excludes" not in env  # uploaded: fit for Train
    task = ray.remote(num_cpus=0.5)(_call)
    value, file = ray.get(task.options(runtime_env=env).remote(fields["model.factory"]), timeout=120)
    assert value == "built on a worker"
    assert "code" not in file.split("/") and "runtime_resources" in file  # Ray's copy, not the tmp folder


def test_what_fails_on_the_workers_only_names_the_field(ray_address, user_package):
    fields = {"model.factory": f"{user_package}.nets:build", "model.loss": f"{user_package}.driver_only:build"}
    env = worker_runtime_env(fields)  # the driver imports both
    fields["model.init"] = f"{user_package}.nets:missing"
    with pytest.raises(ConfigError) as err:
        probe_imports(fields, env)
    text = str(err.value)
    assert "model.factory" not in text, text
    assert f"model.loss='{user_package}.driver_only:build' cannot be imported on the Ray workers: " in text
    assert "AMPRAY_SHIPPING_DRIVER is not set here" in text
    assert f"model.init='{user_package}.nets:missing' cannot be imported on the Ray workers: " in text
    assert "has no 'missing'" in text


def test_two_packages_of_the_same_files_under_other_names_both_ship(ray_address, user_package, tmp_path):
    """Ray's URI of a folder hashes its files, not its name; ours adds the name (else the second one
    would get the first one's zip, and no module named like it)."""
    import shutil

    twin = f"{user_package}_twin"
    shutil.copytree(tmp_path / "code" / user_package, tmp_path / "code" / twin)
    fields = {"model.factory": f"{user_package}.nets:build", "model.loss": f"{twin}.nets:build"}
    env = worker_runtime_env(fields)
    assert len(env["py_modules"]) == 2
    probe_imports(fields, env)
    assert len(set(env["py_modules"])) == 2


def test_without_shipping_the_workers_cannot_import_it(ray_address, user_package):
    fields = {"model.factory": f"{user_package}.nets:build"}
    with pytest.raises(ConfigError, match=rf"model\.factory='{user_package}\.nets:build' cannot be imported on "
                                          rf"the Ray workers: no module named '{user_package}'.*shipped to them: "
                                          "nothing"):
        probe_imports(fields, {})


def test_an_upload_that_fails_is_a_config_error(ray_address, user_package, tmp_path, monkeypatch):
    (tmp_path / "code" / user_package / "fresh.py").write_text(f"TAG = {uuid.uuid4().hex!r}\n")  # not in the GCS
    fields = {"model.factory": f"{user_package}.nets:build"}
    env = worker_runtime_env(fields)
    monkeypatch.setenv("RAY_RUNTIME_ENV_FAIL_UPLOAD_FOR_TESTING", "1")
    with pytest.raises(ConfigError, match=rf"shipping the user's code \(.*{user_package}\) to the Ray cluster "
                                          "failed: .*Failed to store package in the GCS"):
        probe_imports(fields, env)


def test_a_runtime_env_the_workers_cannot_set_up_is_a_config_error(ray_address, user_package):
    fields = {"model.factory": f"{user_package}.nets:build"}
    env = {"py_modules": [f"gcs://_ray_pkg_{uuid.uuid4().hex[:16]}.zip"]}  # nothing uploaded there
    with pytest.raises(ConfigError, match=r"could not start a task to import model\.factory .*RuntimeEnvSetupError"):
        probe_imports(fields, env, timeout_s=90)
