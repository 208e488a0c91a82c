"""Native CPU code for small forwards: a float32 kernel for skinny matrix products (the weight
products of a verify forward) and the lean forward's decoder-layer loop in one call.

Why: a tree verify multiplies a handful of token rows (1 to a few dozen) by every weight matrix of
the target. MKL's GEMM is tuned for large products; for 4 to 16 rows on this project's 2-core
Xeon it reaches 10-20 GB/s of weight traffic, against about 40 GB/s for one row (on an AVX2
EPYC it is slower still), so an 8-token verify of SmolLM2-135M cost 1.5 one-token steps even on
the lean forward. The products are bound
by streaming the weights, not by arithmetic, so a kernel that reads each weight once for all rows
can make 8 rows cost nearly what 1 row does.

`specdec/engine/csrc/cpu_kernels.cpp` does that: the weight is packed once into panels of 16 output
columns ([ceil(N/16), K, 16], one contiguous stream per panel); each task holds a tile of
accumulators in vector registers for the whole K loop (8 rows x 32 columns with AVX-512's 32
registers, 6 rows x 16 columns with AVX2's 16), so every weight vector loaded feeds several fused
multiply-adds; panels are split across ATen's intra-op threads. Panels may be float32 or bfloat16
(`pack(weight, torch.bfloat16)`: half the bytes to stream, widened to float32 in registers, used
for drafters' weights). It is compiled on first use with ``torch.utils.cpp_extension.load_inline``
for the host CPU (``-O3 -march=native -fopenmp``; the build directory is keyed by the source and
the host's CPU flags, `build_id()`, so a home directory shared between machines never runs a
binary built for another CPU, and latency profiles name the build they were measured with).

The same extension holds ``decoder_layers``: specdec/engine/fastpath.py's layer loop (norms, fused
products on the kernel, rotary embeddings, in-place cache rows, ``scaled_dot_product_attention``,
SwiGLU) as one native call, the same ATen operations in the same order as the Python loop, so it
computes the same numbers without ~20 Python-level operator calls per layer. The products go
through specdec/engine/backends.py (the ``"kernel"`` backend of `Linear`, and `linear` for
drafters' own small products).

Numerics: each output is the same dot product in float32, summed in a different order than MKL's
(differences of about 1e-6 relative, the kind a 1-token and an n-token product already differ
by). `available()` checks the built kernel against ``F.linear`` once; `Linear` falls back to
``F.linear`` wherever the kernel is not used.

Off switch: ``SPECDEC_KERNEL=0`` (then the fast path uses MKL's packed GEMM as before). When the
compiler or the build fails, `available()` is False and `load_error()` says why; nothing else
changes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

ENV = "SPECDEC_KERNEL"
LANES = 16
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
MAX_ROWS = 64  # the kernel is used for 1 to this many rows; above, F.linear (MKL's blocked GEMM)

_lock = threading.Lock()
_state: dict = {}


def _host_signature() -> str:
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def enabled() -> bool:
    """False when ``SPECDEC_KERNEL=0``; raises on any value other than 0 or 1."""
    env = os.environ.get(ENV, "").strip()
    if env and env not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {env!r}")
    return env != "0"


def build_id() -> str:
    """Which build this host gets: the kernel source's hash and the host CPU's signature (also the
    build directory's name), so what is measured with one build (a latency profile) is not
    reused with another."""
    digest = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]
    return f"{digest}_{_host_signature()}"


def missing_tool() -> str | None:
    """What the build needs and this host lacks (a C++ compiler: ``$CXX``, ``c++`` or ``g++``;
    ``ninja``), or None."""
    compilers = [os.environ.get("CXX", "").strip(), "c++", "g++"]
    if not any(name and shutil.which(name) for name in compilers):
        return "no C++ compiler on PATH (CXX, c++ or g++)"
    if shutil.which("ninja") is None:
        return "no ninja on PATH (pip install ninja)"
    return None


def _build():
    from torch.utils.cpp_extension import load_inline

    missing = missing_tool()
    if missing is not None:
        raise RuntimeError(f"cannot build the CPU kernels: {missing}")
    module = load_inline(f"specdec_skinny_{build_id()}", cpp_sources=SOURCE.read_text(),
                         functions=["skinny_linear", "decoder_layers", "rms_norm_rows"],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"],
                         extra_ldflags=["-fopenmp"], verbose=False)
    _check(module)
    return module


def _check(module) -> None:
    """The built kernel against ``F.linear`` on odd shapes (partial panels, bias, 1-20 rows,
    float32 and bfloat16 panels)."""
    generator = torch.Generator().manual_seed(0)
    for n_out, k in ((37, 19), (64, 33), (100, 8)):
        weight = torch.randn(n_out, k, generator=generator)
        bias = torch.randn(n_out, generator=generator)
        for dtype in PANEL_DTYPES:
            _check_one(module, weight, bias, dtype, generator)


def _check_one(module, weight, bias, dtype, generator) -> None:
    n_out, k = weight.shape
    panels = pack(weight, dtype)
    rounded = dequantized(weight, dtype)
    for rows in (1, 2, 5, 6, 7, 8, 9, 13, 20):
        x = torch.randn(rows, k, generator=generator)
        for b in (None, bias):
            got = module.skinny_linear(x, panels, b, n_out)
            want = F.linear(x, rounded, b)
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-4):
                raise RuntimeError(f"the built kernel disagrees with F.linear "
                                   f"({rows}x{k} by {n_out}x{k}, {dtype} panels): max "
                                   f"difference {float((got - want).abs().max()):.3g}")


def _module():
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as error:  # no compiler, no OpenMP, a failed check: fall back
                _state["module"] = None
                _state["error"] = f"{type(error).__name__}: {error}"
        return _state["module"]


def available() -> bool:
    """Whether the kernel is on (`SPECDEC_KERNEL` not 0) and built for this host (compiled on
    the first call; cached by torch's extension directory afterwards)."""
    if not enabled() or platform.system() == "Windows":
        return False
    return _module() is not None


def native():
    """The built extension module (``skinny_linear``, ``decoder_layers``); build only where
    `available()`."""
    module = _module()
    if module is None:
        raise RuntimeError(f"the CPU kernels are not available: {load_error()}")
    return module


def load_error() -> str | None:
    """Why the kernel could not be built, or None."""
    return _state.get("error")


PANEL_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
SCALE_ROWS = 4  # an int8 panel's trailing rows: its 16 float32 column scales, as bytes


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (values [N, K] int8, scales [N] float32) with
    ``values * scales[:, None]`` the weight to within half a step of each row's scale."""
    scales = weight.abs().amax(1).clamp_min(1e-12) / 127.0
    values = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return values, scales.float()


def dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 weight whose exact product ``pack(weight, dtype)`` panels compute."""
    if dtype == torch.int8:
        values, scales = quantize_int8(weight)
        return values.float() * scales[:, None]
    return weight.to(dtype).float()


def pack(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] float32 -> panels [ceil(N/16), K, 16] of ``dtype`` (rows beyond N are zeros).
    ``torch.bfloat16`` panels stream half the bytes; the kernel widens them to float32 and
    accumulates in float32, so the product is that of the bf16-rounded weight.
    ``torch.int8`` panels (a quarter of the bytes) hold `quantize_int8`'s values and, in
    `SCALE_ROWS` more rows, each column's scale: [P, K + 4, 16]; the kernel sums the exact
    products of the int8 values in float32 and scales the sums, up to summation order the
    product of `dequantized` (weight, int8)."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"pack wants a 2-D float32 CPU weight, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    if dtype not in PANEL_DTYPES:
        raise ValueError(f"panels are float32, bfloat16 or int8, not {dtype}")
    n_out, k = weight.shape
    panels = -(-n_out // LANES)
    values, scales = quantize_int8(weight) if dtype == torch.int8 else (weight, None)
    padded = weight.new_zeros(panels * LANES, k, dtype=dtype)
    padded[:n_out] = values
    laid = padded.view(panels, LANES, k).transpose(1, 2)
    if scales is None:
        return laid.contiguous()
    column_scales = weight.new_zeros(panels * LANES)
    column_scales[:n_out] = scales
    scale_rows = column_scales.view(torch.int8).view(panels, SCALE_ROWS, LANES)
    return torch.cat([laid, scale_rows], 1)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes ``x [..., K] @ weight.T``: float32 on CPU, no autograd, 1 to
    `MAX_ROWS` rows, the kernel built."""
    rows = x.numel() // max(1, x.shape[-1])
    return (x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.device.type == "cpu" and 1 <= rows <= MAX_ROWS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and available())
