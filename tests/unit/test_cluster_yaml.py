"""cluster.yaml is a valid Ray cluster-launcher config for GPU training, and safe to launch.

Validated against the JSON schema shipped inside the installed Ray, then through the launcher's own
offline path (`prepare_config` fills the AWS defaults, `validate_config` re-checks schema and node
types) -- the same steps `ray up` runs before it talks to AWS. No cloud credentials are needed.
"""

from __future__ import annotations

import json
import py_compile
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
SUBMIT_SCRIPT = ROOT / "scripts" / "submit_train.py"

# vCPU / GPU counts of the instance types the config may use; `resources` must match them.
INSTANCE_RESOURCES = {
    "m5.2xlarge": {"CPU": 8, "GPU": 0},
    "m5.4xlarge": {"CPU": 16, "GPU": 0},
    "g5.xlarge": {"CPU": 4, "GPU": 1},
    "g5.12xlarge": {"CPU": 48, "GPU": 4},
    "g5.48xlarge": {"CPU": 192, "GPU": 8},
    "p4d.24xlarge": {"CPU": 96, "GPU": 8},
}
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def _start_commands(config: dict) -> list[str]:
    return [*config.get("head_start_ray_commands", []), *config.get("worker_start_ray_commands", [])]


def _option_values(tokens: list[str], name: str) -> list[str]:
    """Values of `--name=value` / `--name value` in a tokenised command line."""
    values = []
    for i, tok in enumerate(tokens):
        if tok.startswith(name + "="):
            values.append(tok.split("=", 1)[1])
        elif tok == name and i + 1 < len(tokens):
            values.append(tokens[i + 1])
    return values


def test_matches_rays_json_schema(config):
    jsonschema.validate(config, _ray_schema())


def test_passes_ray_launcher_validation(config):
    from ray.autoscaler._private import util

    prepared = util.prepare_config(config)  # fills the AWS defaults, merges setup commands
    util.validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # Our commands replace (not extend) the defaults, e.g. no nightly-wheel install or open dashboard.
    assert prepared["head_start_ray_commands"] == config["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == config["worker_start_ray_commands"]


def test_aws_provider_and_auth(config):
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]
    assert config["auth"]["ssh_user"] == "ubuntu"
    assert config["idle_timeout_minutes"] > 0


def test_node_types(config):
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0, "head is meant to be a CPU instance"

    workers = {name: spec for name, spec in types.items() if name != head}
    gpu_workers = [name for name, spec in workers.items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_workers, "no worker node type offers GPUs"
    for name in gpu_workers:
        spec = workers[name]
        assert 0 <= spec.get("min_workers", 0) <= spec["max_workers"] <= config["max_workers"]
        assert spec["max_workers"] > 0, f"{name} can never be launched"

    for name, spec in types.items():
        node = spec["node_config"]
        itype = node["InstanceType"]
        if itype in INSTANCE_RESOURCES:
            got = {k: spec["resources"].get(k, 0) for k in ("CPU", "GPU")}
            assert got == INSTANCE_RESOURCES[itype], f"{name}: resources do not match {itype}"
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node["ImageId"]), f"{name}: bad ImageId"


def test_setup_installs_the_shipped_checkout(config):
    mounts = config["file_mounts"]
    remote = next((r for r, local in mounts.items() if local in (".", "./")), None)
    assert remote is not None, "file_mounts must ship the checkout"
    name = remote.replace("~/", "").replace("$HOME/", "")
    installs = [c for c in config["setup_commands"] if "pip install" in c and "ampray" in c]
    assert installs, "setup_commands do not install ampray"
    assert any(name in c and "[ray]" in c for c in installs), "the install must use the mounted checkout"


def test_dashboard_is_never_exposed(config):
    commands = _start_commands(config)
    assert any("ray start" in c and "--head" in c for c in config["head_start_ray_commands"])
    for cmd in commands:
        assert "0.0.0.0" not in cmd, cmd
        tokens = shlex.split(cmd.replace(";", " ; "))
        if "ray" not in tokens or "start" not in tokens:
            continue
        hosts = _option_values(tokens, "--dashboard-host")
        assert all(h == LOOPBACK for h in hosts), f"dashboard bound beyond loopback: {cmd}"
        if "--head" in tokens and not hosts:
            included = _option_values(tokens, "--include-dashboard")
            assert included and included[-1].lower() == "false", f"head must pin the dashboard host: {cmd}"


def test_submit_script_exists_and_compiles(tmp_path):
    assert SUBMIT_SCRIPT.is_file()
    py_compile.compile(str(SUBMIT_SCRIPT), cfile=str(tmp_path / "submit_train.pyc"), doraise=True)
    src = SUBMIT_SCRIPT.read_text()
    assert "ampray.orchestrator.cli" in src and '"--address", "auto"' in src
