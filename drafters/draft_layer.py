"""A one-layer transformer block for feature-level drafters (EAGLE, EAGLE-3, Falcon).

Feature drafters run a single Llama-style decoder layer over the target's hidden states, with
attention patterns that differ from plain causal attention: a draft tree attends to the
committed context plus its own ancestors; EAGLE-3's training-time test attends to the context's
real-feature rows plus the drafter's own earlier outputs; Falcon's semi-autoregressive blocks see
every position of their block. So the layer takes its attention pattern as an explicit boolean
matrix and returns its keys and values for the caller to cache, instead of hiding a KV cache.

Llama-style: pre-norm (RMSNorm), rotary position embeddings (the target's rope base), multi-head
attention, SwiGLU MLP. Shapes: ``x [B, n, H]``, ``positions [n]``, ``allowed [n, m + n]`` (or
``[B, n, m + n]``) for ``m`` cached keys.

References:
    Touvron et al. "LLaMA: Open and Efficient Foundation Language Models". arXiv:2302.13971.
    Su et al. "RoFormer: Enhanced Transformer with Rotary Position Embedding". arXiv:2104.09864.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec import kernels


def rope_base(config) -> float:
    """The target's rotary base (transformers 5 keeps it in ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean square in float32 whatever the drafter's dtype
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def fast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device multiplies it natively (a drafter's small matrix products are
    memory-bound: bf16 weights halve the traffic, ~4x faster on AVX512-BF16 CPUs), else float32.
    On CPU with the skinny float32 kernel built (specdec/kernels.py) float32: the kernel's
    products of a few rows beat oneDNN's bf16 ones there (benchmarks/bench_trained.py, EAGLE-2's
    draft share 34% -> see docs/drafters.md). A drafter's precision never affects losslessness,
    only how often it is right."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and kernels.available():
        return torch.float32
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):
            return torch.float32
    return torch.float32


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat([-second, first], -1)


class DraftDecoderLayer(nn.Module):
    """x -> x + attn(norm(x)) -> . + mlp(norm(.)), with explicit keys/values and mask."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 rope_theta: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.input_norm = RMSNorm(hidden_size, eps)
        self.post_norm = RMSNorm(hidden_size, eps)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, n, h, d] rotated by positions [n]."""
        freqs = positions.to(self.inv_freq.device).float()[:, None] * self.inv_freq  # [n, d/2]
        angles = torch.cat([freqs, freqs], -1)[:, None, :]  # [n, 1, d]
        return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, H]; past_keys/values [B, m, h, d] (rotated) or None; allowed [(B,) n, m + n].

        Returns (out [B, n, H], keys [B, n, h, d], values [B, n, h, d]) of the n new rows."""
        batch, n, hidden = x.shape
        q, k, v = kernels.linear(self.input_norm(x), self.qkv.weight).view(
            batch, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        keys = k if past_keys is None else torch.cat([past_keys, k], 1)
        values = v if past_values is None else torch.cat([past_values, v], 1)
        mask = allowed if allowed.dim() == 3 else allowed[None]
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask[:, None].to(x.device))  # [B, h, n, d]
        # kernels.linear: the skinny CPU kernel for float32 inference, else F.linear
        h = x + kernels.linear(attn.transpose(1, 2).reshape(batch, n, hidden), self.o_proj.weight)
        gate, up = kernels.linear(self.post_norm(h), self.gate_up.weight).chunk(2, -1)
        return h + kernels.linear(nn.functional.silu(gate) * up, self.down.weight), k, v
