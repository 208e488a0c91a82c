"""Several drafters at once: their trees merged into one token trie, verified in one forward.

Retrieval drafters and model drafters fail in different places: prompt lookup (Saxena 2023) is
nearly free and drafts long runs exactly where the output copies its context (code, quoted text,
repeated names), and drafts nothing elsewhere; a trained head drafter (Medusa, Hydra, EAGLE)
drafts a few likely tokens everywhere. Verifying the union of both trees in one forward takes the
long copied run when there is one and the model's guesses otherwise, the way SpecInfer (Miao et
al. 2024, "SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative
Inference and Verification", arXiv:2305.09781) merges the token trees of several small models and
REST (He et al. 2024, "REST: Retrieval-Based Speculative Decoding", arXiv:2311.08252) builds its
tree from retrieved continuations.

Merging: each member's tree is inserted path by path into a trie (a node is identified by its
parent and token), so shared prefixes are verified once. The merged tree is ``deterministic`` and
carries no draft distributions, like any looked-up tree: the lossless verifiers accept from it as
from prompt lookup's (greedy verification is token for token equal to ``generate``; the exact
verifier treats each child as a deterministic proposal). Node scores, for the cost-aware budget:
a member's own ``node_scores`` where it has them, ``unscored ** depth`` for members without
(prompt lookup), and the maximum where paths coincide; the budget calibrates scores against the
acceptances it observes, so ``unscored`` is only a prior.

    drafters.get("union", members=["pld", "hydra"])

Every member is called every step (a stateful member such as EAGLE must see every step's hidden
states), receives ``begin`` and ``observe``, and reads the budget's ``node_budget`` hint itself.
"""

from __future__ import annotations

import torch

from drafters.base import DrafterBase
from specdec.state import DecodingState, StepResult
from specdec.tree import ROOT, DraftTree


def merge_trees(trees: list[DraftTree], unscored: float = 0.6) -> DraftTree:
    """The trie union of ``trees`` (nodes of earlier trees first), with merged node scores."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        own = tree.node_scores.tolist() if tree.node_scores is not None else None
        depths = tree.depth_list
        mapped: list[int] = []
        for node, (token, parent) in enumerate(zip(tree.tokens, tree.parent_list)):
            new_parent = ROOT if parent == ROOT else mapped[parent]
            score = own[node] if own is not None else unscored ** depths[node]
            key = (new_parent, token)
            at = index.get(key)
            if at is None:
                at = index[key] = len(tokens)
                tokens.append(token)
                parents.append(new_parent)
                scores.append(score)
            else:
                scores[at] = max(scores[at], score)
            mapped.append(at)
    # each member's scores never grow from parent to child, so neither do their maxima; the
    # pass below (children after parents, so walked backwards) only guards float ties
    for node in range(len(parents) - 1, -1, -1):
        parent = parents[node]
        if parent != ROOT and scores[node] > scores[parent]:
            scores[parent] = scores[node]
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                     node_scores=torch.tensor(scores, dtype=torch.float32))


class UnionDrafter(DrafterBase):
    """``drafters.get("union", members=[...])``: members are names (built with
    ``member_args[name]``) or drafter objects."""

    def __init__(self, members=("pld", "hydra"), unscored: float = 0.6,
                 member_args: dict | None = None):
        import drafters

        if not members:
            raise ValueError("union needs at least one member drafter, e.g. members=['pld', 'hydra']")
        if not 0.0 < unscored <= 1.0:
            raise ValueError(f"unscored must be in (0, 1], got {unscored}")
        member_args = member_args or {}
        unknown = set(member_args) - {m for m in members if isinstance(m, str)}
        if unknown:
            raise ValueError(f"member_args for {sorted(unknown)}, which are not members")
        self.members = [drafters.get(m, **member_args.get(m, {})) if isinstance(m, str) else m
                        for m in members]
        self.unscored = unscored
        self.needs_hidden_states = any(getattr(m, "needs_hidden_states", False)
                                       for m in self.members)

    def begin(self, state: DecodingState) -> None:
        for member in self.members:
            if hasattr(member, "begin"):
                member.begin(state)

    def propose(self, state: DecodingState) -> DraftTree:
        trees = [member.propose(state) for member in self.members]
        for member, tree in zip(self.members, trees):
            tree.validate(state.vocab_size)
        if len(trees) == 1:
            return trees[0]
        return merge_trees(trees, self.unscored)

    def observe(self, result: StepResult) -> None:
        for member in self.members:
            if hasattr(member, "observe"):
                member.observe(result)
