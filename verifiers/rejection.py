"""Exact speculative sampling: recursive rejection over a node's children.

For one child this is the speculative sampling of Leviathan et al. 2023 ("Fast Inference from
Transformers via Speculative Decoding") and Chen et al. 2023 ("Accelerating Large Language Model
Decoding with Speculative Sampling"): accept draft token x ~ q with probability
min(1, target(x) / q(x)), otherwise emit a recovered token from norm(max(0, target - q)).

For k siblings the rule recurses, replacing the target by the residual after each rejection:

- ``"iid"`` children (SpecInfer, Miao et al. 2024, multi-step speculative sampling): every child
  was drawn from the same q, so each round compares the current residual with q.
- ``"without_replacement"`` children (Recursive Speculative Decoding, Jeon et al. 2024): child i
  was drawn from q with the earlier children removed and renormalised, so round i uses that
  conditional draft distribution.
- ``"deterministic"`` children (top-k as in EAGLE-2, Li et al. 2024; n-gram lookups): q is a point
  mass on the child, so the child is accepted with probability residual(x) and a rejection zeroes x.

In every case the emitted token is distributed exactly as ``target_probs`` (tests/test_lossless.py
checks this by enumeration).

References:
    Leviathan, Kalman, Matias. ICML 2023. arXiv:2211.17192.
    Chen et al. 2023. arXiv:2302.01318.
    Miao et al. "SpecInfer". ASPLOS 2024. arXiv:2305.09781.
    Jeon et al. "Recursive Speculative Decoding". 2024. arXiv:2402.14160.
    Li et al. "EAGLE-2". EMNLP 2024. arXiv:2406.16858.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from specdec.sampling import accept, residual, sample
from verifiers.base import check_sampling


def _draft_prob(draft_probs: torch.Tensor, token: int) -> float:
    prob = float(draft_probs[token])
    if prob <= 0:
        raise ValueError(
            f"draft token {token} has probability 0 under its draft_probs: a sampled child must "
            f"come from the distribution given for its parent (check the drafter's warping)"
        )
    return prob


class ExactRule:
    lossless: ClassVar[bool] = True
    supported: ClassVar[tuple[str, ...]] = ("iid", "without_replacement", "deterministic")

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        check_sampling(self, sampling, self.supported)
        residual_probs = target_probs  # [V] target, or its residual after the rejections so far
        device = target_probs.device
        if sampling == "deterministic":
            for index, token in enumerate(draft_tokens):
                if accept(float(residual_probs[token]), generator, device):
                    return index, token
                residual_probs = residual_probs.clone()
                residual_probs[token] = 0.0
                residual_probs = residual_probs / residual_probs.sum()
            return -1, sample(residual_probs, generator)

        if draft_probs is None:
            raise ValueError(f"sampling={sampling!r} children need draft_probs (the q they came from)")
        child_probs = draft_probs  # [V] distribution the current child was drawn from
        for index, token in enumerate(draft_tokens):
            q = _draft_prob(child_probs, token)
            if accept(min(1.0, float(residual_probs[token]) / q), generator, device):
                return index, token
            residual_probs = residual(residual_probs, child_probs)
            if sampling == "without_replacement":
                child_probs = child_probs.clone()
                child_probs[token] = 0.0
                total = child_probs.sum()
                if total <= 0:  # q's support exhausted: no further child can follow
                    break
                child_probs = child_probs / total
        return -1, sample(residual_probs, generator)

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """Exactly what `select` does given these drafts, without randomness.

        Returns ``(accept_probs  # [k] probability that child i is accepted,
        recovered_probs  # [V] probability of rejecting every child and emitting each token)``;
        together they sum to one. The slow reference the tests enumerate over.
        """
        check_sampling(self, sampling, self.supported)
        residual_probs = target_probs.double()  # [V]
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)  # [k]
        still_rejecting = 1.0  # probability that every child so far was rejected
        if sampling == "deterministic":
            for index, token in enumerate(draft_tokens):
                accept = float(residual_probs[token])
                accept_probs[index] = still_rejecting * accept
                still_rejecting *= 1.0 - accept
                if still_rejecting <= 0:
                    return accept_probs, torch.zeros_like(residual_probs)
                residual_probs = residual_probs.clone()
                residual_probs[token] = 0.0
                residual_probs = residual_probs / residual_probs.sum()
            return accept_probs, still_rejecting * residual_probs

        if draft_probs is None:
            raise ValueError(f"sampling={sampling!r} children need draft_probs (the q they came from)")
        child_probs = draft_probs.double()  # [V]
        for index, token in enumerate(draft_tokens):
            q = _draft_prob(child_probs, token)
            accept = min(1.0, float(residual_probs[token]) / q)
            accept_probs[index] = still_rejecting * accept
            still_rejecting *= 1.0 - accept
            residual_probs = residual(residual_probs, child_probs)
            if sampling == "without_replacement":
                child_probs = child_probs.clone()
                child_probs[token] = 0.0
                total = child_probs.sum()
                if total <= 0:
                    break
                child_probs = child_probs / total
        return accept_probs, still_rejecting * residual_probs
