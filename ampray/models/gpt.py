"""A GPT-2-style decoder-only transformer, with size presets from CPU-test scale to GPT-2 small."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The "nano" and "micro" sizes build in milliseconds and train on CPU; "small" is GPT-2 124M, and "medium",
# "large" and "xl" are GPT-2's 350M, 774M and 1.5B (sizes for GPUs, and for scaling.strategy = "fsdp").
_PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256),
    "micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256),
    "small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    "large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304),
    "xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50304),
}
_PRESETS["gpt2"] = _PRESETS["small"]
GPT_PRESETS = tuple(_PRESETS)


@dataclass
class GPTConfig:
    """Shape of a GPT-2-style decoder; the defaults are GPT-2 small (124M parameters)."""

    vocab_size: int = 50304
    """Token vocabulary size; GPT-2's 50257 padded to a multiple of 64 for faster matmuls."""
    block_size: int = 1024
    """Longest sequence the model accepts (number of learned positions)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""
    bias: bool = True
    """Whether linear layers and LayerNorms carry a bias, as in GPT-2."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}={value!r}: expected an int >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd}: expected a multiple of n_head={self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size ("nano", "micro", "small" or "gpt2") with any field overridden."""
        if name not in _PRESETS:
            raise ValueError(f"GPTConfig.preset: name={name!r}: expected one of {GPT_PRESETS}")
        allowed = [f.name for f in fields(cls)]
        for key in overrides:
            if key not in allowed:
                raise ValueError(f"GPTConfig.preset: unknown field {key!r}; allowed: {allowed}")
        return replace(cls(), **{**_PRESETS[name], **overrides})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) views, the layout SDPA expects. Splitting the last
        # dimension (rather than viewing it as (3, n_head, head_dim) and permuting) makes the backward one
        # vectorised concatenation instead of a stack and a strided copy per block: 2.8 ms of a 48 ms GPT-2
        # step on an H200 (benchmarks/profile_models.py); the values are the same.
        h = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, h).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        # SDPA picks a fused (flash / memory-efficient) kernel where it can; the causal flag
        # avoids materialising a (T, T) mask.
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.out_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(F.gelu(self.up(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising only the branch input keeps the residual stream an unscaled sum, which is
        # what lets deep pre-LN stacks train without warmup tricks.
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, a final LayerNorm and a tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tying saves vocab_size * n_embd parameters (38M of GPT-2's 124M) and tends to help
        # small models: the same vectors read tokens in and score them out.
        self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # Each block adds two branches to the residual stream; scaling their output projections by
        # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth (GPT-2 paper).
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.out_proj.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"GPT.forward: sequence length {T} exceeds block_size={self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, tied weights once; non_embedding leaves out the position embeddings.

        The token embedding stays in even then: tied to the LM head, it does real matmul work,
        which is what flops estimates count.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training flops per token: 6 * N + 12 * L * H * Q * T (PaLM paper, appendix B).

        6 * N: each non-embedding parameter does one multiply-add (2 flops) per token forward and
        two backward. 12 * L * H * Q * T: the attention scores (QK^T) and the weighted sum (AV),
        2 * 2 * T * H * Q flops per layer per token forward, x3 for training, with Q the head
        size and T the sequence length (block_size unless given). Causal masking halves the
        attention work in practice, which this estimate ignores, as is usual.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        head_size = cfg.n_embd // cfg.n_head
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * head_size * T


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) against targets (B, T); -1 is ignored.

    The softmax is computed in fp32 whatever the logits' dtype: over tens of thousands of logits a bf16 or
    fp16 log-softmax loses precision (bf16 log-probabilities near -10 are 0.06 apart), and the trainer may
    call this outside the autocast region. On a CUDA device (with Triton) the same fp32 arithmetic runs as
    one compiled kernel each way, so the fp32 copy of the logits is never materialised: on GPT-2 small at
    batch 16 x 1024 that is 1.5 GiB less peak memory and 5 ms less per step on an H200 than the eager upcast
    (benchmarks/profile_models.py). `AMPRAY_FUSED_LOSS=0` keeps the eager path everywhere.
    """
    fused = _fused_loss() if logits.is_cuda else None
    if fused is not None:
        if _FUSED.get("worked"):
            return fused(logits, targets)
        try:  # the first call compiles
            loss = fused(logits, targets)
            _FUSED["worked"] = True
            return loss
        except Exception as err:  # a compiler missing or failing on this host: the eager path is the same sum
            _FUSED["fn"] = None
            warnings.warn(f"lm_loss: the compiled cross-entropy failed ({type(err).__name__}: {err}); using the "
                          "eager fp32 path from now on", RuntimeWarning, stacklevel=2)
    return lm_loss_eager(logits, targets)


def lm_loss_eager(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`lm_loss` as plain eager operations: the logits upcast to fp32, then cross-entropy."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


_FUSED: dict[str, Any] = {}


def _fused_loss():
    """The compiled `lm_loss_eager`, built on first use; None where it cannot run (no Triton, turned off)."""
    if "fn" not in _FUSED:
        fn = None
        if os.environ.get("AMPRAY_FUSED_LOSS", "1") != "0":
            try:
                from torch.utils._triton import has_triton
                if has_triton():
                    fn = torch.compile(lm_loss_eager, fullgraph=True)
            except Exception:  # an old or partial torch: the eager path
                fn = None
        _FUSED["fn"] = fn
    return _FUSED["fn"]
