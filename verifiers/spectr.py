"""SpecTr's K-SEQ: sequential multi-draft selection with an inflated acceptance ratio.

For k children drawn i.i.d. from the draft distribution, K-SEQ walks them in drafting order and
accepts child x with probability min(1, target(x) / (rho * draft(x))); if all are rejected it
emits a recovered token from

    residual = (target - beta(rho) * min(draft, target / rho)) / (1 - alpha(rho))^k,
    alpha(rho) = sum_x min(draft(x), target(x) / rho),
    beta(rho)  = (1 - (1 - alpha)^k) / alpha      (the expected number of tries per acceptance).

The accepted mass on token x is exactly beta * min(draft(x), target(x) / rho), so the output is
distributed as the target iff that never exceeds target(x), i.e. iff beta(rho) <= rho. rho = k is
always valid (beta <= k); rho = 1 (plain recursive acceptance without residual updates) is valid
only for k = 1. The acceptance 1 - (1 - alpha(rho))^k falls as rho grows, so K-SEQ takes the
smallest valid rho: we bisect on [1, k] keeping the upper end valid, so the rho used always
satisfies beta(rho) <= rho (lossless) and is within ``tolerance`` of the crossing. SpecTr proves
this reaches at least (1 - 1/e) of the optimal transport acceptance.

Only ``"iid"`` children are supported: the analysis needs identically distributed drafts.

References:
    Sun, Suresh, Ro, Beirami, Jain, Yu. "SpecTr: Fast Speculative Decoding via Optimal
        Transport". NeurIPS 2023. arXiv:2310.15141. (the K-SEQ algorithm.)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from specdec.sampling import sample, uniform
from verifiers.base import check_sampling


def _alpha_beta(target_probs, draft_probs, rho: float, k: int) -> tuple[float, float]:
    alpha = float(torch.minimum(draft_probs, target_probs / rho).sum())
    if alpha <= 0:
        return 0.0, float(k)
    return alpha, (1.0 - (1.0 - alpha) ** k) / alpha


def kseq_rho(target_probs, draft_probs, k: int, tolerance: float = 1e-9) -> float:
    """The smallest rho in [1, k] (to ``tolerance``) with beta(rho) <= rho."""
    target_probs, draft_probs = target_probs.double(), draft_probs.double()
    if k == 1 or _alpha_beta(target_probs, draft_probs, 1.0, k)[1] <= 1.0:
        return 1.0
    invalid, valid = 1.0, float(k)
    while valid - invalid > tolerance:
        middle = 0.5 * (invalid + valid)
        if _alpha_beta(target_probs, draft_probs, middle, k)[1] <= middle:
            valid = middle
        else:
            invalid = middle
    return valid


def kseq_acceptance(target_probs, draft_probs, k: int) -> float:
    """Probability that K-SEQ accepts one of k i.i.d. drafts: 1 - (1 - alpha(rho))^k."""
    rho = kseq_rho(target_probs, draft_probs, k)
    alpha, _ = _alpha_beta(target_probs.double(), draft_probs.double(), rho, k)
    return 1.0 - (1.0 - alpha) ** k


class SpecTrRule:
    lossless: ClassVar[bool] = True
    supported: ClassVar[tuple[str, ...]] = ("iid",)

    def _prepare(self, target_probs, draft_probs, k, sampling):
        check_sampling(self, sampling, self.supported)
        if draft_probs is None:
            raise ValueError("SpecTr needs draft_probs: the distribution the i.i.d. children came from")
        target_probs = target_probs.double()  # [V]
        draft_probs = draft_probs.double()  # [V]
        rho = kseq_rho(target_probs, draft_probs, k)
        accept_scaled = torch.minimum(draft_probs, target_probs / rho)  # [V] min(q, p / rho)
        alpha, beta = _alpha_beta(target_probs, draft_probs, rho, k)
        leftover = (target_probs - beta * accept_scaled).clamp_(min=0)  # [V], >= 0 up to rounding
        residual_probs = leftover / leftover.sum() if leftover.sum() > 0 else target_probs
        return target_probs, draft_probs, rho, residual_probs

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        target, draft, rho, residual_probs = self._prepare(target_probs, draft_probs,
                                                           len(draft_tokens), sampling)
        for index, token in enumerate(draft_tokens):
            if uniform(generator, target.device) * rho * float(draft[token]) < float(target[token]):
                return index, token
        return -1, sample(residual_probs.to(target_probs.dtype), generator)

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        target, draft, rho, residual_probs = self._prepare(target_probs, draft_probs,
                                                           len(draft_tokens), sampling)
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        still_rejecting = 1.0
        for index, token in enumerate(draft_tokens):
            accept = min(1.0, float(target[token]) / (rho * float(draft[token])))
            accept_probs[index] = still_rejecting * accept
            still_rejecting *= 1.0 - accept
        return accept_probs, still_rejecting * residual_probs
