"""Big Little Decoder (BiLD): a fallback policy for the drafter, a rollback policy for the target.

- **Fallback** (`should_fall_back`, used by a drafter): the small model keeps drafting while it is
  confident, and hands control to the large model as soon as its maximum next-token probability
  drops below ``fallback_threshold``. A drafter calls it on each new draft distribution and stops
  extending the chain when it returns True.
- **Rollback** (`BiLDRule`, the node rule): the large model checks each draft token x by the
  distance between the small model's choice (a one-hot on x) and its own distribution, the
  cross-entropy -log target(x). A token farther than ``rollback_threshold`` is rolled back and the
  node emits the target's own token (a sample from the warped target; the argmax at
  temperature 0). Among several children within the threshold the closest is accepted.

What it relaxes: any draft token with target(x) >= exp(-rollback_threshold) is kept, even when the
target would rarely produce it, so the output is not distributed as the target; lowering the
threshold towards 0 recovers "accept only what the target is sure of". At temperature 0 the warped
target is one-hot, the distance of every other token is infinite, and greedy decoding is exact.
It ignores ``draft_probs``, so every ``sampling`` kind is accepted.

References:
    Kim, Mangalam, Moon, Malik, Mahoney, Gholami, Keutzer. "Speculative Decoding with Big Little
        Decoder". NeurIPS 2023. arXiv:2302.07863. (the fallback and rollback policies.)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from specdec.sampling import sample


def should_fall_back(draft_probs: torch.Tensor, fallback_threshold: float) -> bool:
    """True when the drafter is unsure (max probability < threshold): stop drafting here."""
    return float(draft_probs.max()) < fallback_threshold


def rollback_distance(target_probs: torch.Tensor, token: int) -> float:
    """Cross-entropy between a one-hot on ``token`` and the target: -log target(token)."""
    prob = float(target_probs[token])
    return math.inf if prob <= 0 else -math.log(prob)


class BiLDRule:
    lossless: ClassVar[bool] = False

    def __init__(self, rollback_threshold: float = 2.0):
        if rollback_threshold < 0:
            raise ValueError(f"rollback_threshold is a cross-entropy, >= 0; got {rollback_threshold}")
        self.rollback_threshold = rollback_threshold

    def chosen_child(self, target_probs, draft_tokens) -> int:
        best, best_distance = -1, self.rollback_threshold
        for index, token in enumerate(draft_tokens):
            distance = rollback_distance(target_probs, token)
            if distance <= best_distance and (best < 0 or distance < best_distance):
                best, best_distance = index, distance
        return best

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        index = self.chosen_child(target_probs, draft_tokens)
        if index >= 0:
            return index, draft_tokens[index]
        return -1, sample(target_probs, generator)

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        index = self.chosen_child(target_probs, draft_tokens)
        if index >= 0:
            accept_probs[index] = 1.0
            return accept_probs, torch.zeros(target_probs.numel(), dtype=torch.float64)
        return accept_probs, target_probs.double().clone()
