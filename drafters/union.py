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
a member's own ``node_scores`` where it has them, and the maximum where paths coincide. A member
without scores (prompt lookup, the n-gram trie) gets them from its own record: the union counts,
per member and depth, how often a node of that member was accepted when the target reached it
(its parent accepted), and scores a depth-``d`` node with the product of those rates up to ``d``
(a prior of ``unscored`` worth two observations per depth; old evidence fades over about 128
steps). So on code, where looked-up runs are accepted 70-80% of the time per token, their long
chains survive the budget, and on chat, where they mostly fail, they are cut to a node or two.

    drafters.get("union", members=["pld", "hydra"])

Every member is called every step (a stateful member such as EAGLE must see every step's hidden
states), receives ``begin`` and ``observe``, and reads the budget's ``node_budget`` hint itself.
"""

from __future__ import annotations

import torch

from drafters.base import DrafterBase
from specdec.state import DecodingState, StepResult
from specdec.tree import ROOT, DraftTree


def merge_trees(trees: list[DraftTree], unscored: float | list[list[float]] = 0.6) -> DraftTree:
    """The trie union of ``trees`` (nodes of earlier trees first), with merged node scores.

    ``unscored``: the per-token acceptance rate assumed for trees without ``node_scores`` (a
    depth-``d`` node scores ``unscored ** d``), or one list per tree of per-depth rates (depth
    ``d`` uses entry ``d - 1``, the last entry beyond the list)."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    index: dict[tuple[int, int], int] = {}
    for position, tree in enumerate(trees):
        own = tree.node_scores.tolist() if tree.node_scores is not None else None
        rates = unscored[position] if isinstance(unscored, list) else [unscored]
        depths = tree.depth_list
        mapped: list[int] = []
        prior_score: dict[int, float] = {}
        for node, (token, parent) in enumerate(zip(tree.tokens, tree.parent_list)):
            new_parent = ROOT if parent == ROOT else mapped[parent]
            if own is not None:
                score = own[node]
            else:
                rate = rates[min(depths[node], len(rates)) - 1]
                score = rate if parent == ROOT else min(rate * prior_score[parent], 1.0)
                prior_score[node] = score
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
        # per member: per depth [accepted, reached] for its unscored nodes (faded, see observe)
        self.counts: list[list[list[float]]] = [[] for _ in self.members]
        self._origin: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    PRIOR_STRENGTH = 2.0
    MEMORY = 128.0

    def rates(self, member: int) -> list[float]:
        """Estimated P(accepted | reached) per depth for ``member``'s unscored nodes."""
        prior = self.PRIOR_STRENGTH
        out = [(acc + prior * self.unscored) / (reached + prior)
               for acc, reached in self.counts[member]]
        return out + [self.unscored]  # deeper than ever observed: the prior

    def begin(self, state: DecodingState) -> None:
        for member in self.members:
            if hasattr(member, "begin"):
                member.begin(state)

    def propose(self, state: DecodingState) -> DraftTree:
        trees = [member.propose(state) for member in self.members]
        for tree in trees:
            tree.validate(state.vocab_size)
        # remember which unscored member drafted which path, to learn its rates in observe
        self._origin = {}
        for position, tree in enumerate(trees):
            if tree.node_scores is None:
                for path, depth in _paths(tree):
                    self._origin.setdefault(path, []).append((position, depth))
        if len(trees) == 1 and trees[0].node_scores is not None:
            return trees[0]
        return merge_trees(trees, [self.rates(i) for i in range(len(trees))])

    def observe(self, result: StepResult) -> None:
        if self._origin:
            fade = 1.0 - 1.0 / self.MEMORY
            for member_counts in self.counts:
                for pair in member_counts:
                    pair[0] *= fade
                    pair[1] *= fade
            tree = result.tree  # as verified: the budget may have pruned the merged tree
            accepted = set(result.accepted_nodes)
            for node, (path, _) in enumerate(_paths(tree)):
                parent = tree.parent_list[node]
                if parent != ROOT and parent not in accepted:
                    continue  # never reached: says nothing about this node
                for member, depth in self._origin.get(path, ()):
                    counts = self.counts[member]
                    while len(counts) < depth:
                        counts.append([0.0, 0.0])
                    counts[depth - 1][0] += node in accepted
                    counts[depth - 1][1] += 1.0
        for member in self.members:
            if hasattr(member, "observe"):
                member.observe(result)


def _paths(tree: DraftTree) -> list[tuple[tuple[int, ...], int]]:
    """(token path from the root, depth) of every node, in node order."""
    out: list[tuple[tuple[int, ...], int]] = []
    for token, parent in zip(tree.tokens, tree.parent_list):
        prefix = () if parent == ROOT else out[parent][0]
        out.append((prefix + (token,), len(prefix) + 1))
    return out
