"""Whether the tensors a derived copy was made from have changed since: the engine's one
staleness check.

The engine keeps copies derived from weights (kernel panels, fused q/k/v and gate/up matrices,
MKL-packed or transposed weights). A copy is stale when one of its source tensors was

- replaced (``module.weight = ...``, ``load_state_dict(assign=True)``): another tensor object;
- moved (``model.to(...)``, which swaps ``.data``): another storage address;
- modified in place (a training step, ``load_state_dict``, ``weight.mul_(...)``): PyTorch's
  in-place write counter ``Tensor._version`` has moved.

`Snapshot` records those three for a list of tensors, holding them only weakly (a cache entry
never keeps a dead weight alive, and a freed tensor's id cannot be mistaken for a new one's).
"""

from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch


class Snapshot:
    """The identity, storage address and in-place version of some tensors, as they were."""

    __slots__ = ("_refs", "_marks")

    def __init__(self, tensors: Iterable[torch.Tensor]):
        tensors = list(tensors)
        self._refs = [weakref.ref(t) for t in tensors]
        self._marks = [(t.data_ptr(), t._version) for t in tensors]

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` (as read now, in the same order) are the recorded ones, unmoved
        and unmodified. Cheap: it runs before every forward of a model's fast path."""
        if len(tensors) != len(self._refs):
            return False
        for tensor, ref, (pointer, version) in zip(tensors, self._refs, self._marks):
            if ref() is not tensor or tensor._version != version or tensor.data_ptr() != pointer:
                return False
        return True
