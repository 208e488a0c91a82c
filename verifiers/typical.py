"""Typical acceptance (Medusa): accept a draft token the target finds plausible enough.

A child x is accepted when

    target(x) > min(epsilon, alpha * exp(-H(target)))

with H the entropy of the (warped) target distribution at this node: a hard floor ``epsilon``
and an entropy-dependent one, so a confident target (low entropy) demands a likely token and an
uncertain one accepts any token of typical probability. Among several passing children the one
the target likes most is accepted (ties: drafting order); a draft tree walk then descends into it,
which is how Medusa's longest-accepted-candidate selection looks from one node. When every child
fails, the node emits the target's argmax (``on_reject="argmax"``, what Medusa's implementation
appends) or a sample from the target (``on_reject="sample"``).

What it relaxes: the output is not distributed as the target. At temperature 0 (a one-hot target,
entropy 0) only the argmax passes, so greedy decoding is reproduced exactly. It ignores
``draft_probs``, so it accepts every ``sampling`` kind.

References:
    Cai, Li, Geng, Peng, Lee, Chen, Dao. "Medusa: Simple LLM Inference Acceleration Framework
        with Multiple Decoding Heads". ICML 2024. arXiv:2401.10774. (typical acceptance; defaults
        epsilon = 0.09 and alpha = 0.3 as in its reference implementation.)
    Hewitt, Manning, Liang. "Truncation Sampling as Language Model Desmoothing". 2022.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from specdec.sampling import sample


def typical_threshold(target_probs: torch.Tensor, epsilon: float, alpha: float) -> float:
    """min(epsilon, alpha * exp(-entropy(target_probs)))."""
    probs = target_probs.double()
    entropy = float(-(probs * probs.clamp_min(1e-300).log()).sum())
    return min(epsilon, alpha * math.exp(-entropy))


class TypicalRule:
    lossless: ClassVar[bool] = False

    def __init__(self, epsilon: float = 0.09, alpha: float = 0.3, on_reject: str = "argmax"):
        if on_reject not in ("argmax", "sample"):
            raise ValueError(f"on_reject must be 'argmax' or 'sample', got {on_reject!r}")
        if not (0 <= epsilon <= 1 and alpha >= 0):
            raise ValueError(f"need 0 <= epsilon <= 1 and alpha >= 0, got {epsilon}, {alpha}")
        self.epsilon, self.alpha, self.on_reject = epsilon, alpha, on_reject

    def chosen_child(self, target_probs, draft_tokens) -> int:
        """Index of the accepted child, or -1 when none passes the threshold."""
        threshold = typical_threshold(target_probs, self.epsilon, self.alpha)
        best, best_prob = -1, threshold
        for index, token in enumerate(draft_tokens):
            prob = float(target_probs[token])
            if prob > best_prob:
                best, best_prob = index, prob
        return best

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        index = self.chosen_child(target_probs, draft_tokens)
        if index >= 0:
            return index, draft_tokens[index]
        if self.on_reject == "argmax":
            return -1, int(torch.argmax(target_probs))
        return -1, sample(target_probs, generator)

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        recovered_probs = torch.zeros(target_probs.numel(), dtype=torch.float64)
        index = self.chosen_child(target_probs, draft_tokens)
        if index >= 0:
            accept_probs[index] = 1.0
        elif self.on_reject == "argmax":
            recovered_probs[int(torch.argmax(target_probs))] = 1.0
        else:
            recovered_probs = target_probs.double().clone()
        return accept_probs, recovered_probs
