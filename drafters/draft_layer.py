"""A one-layer transformer block for feature-level drafters (EAGLE, EAGLE-3, Falcon).

Feature drafters run a single Llama-style decoder layer over the target's hidden states, with
attention patterns that differ from plain causal attention: a draft tree attends to the
committed context plus its own ancestors; EAGLE-3's training-time test attends to the context's
real-feature rows plus the drafter's own earlier outputs; Falcon's semi-autoregressive blocks see
every position of their block. So the layer takes its attention pattern as an explicit boolean
matrix and returns its keys and values for the caller to cache, instead of hiding a KV cache.
For drafting, `DraftDecoderLayer.step_cached` keeps them in a `LayerCache` (buffers written in
place: a drafted tree's rows are overwritten by the next step's committed rows) and, in float32
inference on CPU, runs the whole layer as one native call (specdec/engine/kernels.py
``decoder_layers``) with its weights in bfloat16 panels of the skinny kernel (`DRAFT_PANELS`).
Drafters' products go through `specdec.engine.linear` with ``DRAFT_PANELS`` precision.

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

from specdec.engine import kernels, linear
from specdec.engine.snapshot import Snapshot


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
    On CPU with the skinny kernel built (specdec/engine/kernels.py) float32 activations: the kernel's
    products of a few rows, with the weights in bf16 panels (`DRAFT_PANELS`), beat oneDNN's
    bf16 ones there (docs/drafters.md). A drafter's precision never affects losslessness, only
    how often it is right."""
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


# the precision of drafters' weights in their products (`specdec.engine.linear`): the skinny
# kernel's panels in float32 CPU inference; elsewhere (training, other dtypes) F.linear
DRAFT_PANELS = torch.bfloat16


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

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[n, d] rotary angles of positions [n]."""
        freqs = positions.to(self.inv_freq.device).float()[:, None] * self.inv_freq  # [n, d/2]
        return torch.cat([freqs, freqs], -1)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, n, h, d] rotated by positions [n]."""
        angles = self._angles(positions)[:, None, :]  # [n, 1, d]
        return x * angles.cos().to(x.dtype) + _rotate_half(x) * angles.sin().to(x.dtype)

    def _native_weights(self) -> list[torch.Tensor]:
        """The 10 per-layer arguments of the kernel module's ``decoder_layers`` (norms, panels of
        `DRAFT_PANELS`, no biases), remade when a parameter changes or the panel dtype does."""
        params = (self.input_norm.weight, self.qkv.weight, self.o_proj.weight,
                  self.post_norm.weight, self.gate_up.weight, self.down.weight)
        held = getattr(self, "_native", None)
        if held is None or held[2] != DRAFT_PANELS or not held[0].matches(params):
            none = torch.empty(0)
            ln1, qkv, o, ln2, gate_up, down = (p.detach() for p in params)
            weights = [ln1, kernels.pack(qkv, DRAFT_PANELS), none, kernels.pack(o, DRAFT_PANELS),
                       none, ln2, kernels.pack(gate_up, DRAFT_PANELS), none,
                       kernels.pack(down, DRAFT_PANELS), none]
            held = self._native = (Snapshot(params), weights, DRAFT_PANELS)
        return held[1]

    def _native_usable(self, x: torch.Tensor) -> bool:
        """One batch row whose products the kernel takes (`kernels.applies`)."""
        return x.shape[0] == 1 and kernels.applies(x, self.qkv.weight)

    def step_cached(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                    cache: "LayerCache", start: int) -> torch.Tensor:
        """The layer over the rows ``x [1, n, H]`` whose keys/values go to rows ``start`` ..
        ``start + n - 1`` of ``cache`` (overwriting what was there), attending to rows
        ``< start + n`` as ``allowed [n, start + n]`` says -> out [1, n, H].

        On CPU in float32 inference with the kernels built, one native call
        (``decoder_layers``: the same layer on the skinny kernel with `DRAFT_PANELS` panels,
        its key/value rows written in place); else this module's `forward` over the cached rows."""
        n = x.shape[1]
        cache.reserve(start + n, self.num_heads, self.head_dim, x)
        if allowed.shape != (n, start + n):
            raise ValueError(f"allowed must be [{n}, {start + n}], got {tuple(allowed.shape)}")
        if self._native_usable(x):
            angles = self._angles(positions)
            eps = [self.input_norm.eps, self.post_norm.eps]
            out = kernels.native().decoder_layers(
                x[0], angles.cos(), angles.sin(), allowed[None, None], self._native_weights(),
                [cache.keys], [cache.values], start,
                [self.num_heads, self.num_heads, self.head_dim, self.gate_up.out_features // 2],
                eps, [self.head_dim ** -0.5], False)
            return out[0][None]
        past_k = cache.keys[:, :, :start].transpose(1, 2) if start else None
        past_v = cache.values[:, :, :start].transpose(1, 2) if start else None
        out, k, v = self(x, positions, allowed, past_k, past_v)
        cache.keys[:, :, start: start + n] = k.transpose(1, 2)
        cache.values[:, :, start: start + n] = v.transpose(1, 2)
        return out

    def forward(self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, n, H]; past_keys/values [B, m, h, d] (rotated) or None; allowed [(B,) n, m + n].

        Returns (out [B, n, H], keys [B, n, h, d], values [B, n, h, d]) of the n new rows."""
        batch, n, hidden = x.shape
        q, k, v = linear(self.input_norm(x), self.qkv.weight, precision=DRAFT_PANELS).view(
            batch, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        keys = k if past_keys is None else torch.cat([past_keys, k], 1)
        values = v if past_values is None else torch.cat([past_values, v], 1)
        mask = allowed if allowed.dim() == 3 else allowed[None]
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask[:, None].to(x.device))  # [B, h, n, d]
        h = x + linear(attn.transpose(1, 2).reshape(batch, n, hidden), self.o_proj.weight,
                       precision=DRAFT_PANELS)
        gate, up = linear(self.post_norm(h), self.gate_up.weight,
                          precision=DRAFT_PANELS).chunk(2, -1)
        return h + linear(nn.functional.silu(gate) * up, self.down.weight,
                          precision=DRAFT_PANELS), k, v


class LayerCache:
    """A draft layer's keys/values in buffers ``[1, heads, capacity, head_dim]`` (rotated keys),
    written in place by `DraftDecoderLayer.step_cached`: a drafted tree's rows sit after the
    committed context and the next step's committed rows overwrite them, instead of
    concatenating caches every call. Grows by doubling."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def reserve(self, rows: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
        if self.keys is not None and (self.keys.shape[2] >= rows and self.keys.dtype == like.dtype
                                      and self.keys.device == like.device):
            return
        capacity = max(256, 2 * rows)
        keys = like.new_zeros(1, heads, capacity, head_dim)
        values = like.new_zeros(1, heads, capacity, head_dim)
        if self.keys is not None:
            kept = min(self.keys.shape[2], capacity)
            keys[:, :, :kept] = self.keys[:, :, :kept]
            values[:, :, :kept] = self.values[:, :, :kept]
        self.keys, self.values = keys, values
