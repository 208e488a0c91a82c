"""Logit warping and sampling, applied identically to target and draft distributions.

Order as in Hugging Face ``generate``: temperature, then top-k, then top-p (nucleus: the smallest
set of most likely tokens whose mass reaches ``top_p``; at least one token is kept).
``temperature == 0`` means greedy: the warped distribution is one-hot at the argmax (first index on
ties, as ``torch.argmax``), so greedy decoding is the special case of sampling that every rule
already handles. All randomness comes from an explicit ``torch.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution(s): [..., V] logits -> [..., V] probabilities (float32, or float64
        for float64 logits)."""
        if logits.dtype != torch.float64:
            logits = logits.float()
        if self.greedy:
            out = torch.zeros_like(logits)
            return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop_sorted = mass_before >= self.top_p  # the top token always has mass_before 0
            drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a [V] distribution. A point mass (greedy decoding's one-hot rows) returns
    its token without a draw: ``multinomial`` over a 49k vocabulary costs about 1 ms on CPU."""
    top, token = probs.max(-1)
    if float(top) == 1.0:
        return int(token)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def uniform(generator: torch.Generator | None, device: torch.device | str = "cpu") -> float:
    """One U(0, 1) draw from ``generator``."""
    return float(torch.rand((), generator=generator, device=device).item())


def accept(probability: float, generator: torch.Generator | None,
           device: torch.device | str = "cpu") -> bool:
    """True with the given probability (a Bernoulli draw from ``generator``)."""
    return uniform(generator, device) < probability


def gumbel_top_k(probs: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k distinct tokens drawn sequentially without replacement from ``probs``, in draw order.

    Adding i.i.d. Gumbel noise to log-probabilities and taking the top k is equivalent to drawing
    k times without replacement (Kool et al. 2019, "Stochastic Beams and Where to Find Them").
    """
    support = int((probs > 0).sum())
    k = min(k, support)
    u = torch.rand(probs.shape, generator=generator, device=probs.device).clamp_(min=1e-20)
    scores = probs.log() - torch.log(-torch.log(u))
    return torch.topk(scores, k).indices.tolist()


def residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, target - draft)); falls back to ``target_probs`` when they coincide.

    When the two are equal the acceptance probability is one, so the fallback is never sampled
    from in exact arithmetic; it only guards against rounding.
    """
    diff = (target_probs - draft_probs).clamp_(min=0)
    total = diff.sum()
    if total <= 1e-12:
        return target_probs
    return diff / total
