"""The empty drafter: proposes no tokens, so the loop decodes one token per step.

It is the ablation baseline for every other drafter: the same loop, cache handling and target
forward (including the lean forward of specdec/engine/fastpath.py) without speculation, so a benchmark can
tell how much of a speedup over ``model.generate`` comes from drafting and how much from the
forward itself (``benchmarks/bench_trained.py --methods none,...``).
"""

from __future__ import annotations

from drafters.base import DrafterBase
from specdec.state import DecodingState
from specdec.tree import DraftTree


class NoDrafter(DrafterBase):
    def propose(self, state: DecodingState) -> DraftTree:
        return DraftTree.empty()
