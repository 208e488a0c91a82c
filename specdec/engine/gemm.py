"""A faster matrix layout for the target's tree forwards on CPU.

A verify forward multiplies ``n`` token rows (the root plus the draft tree, typically 2 to 32) by
every weight matrix of the target. On CPU, PyTorch's float32 ``nn.Linear`` computes ``x @ W^T``
through MKL with a transposed operand, and for such skinny products that path is slow: on the
2-core Xeon (AVX-512) this project is measured on, a [8, 576] x [576, 1536] product takes 0.36 ms
as ``F.linear`` and 0.18 ms as ``x @ W_t`` with ``W_t = W^T`` stored contiguously, and the
49152-row LM head 26 ms against 15 ms; they agree for 1 to 3 rows. Over SmolLM2-135M's 211 linear
layers, on one thread, a 12-token verify forward goes from 150 ms to 113 ms and a 64-token one
from 219 ms to 185 ms; on two threads the two layouts are within timing noise
(``benchmarks/bench_gemm.py``; see docs/engine.md).

`TransposedLinears` keeps a contiguous transposed copy of each plain ``nn.Linear`` weight (a
`specdec.engine.backends.Linear` with the ``"transposed"`` backend) and, only inside ``active(n)``
with ``n >= MIN_TOKENS`` (4), routes the module's forward through it;
outside (and for forwards of 1-3 tokens, where the stock path is as fast) the module runs its own
forward, so ``model.generate`` and everything else
is untouched. The copies cost one extra set of linear weights in memory, so ``"auto"`` turns the
layout on only for float32 models on CPU whose linear weights take at most
`AUTO_MAX_BYTES`. Outputs differ from the stock path only by float32 summation order (about 1e-5
in the logits), the same kind of difference as between a 1-token and an n-token forward.
A module whose ``forward`` is already replaced on the instance (e.g. accelerate's offload hooks)
is left alone, and a weight that changed since its copy was made (training, ``load_state_dict``;
`specdec.engine.snapshot.Snapshot`) is copied again. `specdec.engine.for_model` holds one
`TransposedLinears` per model.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from specdec.engine.backends import TRANSPOSED_MIN, Linear
from specdec.engine.snapshot import Snapshot

AUTO_MAX_BYTES = 4 << 30
# below this many rows MKL's stock path is as fast or faster (1-3 rows: 0.12-0.13 ms against
# 0.15-0.16 ms for the [576, 1536] product above), from 4 rows on the transposed copy wins
MIN_TOKENS = TRANSPOSED_MIN
ENV = "SPECDEC_TRANSPOSED_GEMM"  # "0" / "1" overrides "auto" (e.g. for an ablation)


class TransposedLinears:
    """The plain ``nn.Linear`` layers of ``model`` with transposed weight copies."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules()
                        if type(m) is nn.Linear and "forward" not in m.__dict__]
        self._copies: dict[int, tuple[Snapshot, Linear]] = {}

    def _transposed(self, module: nn.Linear) -> Linear:
        sources = (module.weight,) if module.bias is None else (module.weight, module.bias)
        held = self._copies.get(id(module))
        if held is None or not held[0].matches(sources):
            held = self._copies[id(module)] = (Snapshot(sources),
                                               Linear(module.weight, module.bias, "transposed"))
        return held[1]

    @contextlib.contextmanager
    def active(self, n_tokens: int):
        """Route the linears through the transposed copies for a forward over ``n_tokens``
        (``>= MIN_TOKENS``; fewer: the stock path)."""
        if n_tokens < MIN_TOKENS:
            yield
            return
        patched = []
        try:
            for module in self.modules:
                if "forward" in module.__dict__:  # someone else's hook arrived since: theirs
                    continue
                module.forward = self._transposed(module)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward


def turned_on(model: nn.Module, setting: bool | str | None = "auto") -> bool:
    """Whether ``setting`` (True, False, "auto" or None = "auto") turns the layout on for
    ``model``; the ``SPECDEC_TRANSPOSED_GEMM`` environment variable overrides "auto"."""
    if setting is None or setting == "auto":
        env = os.environ.get(ENV, "").strip()
        if env in ("0", "1"):
            return env == "1"
        if env:
            raise ValueError(f"{ENV} must be 0 or 1, got {env!r}")
        parameter = next(model.parameters())
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            return False
        size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                   if type(m) is nn.Linear)
        return size <= AUTO_MAX_BYTES
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"transposed_gemm must be True, False or 'auto', got {setting!r}")
