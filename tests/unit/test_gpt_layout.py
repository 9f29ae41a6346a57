"""The speed work on the built-in GPT changes no number: the attention's split layout gives the same forward
and gradients, bit for bit, as the permuted layout it replaced, and `lm_loss` off CUDA is the eager sum."""

import torch
import torch.nn.functional as F

from ampray.models.gpt import GPT, CausalSelfAttention, GPTConfig, lm_loss, lm_loss_eager


def permuted_forward(self, x):
    """The attention as it was before: (B, T, 3C) viewed as (B, T, 3, H, D) and permuted."""
    B, T, C = x.shape
    q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
    return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(B, T, C)))


def run(monkeypatch=None):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro"))
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    losses = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def test_split_layout_equals_the_permuted_one_bit_for_bit(monkeypatch):
    new_losses, new_params = run()
    monkeypatch.setattr(CausalSelfAttention, "forward", permuted_forward)
    old_losses, old_params = run()
    assert torch.equal(new_losses, old_losses)
    assert all(torch.equal(a, b) for a, b in zip(new_params, old_params))


def test_lm_loss_on_cpu_is_the_eager_fp32_cross_entropy():
    logits = torch.randn(2, 8, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 8))
    targets[0, 0] = -1  # ignored
    a, b = lm_loss(logits, targets), lm_loss_eager(logits, targets)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert torch.equal(a, ref)
