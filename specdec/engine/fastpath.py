"""A lean forward for Llama-family targets (Llama, Mistral without sliding window, Qwen2,
SmolLM2) used by `TreeForward` for its verify and draft forwards.

Why: on a small CPU target most of a verify forward is not arithmetic. On the 2-core Xeon this
project measures on, SmolLM2-135M's Hugging Face forward over the root plus 7 draft tokens takes
about 62 ms, of which the weight products are about 38 ms; the rest is per-op overhead: 30 layers
of module calls, keyword plumbing, an RMSNorm of six ops, rotary embeddings built from ``cat`` and
``neg``, and ``repeat_kv`` copying every key and value three times for grouped-query attention.
This module computes the same function with fewer, larger operations:

- q/k/v projections fused into one matrix product, gate/up into another (one weight each, the
  rows concatenated; every output element is the same dot product as before);
- every product is a `specdec.engine.backends.Linear` whose backend is picked once per build: on
  CPU float32, products of 1 to `KERNEL_MAX` rows use the skinny-GEMM kernel
  (specdec/engine/kernels.py: weights packed once into 16-column panels, read once for all
  rows), and the decoder-layer loop runs as one native call (``decoder_layers``, the same ATen operations as
  the Python loop below, bit-identical to it) instead of ~20 Python-level calls per layer;
- where the kernel cannot be built (or ``SPECDEC_KERNEL=0``), on CPU float32 with MKL, products
  of 4 to `PACK_MAX` rows use MKL's packed-weight GEMM (``torch.ops.mkl._mkl_linear`` over
  weights packed once by ``_mkl_reorder_linear_weight``);
- ``F.rms_norm`` (with the kernel: its one-pass native rows); rotary embeddings applied with one
  precomputed ``cos``/``sin`` pair per forward;
- attention through ``scaled_dot_product_attention(..., enable_gqa=True)``: no key/value copies.

The cache is the same ``DynamicCache`` the Hugging Face forward uses, so prefill (which keeps the
stock forward), `TreeForward.commit` and everything reading the cache are unchanged; only its
layers' keys and values are views of buffers with room to grow, written in place (`_append`),
instead of ``torch.cat``-ed into new tensors every forward. Without the packed products or the
kernel the logits are bit-identical to the stock forward's on the embedded model; with them they
differ by float summation order only (about 1e-5 to 1e-4 in the logits), the same kind of
difference as between a 1-token and an n-token forward; greedy outputs are tested token for token against
``model.generate`` (tests/test_fastpath.py). The copies are remade when a weight changes
(`specdec.engine.snapshot.Snapshot`, checked before every forward).

`supported(model)` says whether a model qualifies: a ``LlamaForCausalLM``-shaped module tree (decoder
layers with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, two RMSNorms), SiLU MLP,
full attention (no sliding window), no attention logit soft-capping. Anything else uses the stock
forward. Turn the fast path off with ``SPECDEC_FASTPATH=0`` or ``TreeForward(..., fastpath=False)``;
`specdec.engine.for_model` holds one `FastForward` per model.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from specdec.engine import kernels
from specdec.engine.backends import KERNEL_MAX, Linear, choose, kernel_usable, mkl_usable
from specdec.engine.snapshot import Snapshot

ENV = "SPECDEC_FASTPATH"
MODEL_TYPES = ("llama", "mistral", "qwen2")
AUTO_MAX_BYTES = 4 << 30  # "auto" declines when the fused and packed copies would take more


def extra_bytes(model: nn.Module) -> int:
    """Memory the fast path adds: fused q/k/v and gate/up copies, plus (CPU float32 with MKL)
    a packed copy of every weight product."""
    _, layers, head = _attribute_chain(model)
    size = lambda t: t.numel() * t.element_size()
    fused = sum(size(layer.self_attn.q_proj.weight) + size(layer.self_attn.k_proj.weight)
                + size(layer.self_attn.v_proj.weight) + size(layer.mlp.gate_proj.weight)
                + size(layer.mlp.up_proj.weight) for layer in layers)
    linear = sum(size(m.weight) for m in model.modules() if type(m) is nn.Linear)
    weight = head.weight
    # the kernel's panels, or MKL's packed copies: about one more copy of every weight either way
    return fused + (linear if mkl_usable(weight) or kernel_usable(weight) else 0)


def kernel_wanted(model: nn.Module) -> bool:
    """Whether the fast path builds ``model``'s products on the skinny kernel by default."""
    chain = _attribute_chain(model)
    return chain is not None and choose(chain[2].weight, pack=False) == "kernel"


def _attribute_chain(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    head = getattr(model, "lm_head", None)
    if inner is None or layers is None or head is None:
        return None
    return inner, layers, head


def supported(model: nn.Module) -> str | None:
    """None when the fast path can run ``model``; otherwise why not."""
    config = model.config
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return f"model_type {getattr(config, 'model_type', None)!r} is not one of {MODEL_TYPES}"
    chain = _attribute_chain(model)
    if chain is None:
        return "not a model.layers / lm_head module tree"
    inner, layers, head = chain
    if type(head) is not nn.Linear:
        return "lm_head is not a plain nn.Linear"
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        return f"hidden_act {config.hidden_act!r} (only SiLU)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention soft-capping"
    if getattr(inner, "rotary_emb", None) is None or getattr(inner, "norm", None) is None:
        return "no rotary_emb / norm module"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(type(getattr(attn, k, None)) is nn.Linear
                                                  for k in names):
            return "a decoder layer without self_attn.{q,k,v,o}_proj"
        if not all(type(getattr(mlp, k, None)) is nn.Linear for k in ("gate_proj", "up_proj",
                                                                      "down_proj")):
            return "a decoder layer without mlp.{gate,up,down}_proj"
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            return "q/k norms (Qwen3-style) are not implemented"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, norm, None), "weight"):
                return f"a decoder layer without {norm}"
    for m in model.modules():
        if "forward" in m.__dict__ or getattr(m, "_hf_hook", None) is not None:
            return "a module has a replaced forward or an offload hook"
    return None


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return 1e-6


class FastForward:
    """Fused weights of one Llama-family model and its lean forward."""

    def __init__(self, model: nn.Module, pack: bool | None = None, kernel: bool | None = None,
                 panel_dtype: torch.dtype = torch.float32):
        """``panel_dtype=torch.bfloat16`` or ``torch.int8`` keeps every product's kernel panels
        in that type (`kernels.pack`): the forward of the rounded weights, accumulated in
        float32, streaming half or a quarter of the bytes (a cheaper, slightly different model:
        drafters/quantized.py drafts with it). It needs the kernel."""
        reason = supported(model)
        if reason is not None:
            raise ValueError(f"fast path unsupported: {reason}")
        if panel_dtype not in kernels.PANEL_DTYPES:
            raise ValueError(f"panel_dtype must be one of {kernels.PANEL_DTYPES}, got {panel_dtype}")
        if panel_dtype != torch.float32 and kernel is False:
            raise ValueError(f"{panel_dtype} panels need the skinny kernel (kernel=None or True)")
        self.panel_dtype = panel_dtype
        self.model = model
        inner, layers, head = _attribute_chain(model)
        self.inner, self.head_module = inner, head
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.want_pack = pack  # None: wherever it works (decided per build: weights can move)
        self.want_kernel = kernel  # None: wherever it builds (CPU float32, SPECDEC_KERNEL != 0)
        self._build()

    def _watched_weights(self) -> list[torch.Tensor]:
        # the linear weights the copies were made from (and the norms' weights the native loop
        # holds views of), read through each module's parameter dict: nn.Module attribute
        # access costs microseconds, and this runs every forward
        return [module._parameters.get("weight") for module in self._watched]

    def _build(self) -> None:
        weight = self.head_module.weight
        kernel = True if self.panel_dtype != torch.float32 else self.want_kernel
        backend = choose(weight, kernel, self.want_pack,
                         probe=self.inner.layers[0].self_attn.o_proj.weight.detach())
        self.backend = backend
        self.kernel, self.pack = backend == "kernel", backend == "mkl"
        self.repeat_kv = weight.device.type != "cpu"
        self.layers = []
        with torch.no_grad():
            for layer in self.inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.layers.append((layer,
                                    self._linear(attn.q_proj, attn.k_proj, attn.v_proj),
                                    self._linear(attn.o_proj),
                                    self._linear(mlp.gate_proj, mlp.up_proj),
                                    self._linear(mlp.down_proj),
                                    _eps(layer.input_layernorm),
                                    _eps(layer.post_attention_layernorm)))
            self.head = self._linear(self.head_module)
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.intermediate = self.layers[0][3].weight.shape[0] // 2
        self._watched = [self.head_module] + [
            module for layer in self.inner.layers
            for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                           layer.mlp.down_proj)]
        self.native = None
        if self.kernel:
            self._build_native()
        self._snapshot = Snapshot(self._watched_weights())

    def _linear(self, *modules: nn.Linear) -> Linear:
        """One product of the rows of ``modules``' weights (and biases) concatenated."""
        weight = modules[0].weight.detach() if len(modules) == 1 else torch.cat(
            [m.weight.detach() for m in modules])
        return Linear(weight, _cat_bias(*modules), self.backend, self.panel_dtype)

    def _build_native(self) -> None:
        """Arguments of the kernel module's ``decoder_layers`` (the layer loop in one native call;
        specdec/engine/csrc/cpu_kernels.cpp): per layer its norms' weights (views of the live
        ones, so in-place changes show; replaced ones are caught by the staleness check), the
        products' panels and biases (an empty tensor for none), epsilons and attention scale."""
        empty = torch.empty(0)
        weights, eps, scale = [], [], []
        for layer, qkv, o, gate_up, down, eps1, eps2 in self.layers:
            for item in (layer.input_layernorm.weight, qkv, o,
                         layer.post_attention_layernorm.weight, gate_up, down):
                if isinstance(item, Linear):
                    weights += [item.copy, empty if item.kernel_bias is None else item.kernel_bias]
                else:
                    weights.append(item.detach())
            eps += [eps1, eps2]
            scale.append(float(layer.self_attn.scaling))
        self.native = (kernels.native(), weights,
                       [self.n_heads, self.n_kv, self.head_dim, self.intermediate], eps, scale)
        self._watched += [norm for layer in self.inner.layers
                          for norm in (layer.input_layernorm, layer.post_attention_layernorm)]

    def refresh(self) -> None:
        """Rebuild the fused copies if a linear weight changed since (training, load_state_dict);
        norms and embeddings are read live."""
        if not self._snapshot.matches(self._watched_weights()):
            self._build()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache, output_hidden_states: bool = False):
        """``input_ids`` [n], ``position_ids`` [1, n], ``mask`` float [1, 1, n, past + n] or None
        when every token sees every cached and new token (a one-token step); appends to
        ``cache``. Returns (logits [n, V], hidden states tuple or None) with the
        Hugging Face conventions (hidden_states[0] the embeddings, hidden_states[-1] after the
        final norm)."""
        self.refresh()
        n = int(input_ids.numel())
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        x = self.inner.embed_tokens(input_ids.view(1, n))  # [1, n, H]
        cos, sin = self.inner.rotary_emb(x, position_ids)  # [1, n, hd]
        cos, sin = cos[0], sin[0]  # [n, hd]
        half = hd // 2
        hidden = [x[0]] if output_hidden_states else None
        h = x[0]  # [n, H]
        layers = cache.layers
        if (self.native is not None and n <= KERNEL_MAX and len(layers) == len(self.layers)
                and all(layer.is_initialized and layer.keys.numel() for layer in layers)):
            module, weights, sizes, eps, scale = self.native
            past = layers[0].keys.shape[-2]
            held = [_buffer(layer, n) for layer in layers]
            outputs = module.decoder_layers(
                h.contiguous(), cos.contiguous(), sin.contiguous(), mask, weights,
                [pair[0] for pair in held], [pair[1] for pair in held], past, sizes, eps, scale,
                output_hidden_states)
            for layer, (keys, values) in zip(layers, held):
                layer.keys = keys[..., : past + n, :]
                layer.values = values[..., : past + n, :]
            if hidden is not None:
                hidden += outputs
            return self._head(outputs[-1], hidden)
        for index, (layer, qkv, o, gate_up, down, eps1, eps2) in enumerate(self.layers):
            normed = self._norm(h, layer.input_layernorm.weight, eps1)
            proj = qkv(normed)  # [n, q + 2 kv]
            # queries and keys rotated together: [nh + nkv, n, hd]
            qk = proj[:, : self.q_size + self.kv_size].view(n, nh + nkv, hd).transpose(0, 1)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            q, k = qk[:nh], qk[nh:]
            v = proj[:, self.q_size + self.kv_size:].view(n, nkv, hd).transpose(0, 1)
            keys, values = _append(cache, index, k.unsqueeze(0), v.unsqueeze(0))
            if self.repeat_kv and nh != nkv:  # CUDA's fused kernels take no GQA with a mask
                keys = keys.repeat_interleave(nh // nkv, dim=1)
                values = values.repeat_interleave(nh // nkv, dim=1)
            attn = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys, values, attn_mask=mask,
                scale=layer.self_attn.scaling,
                enable_gqa=nh != nkv and not self.repeat_kv)  # [1, nh, n, hd]
            h = h + o(attn[0].transpose(0, 1).reshape(n, self.q_size))
            normed = self._norm(h, layer.post_attention_layernorm.weight, eps2)
            gu = gate_up(normed)
            h = h + down(F.silu(gu[:, : self.intermediate]) * gu[:, self.intermediate:])
            if hidden is not None:
                hidden.append(h)
        return self._head(h, hidden)

    def _norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm: with the kernel, the native one-pass rows (``rms_norm_rows``, which the
        native layer loop uses too, so both loops compute the same numbers)."""
        if self.kernel and h.dtype == torch.float32 and h.dim() == 2:
            return kernels.native().rms_norm_rows(h, weight, eps)
        return _rms_norm(h, weight, eps)

    def _head(self, h: torch.Tensor, hidden: list | None):
        final = self.inner.norm
        h = self._norm(h, final.weight, _eps(final))
        if hidden is not None:
            hidden[-1] = h
        return self.head(h), (tuple(hidden) if hidden is not None else None)


BUFFER = "_specdec_buffer"


def _buffer(layer, n: int):
    """The layer's key and value buffers with room for ``n`` more rows (moving its tensors into
    fresh buffers, with room to grow by doubling, when they are not views of one already)."""
    keys, values = layer.keys, layer.values
    length = keys.shape[-2]
    held = getattr(layer, BUFFER, None)
    if (held is None or keys.data_ptr() != held[0].data_ptr()
            or values.data_ptr() != held[1].data_ptr() or length + n > held[0].shape[-2]
            or keys.stride() != held[0].stride() or values.stride() != held[1].stride()):
        capacity = length + n + max(length + n, 256)
        held = tuple(t.new_empty(*t.shape[:-2], capacity, t.shape[-1]) for t in (keys, values))
        held[0][..., :length, :].copy_(keys)
        held[1][..., :length, :].copy_(values)
        setattr(layer, BUFFER, held)
    return held


def _append(cache, index: int, k: torch.Tensor, v: torch.Tensor):
    """``cache.update`` without re-copying the whole cache every forward: the layer's keys and
    values become views of a buffer with room to grow (doubling), and new rows are written in
    place. A layer whose tensors are not views of its buffer (after the stock prefill, or a
    commit that copied) is moved into a fresh buffer once."""
    layer = cache.layers[index]
    if not layer.is_initialized or not layer.keys.numel():
        return cache.update(k, v, index)
    length, n = layer.keys.shape[-2], k.shape[-2]
    held = _buffer(layer, n)
    held[0][..., length: length + n, :].copy_(k)
    held[1][..., length: length + n, :].copy_(v)
    layer.keys = held[0][..., : length + n, :]
    layer.values = held[1][..., : length + n, :]
    return layer.keys, layer.values


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: fused for float32 (the same result on CPU); for half types in its own order
    (normalise in float32, cast back, then scale), which ``F.rms_norm`` does not reproduce."""
    if h.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(h.dtype)


def _cat_bias(*modules: nn.Linear):
    """The fused product's bias: each module's bias (zeros where it has none), or None."""
    if all(m.bias is None for m in modules):
        return None
    if len(modules) == 1:
        return modules[0].bias.detach()
    return torch.cat([m.bias.detach() if m.bias is not None else
                      torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
                      for m in modules])


def turned_on(model: nn.Module, setting: bool | str | None = "auto") -> bool:
    """Whether ``setting`` (True, False, "auto"/None) turns the fast path on for ``model``;
    ``SPECDEC_FASTPATH=0|1`` overrides "auto". True on an unsupported model raises."""
    if setting is None or setting == "auto":
        env = os.environ.get(ENV, "").strip()
        if env and env not in ("0", "1"):
            raise ValueError(f"{ENV} must be 0 or 1, got {env!r}")
        if env == "0":
            return False
        reason = supported(model)
        if reason is not None:
            if env == "1":
                raise ValueError(f"{ENV}=1 but the fast path cannot run this model: {reason}")
            return False
        parameter = next(model.parameters())
        # auto: CPU (where per-op overhead dominates small forwards) and copies of modest size
        return parameter.device.type == "cpu" and extra_bytes(model) <= AUTO_MAX_BYTES
    if setting is True:
        reason = supported(model)
        if reason is not None:
            raise ValueError(f"fastpath=True but the fast path cannot run this model: {reason}; "
                             f"use fastpath='auto' or False")
        return True
    if setting is False:
        return False
    raise ValueError(f"fastpath must be True, False or 'auto', got {setting!r}")
