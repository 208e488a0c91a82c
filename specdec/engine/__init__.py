"""The CPU engine: how the target's verify forwards and the drafters' products are computed.

- `linear` (specdec/engine/backends.py): ``F.linear(x, weight, bias)`` for any caller, through the
  skinny-GEMM kernel where it pays (float32 CPU inference, 1 to 64 rows), else ``F.linear``;
  `Linear`: one weight's product through a backend picked once (``"kernel"`` panels of float32,
  bfloat16 or int8; ``"mkl"`` packed; ``"transposed"``; ``"torch"``).
- `Snapshot` (specdec/engine/snapshot.py): the one check of whether the weights a copy was made
  from were replaced, moved or modified in place since.
- `for_model` / `forward_kind`: which verify forward a model gets, the lean Llama-family forward
  (`FastForward`, specdec/engine/fastpath.py), the stock forward with transposed weight copies
  (`TransposedLinears`, specdec/engine/gemm.py) or the stock forward, and one shared instance
  per model.
- specdec/engine/kernels.py: the native code (specdec/engine/csrc/cpu_kernels.cpp), built on
  first use; specdec/engine/cost.py: the cost-aware tree budget, priced by measured verify
  latencies of these forwards.

Environment: ``SPECDEC_FASTPATH``, ``SPECDEC_TRANSPOSED_GEMM`` and ``SPECDEC_KERNEL`` (0 or 1)
override the "auto" choices.
"""

from __future__ import annotations

import weakref

from torch import nn

from specdec.engine import fastpath, gemm, kernels
from specdec.engine.fastpath import FastForward
from specdec.engine.gemm import TransposedLinears
from specdec.engine.backends import BACKENDS, Linear, linear
from specdec.engine.snapshot import Snapshot

__all__ = ["BACKENDS", "FastForward", "Linear", "Snapshot", "TransposedLinears", "for_model",
           "forward_kind", "kernels", "linear"]

_SHARED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def forward_kind(model: nn.Module, fastpath_setting: bool | str | None = "auto",
                 transposed_gemm: bool | str | None = "auto") -> str:
    """``"fast"``, ``"transposed"`` or ``"stock"``: the verify forward ``model`` gets with these
    settings (True, False or "auto"/None each; the fast path first, the transposed layout only
    without it). Bad settings raise ValueError saying what to change."""
    if fastpath.turned_on(model, fastpath_setting):
        return "fast"
    if gemm.turned_on(model, transposed_gemm):
        return "transposed"
    return "stock"


def for_model(model: nn.Module, fastpath_setting: bool | str | None = "auto",
              transposed_gemm: bool | str | None = "auto"
              ) -> FastForward | TransposedLinears | None:
    """The model's shared `FastForward` or `TransposedLinears` (copies made once per model), or
    None for the stock forward (`forward_kind`)."""
    kind = forward_kind(model, fastpath_setting, transposed_gemm)
    if kind == "stock":
        return None
    shared = _SHARED.setdefault(model, {})
    if kind not in shared:
        shared[kind] = FastForward(model) if kind == "fast" else TransposedLinears(model)
    return shared[kind]
