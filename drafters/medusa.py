"""Medusa: extra decoding heads on the target's last hidden state, drafting a tree of top-k tokens.

Head ``k`` (k = 1..K) reads the target's last hidden state at the position that predicted the
newest token (the root) and guesses the token ``k`` places after the root, without seeing the
root or the tokens drafted before it. Each head is ``layers`` residual blocks followed by the
target's own output projection restricted to the draft vocabulary (drafters/trained.py), so only
the blocks are trained and stored.

The draft tree is given in Medusa's format: a list of rank paths, ``[1, 0]`` meaning "the
second-ranked token of head 1, then the top token of head 2 below it". Every node at depth ``d``
draws from the same head-``d`` top-k list, so children are ``"deterministic"``; the head's
distribution (warped like the target's, mapped onto the target vocabulary) is attached as
``draft_probs`` for verifiers that can use it.

Training (``specdec train medusa``): head ``k`` at position ``t`` predicts the token at
``t + k + 1``, with cross-entropy on the data token (Medusa-1) or, with ``--loss kl``, on the
target's own distribution at ``t + k`` (Medusa-2 self-distillation); head ``k``'s loss is weighted
by ``0.8 ** (k - 1)`` as in the paper.

References:
    Cai, Li, Geng, Peng, Lee, Chen, Dao. "Medusa: Simple LLM Inference Acceleration Framework with
    Multiple Decoding Heads". ICML 2024. arXiv:2401.10774.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drafters.base import DrafterBase
from drafters.draft_layer import DRAFT_PANELS
from drafters.trained import (ResBlock, TrainedModule, distillation_loss, draft_head_weight,
                              keep_likeliest, rank_tree_children)
from specdec.engine import linear
from specdec.state import DecodingState
from specdec.tree import DraftTree

# 16 nodes, depth 4: wide where acceptance is likely (the top ranks of the first heads), a thin
# spine below; one target forward over 17 tokens costs about 1.8x a single-token step on CPU
DEFAULT_TREE = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0],
                [0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
HEAD_DECAY = 0.8


class MedusaHeads(TrainedModule):
    kind = "medusa"

    def __init__(self, config: dict, draft_to_target: torch.Tensor, target):
        super().__init__(config, draft_to_target, target)
        hidden = config["target"]["hidden_size"]
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(config["layers"])])
            for _ in range(config["heads"]))
        self.register_buffer("head_weight", draft_head_weight(target, self.draft_to_target),
                             persistent=False)  # [Vd, H] frozen

    @classmethod
    def for_training(cls, target, draft_to_target, heads: int | None = None,
                     layers: int | None = None, loss: str = "ce") -> "MedusaHeads":
        config = cls.base_config(target, draft_to_target, heads=heads or 4, layers=layers or 1,
                                 loss=loss)
        return cls(config, draft_to_target, target)

    def forward(self, hidden: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """hidden [..., H] -> draft logits [..., K, Vd] (head k at index k - 1); ``heads``: only
        the first that many heads."""
        blocks = self.blocks if heads is None else self.blocks[:heads]
        return linear(torch.stack([b(hidden) for b in blocks], -2), self.head_weight,
                      precision=DRAFT_PANELS)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        hidden = batch["hidden"]  # [B, T, H]
        length = hidden.shape[1]
        total, weights, metrics = 0.0, 0.0, {}
        for k, blocks in enumerate(self.blocks, start=1):
            if length <= k + 1:
                break
            draft_logits = blocks(hidden[:, : length - k - 1]) @ self.head_weight.T  # [B, T', Vd]
            value, agree = distillation_loss(
                draft_logits, batch["label_draft_ids"][:, k + 1:],
                batch["teacher_draft_ids"][:, k: length - 1], batch["teacher_probs"][:, k: length - 1],
                batch["mask"][:, k + 1:], self.config["loss"])
            total = total + HEAD_DECAY ** (k - 1) * value
            weights += HEAD_DECAY ** (k - 1)
            metrics[f"top1_h{k}"] = float(agree)
        return total / weights, metrics


def draft_probs_on_target(draft_logits: torch.Tensor, draft_to_target: torch.Tensor,
                          vocab_size: int, state: DecodingState) -> torch.Tensor:
    """[V] the warped distribution of draft logits [Vd], zero outside the draft vocabulary."""
    full = torch.full((vocab_size,), float("-inf"), device=draft_logits.device)
    full[draft_to_target] = draft_logits.float()
    return state.sampling.probs(full)


class MedusaDrafter(DrafterBase):
    """``drafters.get("medusa", weights="medusa", tree=DEFAULT_TREE)``: shipped weights by name,
    a folder from ``specdec train medusa``, or a `MedusaHeads` module."""

    needs_hidden_states = True

    def __init__(self, weights: str | Path | MedusaHeads = "medusa",
                 tree: list[list[int]] | None = None, with_draft_probs: bool = True):
        self.weights = weights
        self.heads: MedusaHeads | None = weights if isinstance(weights, MedusaHeads) else None
        self.tree_paths, self.tree_parent = rank_tree_children(tree or DEFAULT_TREE)
        self.with_draft_probs = with_draft_probs
        self._target = None

    def begin(self, state: DecodingState) -> None:
        if self.heads is None or self._target is not state.target:
            if not isinstance(self.weights, MedusaHeads):
                self.heads = MedusaHeads.from_pretrained(self.weights, state.target)
            self._target = state.target
        depth = max(len(p) for p in self.tree_paths)
        if depth > self.heads.config["heads"]:
            raise ValueError(f"the tree is {depth} deep but there are only "
                             f"{self.heads.config['heads']} Medusa heads: use a shallower tree")

    @torch.no_grad()
    def propose(self, state: DecodingState) -> DraftTree:
        if self.heads is None:
            self.begin(state)
        if state.hidden_states is None:  # no target forward yet: a plain step
            return DraftTree.empty()
        paths = self.tree_paths
        if state.node_budget is not None:
            # the cost-aware budget cut the last tree to node_budget nodes: run only the heads
            # that node_budget + 1 nodes can reach, and draft that many (so the tree can grow back)
            paths = [p for p in paths if len(p) <= state.node_budget + 1]
        depth = max(len(p) for p in paths)
        root_hidden = state.hidden_states[-1][-1]  # [H] predicted the root
        draft_logits = self.heads(root_hidden.float(), heads=depth)  # [depth, Vd]
        widest = [1 + max((p[-1] for p in paths if len(p) == d), default=0)
                  for d in range(1, depth + 1)]
        top = [torch.topk(draft_logits[d].float().softmax(-1), widest[d]) for d in range(depth)]
        draft_to_target = self.heads.draft_to_target
        tokens = [int(draft_to_target[top[len(p) - 1].indices[p[-1]]]) for p in paths]
        # paths is a prefix of tree_paths (sorted by depth first), so the parent indices hold
        parents = [self.tree_parent[p] for p in paths]
        # the path's product of head probabilities: what the budget calibrates (EAGLE-2's score)
        scores: list[float] = []
        for p, parent in zip(paths, parents):
            prob = float(top[len(p) - 1].values[p[-1]])
            scores.append(prob * (scores[parent] if parent >= 0 else 1.0))
        draft_probs = {}
        # greedy verification never reads draft distributions (as EAGLE and Falcon skip them)
        if self.with_draft_probs and not state.sampling.greedy:
            per_depth = {}
            for node, p in [(-1, ())] + list(enumerate(paths)):
                d = len(p)  # the children of a depth-d node come from head d + 1
                if d < depth and any(len(c) == d + 1 and c[:-1] == p for c in paths):
                    if d not in per_depth:
                        per_depth[d] = draft_probs_on_target(draft_logits[d], draft_to_target,
                                                             state.vocab_size, state)
                    draft_probs[node] = per_depth[d]
        tree = DraftTree(tokens, parents, draft_probs, {}, "deterministic", scores)
        if state.node_budget is not None:
            tree = keep_likeliest(tree, state.node_budget + 1)
        return tree
