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

    # The dashboard (127.0.0.1 only) serves the state API that Train-inside-Tune needs (see search.py).
    ctx = ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                   configure_logging=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
