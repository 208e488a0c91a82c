"""One linear layer, ``F.linear(x, weight, bias)``, through the backend picked for its weight.

Backends (each keeps one copy derived from the weight, made once, and takes the products of a
range of row counts; other row counts take ``F.linear`` on the weight itself):

- ``"kernel"``: the skinny-GEMM kernel's panels (specdec/engine/kernels.py), float32, bfloat16
  or int8 (``precision``), for 1 to `KERNEL_MAX` rows;
- ``"mkl"``: MKL's packed GEMM (``torch.ops.mkl._mkl_linear`` over a copy packed by
  ``_mkl_reorder_linear_weight``), for `PACK_MIN` to `PACK_MAX` rows (CPU float32, PyTorch with
  MKL);
- ``"transposed"``: ``x @ W^T`` with ``W^T`` stored contiguously, from `TRANSPOSED_MIN` rows;
- ``"torch"``: ``F.linear``.

The row ranges come from benchmarks/bench_gemm.py on this project's 2-core Xeon: below 4 rows
MKL's stock path streams the weights as fast as a packed or transposed copy; above 12 the packed
product is slower than the stock one; the kernel pays up to a few dozen rows.

`linear(x, weight, bias, precision)` is the call for products whose weights are not known in
advance (drafters' layers): in float32 inference on CPU with the kernel built it keeps the
weight's panels in a cache beside the weight (made on first use, remade when the weight changes,
`Snapshot`), else ``F.linear`` (training, autograd, other dtypes and devices).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from specdec.engine import kernels
from specdec.engine.snapshot import Snapshot

BACKENDS = ("kernel", "mkl", "transposed", "torch")
KERNEL_MIN = 1  # the skinny kernel from this many rows...
KERNEL_MAX = kernels.MAX_ROWS  # ...to this many
PACK_MIN = 4  # below this MKL's stock path streams the weights as fast
PACK_MAX = 12  # above this the packed product is slower than the stock one
TRANSPOSED_MIN = 4  # 1-3 rows: the stock path is as fast as the transposed copy
ROWS = {"kernel": (KERNEL_MIN, KERNEL_MAX), "mkl": (PACK_MIN, PACK_MAX),
        "transposed": (TRANSPOSED_MIN, float("inf")), "torch": (1, 0)}


def mkl_available() -> bool:
    """Whether this PyTorch has MKL's packed-weight GEMM."""
    return hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear") \
        and torch.backends.mkl.is_available()


def kernel_usable(weight: torch.Tensor) -> bool:
    """Whether the kernel may take ``weight``'s products: float32 on CPU, `kernels.ENV` not 0."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and kernels.enabled()


def mkl_usable(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_available()


class Linear:
    """``F.linear(x, weight, bias)`` for ``x [..., K]`` through ``backend`` (one of `BACKENDS`)
    in its row range, ``F.linear`` outside it. The copy is made from the weight as it is now:
    whoever holds a `Linear` checks its weights with a `Snapshot` and makes a new one when they
    change. ``precision``: the dtype of the kernel's panels (float32, bfloat16, int8)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "torch", precision: torch.dtype = torch.float32):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if precision != torch.float32 and backend != "kernel":
            raise ValueError(f"{precision} weights need the kernel backend, not {backend!r}")
        self.weight = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach()
        self.backend = backend
        self.n_out = int(weight.shape[0])
        self.low, self.high = ROWS[backend]
        self.copy = None  # the backend's copy of the weight (panels, packed, transposed)
        self._product = getattr(self, f"_{backend}")
        if backend == "kernel":
            self.module = kernels.native()
            self.copy = kernels.pack(self.weight, precision)
            self.kernel_bias = None if bias is None else self.bias.float().contiguous()
        elif backend == "mkl":
            self.copy = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, PACK_MAX)
        elif backend == "transposed":
            self.copy = self.weight.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.n_out)
        m = x.shape[0]
        if self.low <= m <= self.high:
            return self._product(x, m)
        return F.linear(x, self.weight, self.bias)

    def _kernel(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return self.module.skinny_linear(x, self.copy, self.kernel_bias, self.n_out)

    def _mkl(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self.copy, self.weight, self.bias, m)

    def _transposed(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return x @ self.copy if self.bias is None else torch.addmm(self.bias, x, self.copy)

    def _torch(self, x: torch.Tensor, m: int) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def packing_works(weight: torch.Tensor) -> bool:
    """MKL packs a weight for one batch size; this checks, on ``weight``, that the packed copy
    gives the stock product for every row count the ``"mkl"`` backend sends through it."""
    packed = Linear(weight, None, "mkl")
    generator = torch.Generator().manual_seed(0)
    for m in range(PACK_MIN, PACK_MAX + 1):
        x = torch.randn(m, weight.shape[1], generator=generator, dtype=weight.dtype)
        want = F.linear(x, weight)
        got = packed(x)
        scale = float(want.abs().max()) + 1e-6
        if got.shape != want.shape or not float((got - want).abs().max()) <= 1e-4 * scale:
            return False
    return True


def choose(weight: torch.Tensor, kernel: bool | None = None, pack: bool | None = None,
           probe: torch.Tensor | None = None) -> str:
    """The backend for products of weights like ``weight``: the kernel, else MKL packing, else
    ``"torch"``. ``kernel`` / ``pack``: None wherever it works (the kernel only where it builds;
    packing only where it passes `packing_works` on ``probe``), True to insist (raising with
    the reason where it cannot), False to refuse."""
    if kernel is None:
        kernel = kernel_usable(weight) and kernels.available()
    elif kernel:
        if not kernel_usable(weight):
            raise ValueError("the skinny kernel needs float32 weights on CPU "
                             f"(and {kernels.ENV} not 0)")
        if not kernels.available():
            raise ValueError(f"the skinny kernel could not be built: {kernels.load_error()}")
    if pack and not mkl_usable(weight):
        raise ValueError("MKL packing needs float32 weights on CPU and PyTorch built with MKL")
    if kernel:
        return "kernel"  # one fast copy of each weight is enough
    if pack is None:
        pack = mkl_usable(weight)
    if pack and probe is not None and not packing_works(probe):
        pack = False
    return "mkl" if pack else "torch"


# (id(weight), precision) -> (Snapshot of weight and bias, Linear, weakref dropping the entry):
# tensors compare elementwise, so they cannot be the keys of a WeakKeyDictionary
_CACHE: dict[tuple[int, torch.dtype], tuple] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           precision: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the kernel where it pays: float32 on CPU, no
    autograd, 1 to `KERNEL_MAX` rows (``x [..., K]`` flattened), the kernel built; else
    ``F.linear``. ``precision=torch.bfloat16`` (or ``torch.int8``) keeps the weight's panels in
    that dtype: the product of the rounded weight accumulated in float32, streaming half (a
    quarter) of the bytes, for products whose precision only moves how often they are right
    (drafters)."""
    if not kernels.applies(x, weight):
        return F.linear(x, weight, bias)
    key = (id(weight), precision)
    sources = (weight,) if bias is None else (weight, bias)
    held = _CACHE.get(key)
    if held is None or not held[0].matches(sources):
        drop = weakref.ref(weight, lambda _, key=key: _CACHE.pop(key, None))
        held = _CACHE[key] = (Snapshot(sources), Linear(weight, bias, "kernel", precision), drop)
    return held[1](x)
