"""One real local Ray cluster for the whole test session (CPU workers, gloo), bound to localhost."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_address():
    from ampray.orchestrator.train import bind_to_localhost

    bind_to_localhost()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
