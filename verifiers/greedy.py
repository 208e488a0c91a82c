"""Greedy verification: accept a draft token iff it is the target's argmax.

With greedy decoding (temperature 0) the output is token-for-token the target's own greedy output,
whatever the drafter proposes (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding", the temperature-0 case). It ignores ``draft_probs`` and ``sampling``.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class GreedyRule:
    lossless: ClassVar[bool] = True
    greedy_only: ClassVar[bool] = True  # emits the argmax; the loop refuses it at temperature > 0

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        best = int(torch.argmax(target_probs))
        for index, token in enumerate(draft_tokens):
            if token == best:
                return index, token
        return -1, best
