"""Draft token trees: what a drafter proposes and the target verifies in one forward.

A `DraftTree` holds only the *new* tokens of one step. Node ``i`` has token ``token_ids[i]`` and
parent ``parents[i]`` (``-1``: a child of the root, the last committed token). Parents come before
their children, so index order is a valid topological order and the attention mask is
lower-triangular.

Glossary (used throughout specdec):

- **root**: the last committed token; the target's distribution after it is row 0 of the verify
  logits, the distribution after node ``i`` is row ``i + 1``.
- **draft_probs**: for a node with children, the distribution ``q`` its children were drawn from
  (already warped with the same temperature / top-k / top-p as the target); ``None`` where the
  drafter has no distribution (n-gram lookups).
- **node_scores** (optional): the drafter's estimate of the probability that each node ends up
  on the accepted path (EAGLE-2's product of draft probabilities along the path); never larger
  than the parent's. The cost-aware budget (specdec/engine/cost.py) calibrates and uses them.
- **sampling**: how a node's children were drawn from ``q``: ``"iid"`` (independent draws),
  ``"without_replacement"`` (Gumbel-top-k / stochastic beam search; children listed in the order
  drawn) or ``"deterministic"`` (top-k or looked-up children). The lossless acceptance rule
  differs for each, so verifiers read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

SAMPLING_KINDS = ("iid", "without_replacement", "deterministic")
ROOT = -1


class TreeError(ValueError):
    """A malformed draft tree; the message says which node and what to change."""


@dataclass(eq=False)
class DraftTree:
    token_ids: torch.Tensor  # [N] int64
    parents: torch.Tensor  # [N] int64, -1 = child of the root
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # node (or -1) -> [V]
    sampling: dict[int, str] = field(default_factory=dict)  # node (or -1) -> kind
    default_sampling: str = "deterministic"
    node_scores: torch.Tensor | None = None  # [N] float, see the glossary

    def __post_init__(self):
        self.token_ids = torch.as_tensor(self.token_ids, dtype=torch.long).reshape(-1).cpu()
        self.parents = torch.as_tensor(self.parents, dtype=torch.long).reshape(-1).cpu()
        if self.token_ids.shape != self.parents.shape:
            raise TreeError(
                f"token_ids has {self.token_ids.numel()} nodes but parents has "
                f"{self.parents.numel()}: give one parent per token"
            )
        self._tokens = self.token_ids.tolist()
        self._parents = self.parents.tolist()
        for node, parent in enumerate(self._parents):
            if not -1 <= parent < node:
                raise TreeError(
                    f"node {node} has parent {parent}: parents must come before their children "
                    f"(-1 <= parent < node); reorder the nodes topologically"
                )
        self._children: dict[int, list[int]] = {}
        for node, parent in enumerate(self._parents):
            self._children.setdefault(parent, []).append(node)
        depths = []
        for parent in self._parents:
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        self._depths = depths
        if self.node_scores is not None:
            self.node_scores = torch.as_tensor(self.node_scores, dtype=torch.float32).reshape(-1).cpu()
            if self.node_scores.numel() != len(self._tokens):
                raise TreeError(f"node_scores has {self.node_scores.numel()} entries for "
                                f"{len(self._tokens)} nodes: give one score per node")
            scores = self.node_scores.tolist()
            for node, parent in enumerate(self._parents):
                if not 0.0 <= scores[node] <= (1.0 if parent == ROOT else scores[parent]) + 1e-6:
                    raise TreeError(
                        f"node {node} has score {scores[node]:.4g}, outside [0, its parent's "
                        f"score]: scores are probabilities of being on the accepted path, so they "
                        f"cannot grow from parent to child")
        for node, kind in list(self.sampling.items()) + [(ROOT, self.default_sampling)]:
            if kind not in SAMPLING_KINDS:
                raise TreeError(f"sampling kind {kind!r} of node {node} is not one of {SAMPLING_KINDS}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def empty(cls) -> "DraftTree":
        """No speculation this step: the loop takes one plain decoding step."""
        return cls(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    @classmethod
    def chain(
        cls,
        token_ids: Sequence[int] | torch.Tensor,
        draft_probs: Sequence[torch.Tensor] | None = None,
        sampling: str = "deterministic",
    ) -> "DraftTree":
        """A single path; ``draft_probs[i]`` is the distribution token ``i`` was drawn from."""
        n = len(token_ids)
        parents = list(range(-1, n - 1))
        probs = {} if draft_probs is None else {i - 1: q for i, q in enumerate(draft_probs)}
        return cls(torch.as_tensor(list(token_ids) if not torch.is_tensor(token_ids) else token_ids),
                   torch.tensor(parents, dtype=torch.long), probs, {}, sampling)

    # ------------------------------------------------------------------ structure
    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return self._tokens

    @property
    def parent_list(self) -> list[int]:
        return self._parents

    def children(self, node: int = ROOT) -> list[int]:
        """Indices of ``node``'s children in drafting order (``node=-1``: the root's)."""
        return self._children.get(node, [])

    def sampling_of(self, node: int) -> str:
        return self.sampling.get(node, self.default_sampling)

    def draft_probs_of(self, node: int) -> torch.Tensor | None:
        return self.draft_probs.get(node)

    @property
    def depths(self) -> torch.Tensor:
        """[N] depth of each node; the root's children have depth 1."""
        return torch.tensor(self._depths, dtype=torch.long)

    @property
    def depth_list(self) -> list[int]:
        return self._depths

    @property
    def max_depth(self) -> int:
        return max(self._depths, default=0)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (inclusive)."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self._parents[node]
        return path[::-1]

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path, as lists of node indices."""
        return [self.path_to(n) for n in range(len(self)) if n not in self._children]

    def ancestor_mask(self) -> torch.Tensor:
        """[N+1, N+1] bool: row r may attend to column c. Row/column 0 is the root."""
        n = len(self)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for node, parent in enumerate(self._parents):
            row = node + 1
            if parent != ROOT:
                mask[row] = mask[parent + 1]
            mask[row, row] = True
        mask[0, 1:] = False
        return mask

    # ------------------------------------------------------------------ edits
    def truncate_depth(self, max_depth: int) -> "DraftTree":
        """The subtree of nodes at depth <= max_depth (parents keep coming first)."""
        if max_depth >= self.max_depth:
            return self
        return self.prune([i for i, d in enumerate(self._depths) if d <= max_depth])

    def prune(self, keep) -> "DraftTree":
        """The subtree of the nodes ``keep`` (any order); every kept node's parent must be kept."""
        keep = sorted(set(int(i) for i in keep))
        kept = set(keep)
        for node in keep:
            if not 0 <= node < len(self):
                raise TreeError(f"cannot keep node {node}: the tree has {len(self)} nodes")
            if self._parents[node] != ROOT and self._parents[node] not in kept:
                raise TreeError(f"cannot keep node {node} without its parent {self._parents[node]}: "
                                f"a pruned tree must contain every kept node's ancestors")
        if len(keep) == len(self):
            return self
        new_index = {ROOT: ROOT, **{old: new for new, old in enumerate(keep)}}
        parents = [new_index[self._parents[i]] for i in keep]
        probs = {new_index[k]: v for k, v in self.draft_probs.items() if k in new_index}
        sampling = {new_index[k]: v for k, v in self.sampling.items() if k in new_index}
        scores = None if self.node_scores is None else self.node_scores[keep]
        return DraftTree(self.token_ids[keep], torch.tensor(parents, dtype=torch.long), probs,
                         sampling, self.default_sampling, scores)

    # ------------------------------------------------------------------ checks
    def validate(self, vocab_size: int, max_nodes: int | None = None) -> "DraftTree":
        """Raise `TreeError` naming the problem; return self when the tree is well formed."""
        n = len(self)
        if max_nodes is not None and n > max_nodes:
            raise TreeError(
                f"draft tree has {n} nodes, over the budget of {max_nodes}: "
                f"lower the drafter's node budget or raise max_nodes"
            )
        if n:
            bad = [(i, t) for i, t in enumerate(self._tokens) if not 0 <= t < vocab_size]
            if bad:
                node, tok = bad[0]
                raise TreeError(
                    f"node {node} has token id {tok}, outside the target vocabulary [0, {vocab_size}): "
                    f"the drafter must use the target's tokenizer"
                )
        for node, probs in self.draft_probs.items():
            if node != ROOT and not 0 <= node < n:
                raise TreeError(f"draft_probs given for node {node}, which is not in the tree")
            if probs is not None and probs.shape[-1] != vocab_size:
                raise TreeError(
                    f"draft_probs of node {node} cover {probs.shape[-1]} tokens but the target has "
                    f"{vocab_size}: map the drafter's distribution onto the target vocabulary"
                )
        for node in [ROOT, *range(n)]:
            if self.children(node) and self.sampling_of(node) != "deterministic" \
                    and self.draft_probs_of(node) is None:
                raise TreeError(
                    f"node {node} has {self.sampling_of(node)!r} children but no draft_probs: "
                    f"sampled children need the distribution they were drawn from, or mark them "
                    f"'deterministic'"
                )
        return self

    def __repr__(self) -> str:
        return f"DraftTree(n={len(self)}, depth={self.max_depth}, tokens={self._tokens[:16]}...)"

