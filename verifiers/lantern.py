"""LANTERN: relaxed speculative decoding over latent-space neighbourhoods.

In image (and many text) vocabularies several tokens are near-interchangeable, and a drafter that
picks one where the target preferred its neighbour is rejected for nothing. LANTERN lets a draft
token borrow target mass from its latent neighbours (nearest tokens in an embedding matrix or VQ
codebook, cosine similarity), with a total-variation budget on how far the result may move.

This rule makes that precise as a *relaxed target* followed by exact verification:

1. receivers: tokens the drafter over-proposes, deficit = draft(x) - target(x) > 0 (the
   ``max_receivers`` likeliest under the drafter; for ``"deterministic"`` children: the children,
   deficit 1 - target(x));
2. donors: each receiver's ``neighbours`` nearest tokens in latent space that the target
   under-covers, surplus = target(z) - draft(z) > 0 (any non-child token for deterministic);
3. greedily, receivers in order of draft probability and donors in order of similarity, move
   min(deficit, surplus, budget left) of target mass from donor to receiver, until ``delta`` of
   mass has moved (LANTERN's TV budget);
4. verify the children against the relaxed target with exact recursive rejection
   (`verifiers.rejection.ExactRule`), which is lossless *for the relaxed target*.

So the emitted token is distributed exactly as the relaxed target, whose total-variation distance
to the true target is the moved mass, at most ``delta`` (tests/test_verifiers_lossy.py checks this
by enumeration), and mass only ever moves between latent neighbours. Because every unit moved goes
from an under-drafted donor to an over-drafted receiver, each unit raises the single-draft
acceptance sum_x min(draft, target) by exactly one unit: acceptance = exact acceptance + moved mass.

LANTERN++ variant (``multiplier=lam``): LANTERN++ observes that boosting tokens the target itself
finds unlikely hurts quality, and bounds the relaxation relative to the target instead of only in
total: here a receiver may grow to at most ``lam * target(x)`` (so tokens with zero target mass are
never boosted), on top of the TV budget.

What it relaxes: exactness, by at most ``delta`` in total variation per node.

References:
    Jang et al. "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative
        Decoding". ICLR 2025. arXiv:2410.03355.
    Park, Jang, Kim, Kundu, Yang. "LANTERN++: Enhancing Relaxed Speculative Decoding with Static
        Tree Drafting for Visual Auto-regressive Models". 2025. arXiv:2502.06352.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from verifiers.rejection import ExactRule


class LanternRule:
    lossless: ClassVar[bool] = False
    supported: ClassVar[tuple[str, ...]] = ExactRule.supported

    def __init__(self, embeddings: torch.Tensor, k: int = 8, delta: float = 0.1,
                 multiplier: float | None = None, max_receivers: int = 32):
        """``embeddings  # [V, d]``: token embeddings or a codebook, row i for token i."""
        if embeddings is None or embeddings.dim() != 2:
            raise ValueError("LANTERN needs an embedding matrix / codebook of shape [V, d]")
        if not 0 <= delta <= 1:
            raise ValueError(f"delta is a total-variation budget in [0, 1], got {delta}")
        if multiplier is not None and multiplier < 1:
            raise ValueError(f"multiplier (LANTERN++) must be >= 1, got {multiplier}")
        self.unit_embeddings = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
        self.k, self.delta, self.multiplier = k, delta, multiplier
        self.max_receivers = max_receivers
        self._neighbours: dict[int, list[int]] = {}  # token -> nearest tokens, nearest first
        self._exact = ExactRule()

    def neighbours(self, token: int) -> list[int]:
        """The ``k`` latent nearest neighbours of ``token`` (cosine similarity), nearest first."""
        if token not in self._neighbours:
            similarity = self.unit_embeddings @ self.unit_embeddings[token]  # [V]
            similarity[token] = -float("inf")
            count = min(self.k, similarity.numel() - 1)
            self._neighbours[token] = torch.topk(similarity, count).indices.tolist()
        return self._neighbours[token]

    def relaxed_target(self, target_probs, draft_tokens, draft_probs, sampling) -> torch.Tensor:
        """[V] the target with at most ``delta`` of mass moved between latent neighbours."""
        relaxed = target_probs.double().clone()  # [V]
        if sampling == "deterministic":
            receivers = list(dict.fromkeys(draft_tokens))
            deficit = {x: 1.0 - float(relaxed[x]) for x in receivers}
            cover = torch.zeros_like(relaxed)  # [V] children never donate
            cover[receivers] = float("inf")
        else:
            if draft_probs is None:
                raise ValueError(f"sampling={sampling!r} children need draft_probs")
            cover = draft_probs.double()  # [V]
            likeliest = torch.topk(cover, min(self.max_receivers, cover.numel())).indices.tolist()
            receivers = [x for x in likeliest if cover[x] > relaxed[x]]
            deficit = {x: float(cover[x] - relaxed[x]) for x in receivers}
        budget = self.delta
        for receiver in receivers:
            room = deficit[receiver]
            if self.multiplier is not None:
                room = min(room, (self.multiplier - 1.0) * float(target_probs[receiver]))
            for donor in self.neighbours(receiver):
                if budget <= 0 or room <= 0:
                    break
                moved = min(room, float(relaxed[donor] - cover[donor]), budget)
                if moved <= 0:
                    continue
                relaxed[donor] -= moved
                relaxed[receiver] += moved
                room -= moved
                budget -= moved
        return relaxed.clamp_(min=0)

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        relaxed = self.relaxed_target(target_probs, draft_tokens, draft_probs, sampling)
        return self._exact.select(relaxed.to(target_probs.dtype), draft_tokens, draft_probs,
                                  sampling=sampling, generator=generator)

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        relaxed = self.relaxed_target(target_probs, draft_tokens, draft_probs, sampling)
        return self._exact.output_distribution(relaxed, draft_tokens, draft_probs,
                                               sampling=sampling)
