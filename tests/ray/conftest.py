"""One real local Ray cluster for the whole test session (CPU workers, gloo), bound to localhost."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_address():
    from ampray.orchestrator.train import RAY_ENV, bind_to_localhost

    bind_to_localhost()
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
