"""Quantized self-drafting: the target drafts for itself with its weights in lower precision.

The draft model is the target model run with int8 or bfloat16 weights (QSpec's idea: a
low-precision pass of the same weights drafts, the full-precision pass verifies). On a float32
target the two models' greedy choices almost always agree, so a chain of ``depth`` drafted tokens
is usually accepted whole (tau close to ``depth + 1``), while a draft forward streams a quarter
(int8) or half (bfloat16) of the weight bytes of a target forward. The verifier still decides every token, so with a lossless verifier the
output is the float32 target's, exactly.

How the low-precision copy is made (``precision="auto"`` takes the first that applies):
- CPU float32 Llama-family target with the skinny kernel (specdec/engine/kernels.py): no copy of the
  model, only the kernel's weight panels, ``int8`` (per-row symmetric int8, a quarter of the
  bytes) or ``bfloat16`` (half): `specdec.engine.FastForward` with ``panel_dtype``, the product
  of the rounded weight accumulated in float32; norms, embeddings and attention stay float32.
- any other float32 target (GPU, other architectures, no kernel): a bfloat16 copy of the model,
  run by the stock forward (``precision="bfloat16"``; int8 exists only as kernel panels).
- a target already in half precision has no cheaper copy here: the drafter says so.

Everything else (own KV cache, chain or tree, greedy or sampled children, the draft distribution
recorded for the verifier) is `drafters.small_lm.SmallLMDrafter`'s. The draft is not free: each
drafted token costs one low-precision forward (on the embedded model about 0.44 of a float32
one-token forward with int8 panels, 0.60 with bfloat16), so unlike a Medusa head this pays only
because nearly every drafted token is accepted.

References:
    Zhao, Lu, Wang, Kong, Wu. "QSpec: Speculative Decoding with Complementary Quantization
    Schemes". EMNLP 2025. arXiv:2410.11305.
    Zhang et al. "Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative
    Decoding". ACL 2024. arXiv:2309.08168.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from drafters.small_lm import SmallLMDrafter
from specdec.state import DecodingState
from specdec.target import TreeForward

PRECISIONS = {"bfloat16": torch.bfloat16, "int8": torch.int8}
CHOICES = ("auto", *PRECISIONS)


class QuantizedSelfDrafter(SmallLMDrafter):
    """``depth`` tokens drafted per step by the target itself in ``precision`` ("auto",
    "int8" or "bfloat16"); ``branching``, ``mode`` and ``max_frontier`` as for `SmallLMDrafter`.
    ``mode="auto"`` (default) drafts the top token when decoding greedily and samples i.i.d.
    from the warped draft distribution when sampling: then the exact verifier accepts with
    probability min(1, p/q), nearly always here, where top-1 drafts would be accepted only as
    often as the target samples its own top token (tau 2.61 against 6.40 on MT-Bench at
    temperature 0.7)."""

    def __init__(self, depth: int = 6, precision: str = "auto",
                 branching: int | Sequence[int] = 1, mode: str = "auto",
                 max_frontier: int | None = None):
        if precision not in CHOICES:
            raise ValueError(f"precision must be one of {CHOICES}, got {precision!r}")
        super().__init__(None, depth=depth, branching=branching,
                         mode="greedy" if mode == "auto" else mode, max_frontier=max_frontier)
        self.auto_mode = mode == "auto"
        self.precision = precision
        self._target = None
        self._fast = None  # the target's FastForward with low-precision panels, if used
        # once begun: e.g. "int8 kernel panels" or "bfloat16 model copy"
        self.how: str | None = None

    def begin(self, state: DecodingState) -> None:
        if state.target is None:
            raise ValueError("quantized self-drafting needs the target model in the decoding "
                             "state (speculative_generate passes it)")
        if state.target is not self._target:  # one low-precision copy per target
            self._target = state.target
            self.model, self.how = self._low_precision(state.target)
        if self.auto_mode:
            self.mode = "greedy" if state.sampling.greedy else "iid"
        super().begin(state)

    def _low_precision(self, target):
        from specdec.engine import fastpath, kernels

        weight = next(target.parameters())
        if weight.dtype != torch.float32:
            raise ValueError(
                f"the target is already in {weight.dtype}: quantized self-drafting drafts with a "
                f"lower-precision copy of a float32 target, which would not be cheaper here; "
                f"load the target in float32, or use another drafter")
        if weight.device.type != "cpu":
            no_panels = f"the target is on {weight.device}"
        elif not kernels.enabled():
            no_panels = f"{kernels.ENV}=0"
        else:
            no_panels = fastpath.supported(target) or (
                None if kernels.available() else f"the kernel did not build: {kernels.load_error()}")
        panels = no_panels is None
        precision = self.precision
        if precision == "auto":
            precision = "int8" if panels else "bfloat16"
        dtype = PRECISIONS[precision]
        if panels:
            self._fast = fastpath.FastForward(target, panel_dtype=dtype)
            return target, f"{precision} kernel panels"
        if dtype == torch.int8:
            raise ValueError(f"int8 self-drafting runs only on the CPU kernel's panels of a "
                             f"Llama-family target, unavailable here ({no_panels}): use "
                             f"precision='bfloat16'")
        self._fast = None
        return copy.deepcopy(target).to(dtype).eval(), f"{precision} model copy"

    def _make_forward(self, state: DecodingState) -> TreeForward:
        return TreeForward(self.model, fastpath=self._fast if self._fast is not None else "auto")
