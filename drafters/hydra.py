"""Hydra and Hydra++: sequentially dependent draft heads.

Medusa's heads all read one hidden state and never see the tokens drafted above them. A Hydra head
does: head ``k`` (k = 1..K) reads the target's last hidden state ``h`` at the position that
predicted the root *and* the input embeddings of the root and of the ``k - 1`` tokens drafted
above it on its branch, ``[h, e(root), e(x_1), ..., e(x_{k-1})]``, and predicts ``x_k``. The tree
is therefore drafted one depth at a time, each depth one batched head call over its parents.
A head is an input projection ``(k + 1) H -> H`` (initialised to pass ``h`` through), ``layers``
residual blocks and the target's own output projection restricted to the draft vocabulary
(drafters/trained.py). The tree format is Medusa's rank paths (drafters/medusa.py).

Hydra++ (same paper, the best recipe) adds:

- a **prefix attention** layer: one causal self-attention + MLP block over the target's hidden
  states of the context (the last ``window`` positions) whose output replaces ``h``, so the heads
  see more than a single position; no positional encoding beyond what the target's hidden states
  already carry, and the same window in training and drafting;
- **teacher distillation**: the heads learn the target's distribution (``--loss kl``) rather than
  the data's next tokens;
- deeper heads (``layers=3`` by default, a 4-layer MLP with the input projection).

References:
    Ankner, Parthasarathy, Mehta, Fish, Bhatt, Jin. "Hydra: Sequentially-Dependent Draft Heads for
    Medusa Decoding". COLM 2024. arXiv:2402.05109.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drafters.base import DrafterBase
from drafters.medusa import DEFAULT_TREE, draft_probs_on_target
from drafters.draft_layer import DRAFT_PANELS
from drafters.trained import (ResBlock, TrainedModule, distillation_loss, draft_head_weight,
                              keep_likeliest, rank_tree_children)
from specdec.engine import linear
from specdec.state import DecodingState
from specdec.tree import DraftTree

HEAD_DECAY = 0.8


class PrefixAttention(nn.Module):
    """Pre-norm causal self-attention + MLP over the context's hidden states, each position seeing
    the last ``window`` ones; output projections start at zero so a fresh layer is the identity."""

    def __init__(self, hidden_size: int, window: int):
        super().__init__()
        self.window = window
        self.num_heads = max(1, hidden_size // 64)
        self.attn_norm = nn.RMSNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden_size)
        self.up = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.down = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.down.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> [B, T, H]"""
        batch, length, size = hidden.shape
        q, k, v = self.qkv(self.attn_norm(hidden)).view(
            batch, length, 3, self.num_heads, size // self.num_heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(length, device=hidden.device)
        allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.window)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        hidden = hidden + self.out(attended.transpose(1, 2).reshape(batch, length, size))
        return hidden + self.down(nn.functional.silu(self.up(self.mlp_norm(hidden))))


class HydraHead(nn.Module):
    def __init__(self, hidden_size: int, inputs: int, layers: int):
        super().__init__()
        self.project = nn.Linear(inputs * hidden_size, hidden_size)
        with torch.no_grad():  # start as "h alone", the embeddings join as training sees fit
            self.project.weight.zero_()
            self.project.weight[:, :hidden_size] = torch.eye(hidden_size)
            self.project.bias.zero_()
        self.blocks = nn.Sequential(*[ResBlock(hidden_size) for _ in range(layers)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., inputs * H] -> [..., H]"""
        return self.blocks(linear(features, self.project.weight, self.project.bias, DRAFT_PANELS))


class HydraHeads(TrainedModule):
    kind = "hydra"

    def __init__(self, config: dict, draft_to_target: torch.Tensor, target):
        super().__init__(config, draft_to_target, target)
        hidden = config["target"]["hidden_size"]
        self.prefix = PrefixAttention(hidden, config["window"]) if config["plus"] else None
        self.heads = nn.ModuleList(HydraHead(hidden, k + 1, config["layers"])
                                   for k in range(1, config["heads"] + 1))
        self.register_buffer("head_weight", draft_head_weight(target, self.draft_to_target),
                             persistent=False)  # [Vd, H] frozen
        # [V, H] frozen, shared with the target (no copy)
        self.register_buffer("embeddings", target.get_input_embeddings().weight.detach(),
                             persistent=False)

    @classmethod
    def for_training(cls, target, draft_to_target, heads: int | None = None,
                     layers: int | None = None, loss: str = "ce", plus: bool = False,
                     window: int = 64) -> "HydraHeads":
        config = cls.base_config(target, draft_to_target, heads=heads or 4,
                                 layers=layers or (3 if plus else 1), loss=loss, plus=plus,
                                 window=window)
        return cls(config, draft_to_target, target)

    def context(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target hidden states [B, T, H] -> what the heads read at each position [B, T, H]."""
        return hidden if self.prefix is None else self.prefix(hidden)

    def head_logits(self, k: int, context: torch.Tensor, path_tokens: torch.Tensor) -> torch.Tensor:
        """Head k's draft logits [..., Vd] from context [..., H] and the k tokens above the
        predicted one, root first, as target ids [..., k]."""
        embedded = self.embeddings[path_tokens].float().flatten(-2)  # [..., k * H]
        features = torch.cat([context, embedded], -1)
        return linear(self.heads[k - 1](features), self.head_weight, precision=DRAFT_PANELS)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens = batch["tokens"]  # [B, T]
        context = self.context(batch["hidden"])  # [B, T, H]
        length = tokens.shape[1]
        total, weights, metrics = 0.0, 0.0, {}
        for k in range(1, len(self.heads) + 1):
            span = length - k - 1  # positions t whose token t + k + 1 exists
            if span <= 0:
                break
            # head k at t reads tokens t + 1 .. t + k and predicts token t + k + 1
            path = torch.stack([tokens[:, j: j + span] for j in range(1, k + 1)], -1)  # [B, T', k]
            draft_logits = self.head_logits(k, context[:, :span], path)  # [B, T', Vd]
            value, agree = distillation_loss(
                draft_logits, batch["label_draft_ids"][:, k + 1:],
                batch["teacher_draft_ids"][:, k: length - 1], batch["teacher_probs"][:, k: length - 1],
                batch["mask"][:, k + 1:], self.config["loss"])
            total = total + HEAD_DECAY ** (k - 1) * value
            weights += HEAD_DECAY ** (k - 1)
            metrics[f"top1_h{k}"] = float(agree)
        return total / weights, metrics


class HydraDrafter(DrafterBase):
    """``drafters.get("hydra", weights="hydra", tree=DEFAULT_TREE)``: shipped weights by name, a
    folder from ``specdec train hydra`` / ``hydra++``, or a `HydraHeads` module."""

    needs_hidden_states = True
    default_weights = "hydra"

    def __init__(self, weights: str | Path | HydraHeads | None = None,
                 tree: list[list[int]] | None = None, with_draft_probs: bool = True):
        self.weights = weights or self.default_weights
        self.heads: HydraHeads | None = weights if isinstance(weights, HydraHeads) else None
        self.tree_paths, self.tree_parent = rank_tree_children(tree or DEFAULT_TREE)
        self.depth = max(len(p) for p in self.tree_paths)
        self.with_draft_probs = with_draft_probs
        self._target = None
        self._history: list[torch.Tensor] = []  # committed hidden states, each [m, H]

    def begin(self, state: DecodingState) -> None:
        if self.heads is None or self._target is not state.target:
            if not isinstance(self.weights, HydraHeads):
                self.heads = HydraHeads.from_pretrained(self.weights, state.target)
            self._target = state.target
        if self.depth > self.heads.config["heads"]:
            raise ValueError(f"the tree is {self.depth} deep but there are only "
                             f"{self.heads.config['heads']} Hydra heads: use a shallower tree")
        self._history = []

    def _root_context(self, state: DecodingState) -> torch.Tensor:
        """[H] what the heads read for the position that predicted the root."""
        latest = state.hidden_states[-1].float()  # [m, H]
        if self.heads.prefix is None:
            return latest[-1]
        window = self.heads.config["window"]
        self._history.append(latest[-window:])
        recent = torch.cat(self._history)[-window:]  # [<= window, H]
        self._history = [recent]
        return self.heads.context(recent[None])[0, -1]

    @torch.no_grad()
    def propose(self, state: DecodingState) -> DraftTree:
        if self.heads is None:
            self.begin(state)
        if state.hidden_states is None:  # no target forward yet: a plain step
            return DraftTree.empty()
        context = self._root_context(state)
        draft_to_target = self.heads.draft_to_target
        depth = self.depth
        if state.node_budget is not None:
            # the cost-aware budget cut the last tree to node_budget nodes: draft no deeper than
            # node_budget + 1 nodes reach (saving the deeper heads' calls), keep that many
            depth = min(depth, state.node_budget + 1)
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []  # product of head probabilities along the path
        draft_probs: dict[int, torch.Tensor] = {}
        path_of = {(): [state.tokens[-1]]}  # rank path -> tokens from the root down, target ids
        node_of = {(): -1}
        for d in range(1, depth + 1):
            level = [p for p in self.tree_paths if len(p) == d]
            if not level:
                break
            above = sorted({p[:-1] for p in level}, key=lambda p: node_of[p])
            path_tokens = torch.tensor([path_of[p] for p in above], device=context.device)  # [P, d]
            draft_logits = self.heads.head_logits(
                d, context.expand(len(above), -1), path_tokens)  # [P, Vd]
            width = 1 + max(p[-1] for p in level)
            top = torch.topk(draft_logits.float().softmax(-1), width, -1)  # [P, width]
            ranked, top_probs = top.indices, top.values.tolist()
            row_of = {p: i for i, p in enumerate(above)}
            if self.with_draft_probs and not state.sampling.greedy:
                for p, row in row_of.items():
                    draft_probs[node_of[p]] = draft_probs_on_target(
                        draft_logits[row], draft_to_target, state.vocab_size, state)
            for p in level:
                token = int(draft_to_target[ranked[row_of[p[:-1]], p[-1]]])
                parent = node_of[p[:-1]]
                node_of[p] = len(tokens)
                path_of[p] = path_of[p[:-1]] + [token]
                tokens.append(token)
                parents.append(parent)
                scores.append(top_probs[row_of[p[:-1]]][p[-1]]
                              * (scores[parent] if parent >= 0 else 1.0))
        tree = DraftTree(tokens, parents, draft_probs, {}, "deterministic", scores)
        if state.node_budget is not None:
            tree = keep_likeliest(tree, state.node_budget + 1)
        return tree


class HydraPlusPlusDrafter(HydraDrafter):
    """``drafters.get("hydra++")``: the shipped Hydra++ weights (prefix attention, distilled)."""

    default_weights = "hydra++"
