"""A small causal LM as drafter: a chain or a top-k tree, greedy or sampled.

The draft model must share the target's tokenizer. It keeps its own KV cache of the committed
tokens: each step it keeps the speculative rows of last step's accepted draft tokens (the same
rows a re-feed would compute), drops the others, feeds the rest of the newly committed tokens
(at least the last one, whose logits start the tree), then grows the tree one depth per forward
(tree attention through `specdec.target.TreeForward`, the same module the target uses). With
``branching`` b_d children per node at depth d and at most ``max_frontier`` nodes expanded per
depth (the most probable paths, as EAGLE-2 reranks), a chain is ``branching=1``.

Children are ``"deterministic"`` (the top-b by draft logits) in greedy mode; in sampled mode they
are drawn from the warped draft distribution, ``"without_replacement"`` (Gumbel-top-k) or
``"iid"``, and the distribution is recorded for the verifier.

References:
    Leviathan, Kalman, Matias. "Fast Inference from Transformers via Speculative Decoding".
    ICML 2023. arXiv:2211.17192.
    Miao et al. "SpecInfer: Accelerating Generative LLM Serving with Tree-based Speculative
    Inference and Verification". ASPLOS 2024. arXiv:2305.09781.
    Li et al. "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees".
    EMNLP 2024. arXiv:2406.16858.
"""

from __future__ import annotations

from typing import Sequence

import torch

from drafters.base import DrafterBase
from specdec.sampling import gumbel_top_k
from specdec.state import DecodingState
from specdec.target import TreeForward
from specdec.tree import DraftTree

MODES = ("greedy", "iid", "without_replacement")
SYNC_MAX = 64  # newly committed tokens fed as one speculative chain; more go through prefill


class SmallLMDrafter(DrafterBase):
    def __init__(self, model, depth: int = 4, branching: int | Sequence[int] = 1,
                 mode: str = "greedy", max_frontier: int | None = None):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        branching = [branching] * depth if isinstance(branching, int) else list(branching)
        if len(branching) < depth or min(branching) < 1:
            raise ValueError(f"branching needs a positive count for each of the {depth} depths")
        self.model = model.eval() if model is not None else None  # None: a subclass sets it
        self.depth = depth
        self.branching = branching[:depth]
        self.mode = mode
        self.max_frontier = max_frontier
        self._forward: TreeForward | None = None
        self._cached: list[int] = []  # committed tokens in the draft cache
        # the draft cache's speculative tokens, in feeding order: (token, parent slot or -1)
        self._slots: list[tuple[int, int]] = []

    def begin(self, state: DecodingState) -> None:
        from specdec.target import target_vocab_size

        draft_vocab = target_vocab_size(self.model)
        if draft_vocab != state.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft_vocab} tokens) does not match the target's "
                f"({state.vocab_size}): use a draft model trained with the target's tokenizer"
            )
        self._forward = self._make_forward(state)
        self._cached = []
        self._slots = []

    def _make_forward(self, state: DecodingState) -> TreeForward:
        return TreeForward(self.model)

    def _sync(self, tokens: list[int]) -> torch.Tensor:
        """Bring the draft cache to ``tokens`` (all committed); return logits after the last [V]."""
        fwd = self._forward
        common = 0
        limit = min(len(self._cached), len(tokens) - 1)  # always re-feed at least the last token
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        kept: list[int] = []  # speculative slots on the committed path, root first
        if common == len(self._cached):
            parent = -1
            for token in tokens[common: len(tokens) - 1]:
                slot = next((i for i, (t, p) in enumerate(self._slots)
                             if p == parent and t == token), None)
                if slot is None:
                    break
                kept.append(slot)
                parent = slot
        fwd.commit(list(range(common)) + [fwd.base + slot for slot in kept])
        self._slots = []
        fresh = tokens[common + len(kept):]
        if fwd.length == 0 or len(fresh) > SYNC_MAX:  # the prompt: the stock causal forward
            out = fwd.prefill(torch.tensor(fresh, dtype=torch.long))
        else:  # a few tokens: fed as a chain (the lean forward where the model has one)
            out = fwd.forward(torch.tensor(fresh, dtype=torch.long),
                              torch.arange(-1, len(fresh) - 1))
            fwd.commit(list(range(fwd.length)))
        self._cached = list(tokens)
        return out.logits[-1]

    @torch.no_grad()
    def propose(self, state: DecodingState) -> DraftTree:
        if self._forward is None:
            self.begin(state)
        depth = min(self.depth, state.remaining - 1)
        if depth < 1:
            return DraftTree.empty()
        frontier = [(-1, self._sync(state.tokens), 0.0)]  # (tree node, logits [V], path log-prob)
        tokens: list[int] = []
        parents: list[int] = []
        draft_probs: dict[int, torch.Tensor] = {}
        sampling = "deterministic" if self.mode == "greedy" else self.mode
        slot_of: dict[int, int] = {}  # tree node -> index among the draft cache's speculative tokens
        for d in range(depth):
            level: list[tuple[int, float]] = []  # (new node, path log-prob)
            for node, logits, score in frontier:
                log_probs = torch.log_softmax(logits.float(), -1)  # ranks paths for the frontier
                if self.mode == "greedy":
                    picks = torch.topk(logits, self.branching[d]).indices.tolist()
                else:
                    q = state.sampling.probs(logits)  # [V] the warped draft distribution
                    draft_probs[node] = q
                    if self.mode == "iid":
                        picks = torch.multinomial(q, self.branching[d], replacement=True,
                                                  generator=state.generator).tolist()
                    else:
                        picks = gumbel_top_k(q, self.branching[d], state.generator)
                for token in picks:
                    level.append((len(tokens), score + float(log_probs[token])))
                    tokens.append(token)
                    parents.append(node)
            if d == depth - 1:
                break
            level.sort(key=lambda item: -item[1])
            # only the most probable paths are expanded, so only they need draft logits
            expand = sorted(level[: self.max_frontier] if self.max_frontier else level)
            for node, _ in expand:
                slot_of[node] = len(slot_of)
                self._slots.append((tokens[node], slot_of.get(parents[node], -1)))
            out = self._forward.forward(
                torch.tensor([tokens[node] for node, _ in expand]),
                torch.tensor([slot_of.get(parents[node], -1) for node, _ in expand]))
            frontier = [(node, out.logits[i], score) for i, (node, score) in enumerate(expand)]
        return DraftTree(tokens, parents, draft_probs, {}, sampling)
