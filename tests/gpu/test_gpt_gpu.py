"""The built-in GPT's compiled cross-entropy on a GPU: the same fp32 sum as the eager upcast, without the fp32
copy of the logits."""

import pytest
import torch

from ampray.models import gpt
from ampray.models.gpt import lm_loss, lm_loss_eager

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_lm_loss_equals_the_eager_fp32_loss(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    base = (torch.randn(8, 512, 50304, device=CUDA, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 50304, (8, 512), device=CUDA, generator=g)
    targets[:, :7] = -1  # ignored positions
    grads, losses = [], []
    for fn in (lm_loss, lm_loss_eager):
        x = base.clone().requires_grad_(True)
        loss = fn(x, targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    assert gpt._FUSED.get("fn") is not None and gpt._FUSED.get("worked")
    assert losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    # The gradient is rounded to the logits' dtype either way; the fp32 sums may differ in their last bit.
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=1e-2, atol=1e-7)
    assert grads[0][:, :7].abs().max() == 0


def test_fused_lm_loss_keeps_no_fp32_copy_of_the_logits():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 1024, 50304, device=CUDA, generator=g, dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, 50304, (16, 1024), device=CUDA, generator=g)
    peaks = {}
    for name, fn in (("fused", lm_loss), ("eager", lm_loss_eager)):
        fn(x, t).backward()  # warm (compile)
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(x, t).backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        x.grad = None
    fp32_logits = x.numel() * 4
    assert peaks["eager"] - peaks["fused"] >= fp32_logits, peaks
