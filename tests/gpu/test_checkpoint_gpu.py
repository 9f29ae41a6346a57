"""A checkpoint's CUDA RNG state is the current device's own, and restoring it replays the same draws
(also from the per-device list that earlier checkpoints hold)."""

import pytest
import torch

from ampray.actors.checkpoint import rng_state, set_rng_state

pytestmark = pytest.mark.gpu


def test_cuda_rng_state_round_trip_on_the_current_device():
    torch.cuda.manual_seed_all(11)
    saved = rng_state()
    assert isinstance(saved["cuda"], torch.Tensor) and torch.equal(saved["cuda"], torch.cuda.get_rng_state())
    want = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(99)
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, device="cuda"), want)
    # The earlier format: one state per visible device; the current device's entry is used.
    legacy = {**saved, "cuda": [saved["cuda"]] * torch.cuda.device_count()}
    torch.cuda.manual_seed_all(99)
    set_rng_state(legacy)
    assert torch.equal(torch.rand(4, device="cuda"), want)
