"""The one wall clock the loop, the eval and the cost model read.

On CUDA the device is synchronized first, so a reading includes every kernel queued before it;
on the CPU it is ``time.perf_counter()``.
"""

from __future__ import annotations

import time

import torch


def clock(device: torch.device | str | None = None) -> float:
    """Seconds from ``time.perf_counter()``, after a synchronize when ``device`` is CUDA."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
