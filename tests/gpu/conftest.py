"""The embedded Ray cluster the GPU tests of a module share (needs Ray on the GPU host: the .gpukit bundle)."""

import pytest


@pytest.fixture(scope="module")
def gpu_cluster():
    ray = pytest.importorskip("ray")
    from ampray.orchestrator.train import init_ray

    init_ray("")
    yield
    ray.shutdown()
