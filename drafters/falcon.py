"""Falcon: a semi-autoregressive feature drafter that emits k tokens per forward.

Glossary (rows as in drafters/eagle.py): row ``t`` reads a feature ``u_t`` of position ``t`` and
the embedding of token ``t + 1``. Falcon groups rows into **blocks** of ``k``. Under the
**relaxed causal mask** a row sees every row before its block and every row *of* its block, so
the block's rows jointly know the tokens up to the block's last next-token, and row ``t`` (at
offset ``j`` in its block) predicts token ``t + k + 1``: ``j + 1`` tokens past the newest token its
block knows. One forward over the last ``k`` committed rows therefore drafts the next ``k`` tokens
at once (`FalconModule.block_logits` returns ``[k, Vd]``), and row ``t``'s output is the predicted
feature of position ``t + k``, which feeds the next block.

- **Coupled Sequential Glancing Distillation (CSGD)**: training runs two passes. Pass 0 feeds
  every row the target's real feature (teacher forcing). Pass 1 feeds row ``t`` the drafter's
  own pass-0 prediction of its feature (the output of row ``t - k``), as a second block does when
  drafting, attending to the real rows before its block and to its own block; a random share of
  rows "glance" at the truth (read their real feature) in proportion to how many pass-0
  predictions disagree with the target's top-1 (the paper's Hamming distance), so training moves
  from teacher forcing to the drafter's own inputs as it improves. Both passes distil the
  target's distribution (KL to its top-20) plus EAGLE's feature regression.
- **Custom-Designed Decoding Tree**: each drafter pass adds ``k`` depths: the top ``widths[0]``
  tokens of the block's first distribution, each followed by the same top ``widths[1]`` tokens of
  the second (the block predicts them without seeing each other), and so on. The next pass
  expands the ``beam`` most probable deepest leaves, each with its own block of rows (features
  from the block that produced it, tokens from its path), in one forward. Finally the
  ``max_nodes`` most probable nodes (product of draft probabilities, attached as node_scores)
  form the tree.

Simplifications (where this differs from the paper): one decoder layer and EAGLE's linear ``fc``
fusion of feature and embedding (drafters/eagle.py), where the paper's drafter fuses them with an
LSTM before its decoder layer (about two layers' size in all); CSGD has two passes (the second
block of a step is trained on its own inputs, later blocks are not), every row reads its true token
(the paper couples glanced features with their tokens; a wrong drafted token ends its path at
verification anyway), and the glancing ratio is one rate per batch, decaying only through the error
rate rather than by a schedule; blocks are aligned at a random offset per training batch, since at
drafting time the first block ends wherever the committed text ends. The tree's per-depth widths
are fixed rather than the paper's hand-tuned tree shape.

References:
    Gao, Xie, Xiang, Ji. "Falcon: Faster and Parallel Inference of Large Language Models through
    Enhanced Semi-Autoregressive Drafting and Custom-Designed Decoding Tree". AAAI 2025.
    arXiv:2412.12639.
    Qian et al. "Glancing Transformer for Non-Autoregressive Neural Machine Translation". ACL
    2021 (the glancing sampling CSGD builds on).
"""

from __future__ import annotations

from pathlib import Path

import torch

from drafters.base import DrafterBase
from drafters.draft_layer import LayerCache, fast_dtype
from drafters.eagle import EagleModule
from drafters.medusa import draft_probs_on_target
from drafters.trained import distillation_loss
from specdec.state import DecodingState
from specdec.tree import DraftTree


def block_mask(length: int, k: int, offset: int, device=None) -> torch.Tensor:
    """[T, T] relaxed causal mask: rows before the block, and the whole block."""
    block = (torch.arange(length, device=device) + offset) // k
    return block[None, :] <= block[:, None]


class FalconModule(EagleModule):
    kind = "falcon"

    @classmethod
    def for_training(cls, target, draft_to_target, loss: str = "kl", block: int = 2,
                     glance: float = 0.5, **options) -> "FalconModule":
        if not isinstance(block, int) or block < 2:
            raise ValueError(f"Falcon's block must be an integer >= 2 (tokens per forward), got {block!r}")
        options = {k: v for k, v in options.items() if k not in ("features", "aux_layers", "ttt_steps")}
        module = super().for_training(target, draft_to_target, loss=loss, features="last",
                                      ttt_steps=2, **options)
        module.config.update(block=block, glance=float(glance))
        return module

    @property
    def block(self) -> int:
        return int(self.config["block"])

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens, mask, hidden = batch["tokens"], batch["mask"], batch["hidden"]  # [B, T], [B, T, H]
        batch_size, length = tokens.shape
        k = self.block
        if length < k + 2:
            raise ValueError(f"Falcon training needs sequences of at least {k + 2} tokens")
        device = hidden.device
        u0 = hidden
        if self.training and self.config["noise"] > 0:
            scale = u0.detach().pow(2).mean().sqrt()
            u0 = u0 + (torch.rand_like(u0) * 2 - 1) * self.config["noise"] * scale
        next_tokens = torch.nn.functional.pad(tokens[:, 1:], (0, 1))
        rows = torch.arange(length, device=device)
        offset = int(torch.randint(0, k, (1,))) if self.training else 0
        relaxed = block_mask(length, k, offset, device)
        # row t predicts token t + k + 1: the teacher at position t + k
        shift = lambda x, fill: torch.nn.functional.pad(x[:, k:], (0, 0) * (x.dim() - 2) + (0, k), value=fill)  # noqa: E731
        teacher_ids = shift(batch["teacher_draft_ids"], -1)
        teacher_probs = shift(batch["teacher_probs"], 0.0)
        label_ids = torch.nn.functional.pad(batch["label_draft_ids"][:, k + 1:], (0, k + 1), value=-1)
        reg_target = shift(hidden, 0.0)  # the feature of position t + k
        valid0 = mask & (rows + k < mask.sum(1, keepdim=True))  # [B, T]

        a0, k0, v0 = self.step(u0, next_tokens, rows, relaxed)

        # pass 1: own predicted features (row t - k's output), glancing at the truth
        predicted = torch.nn.functional.pad(a0[:, :-k], (0, 0, k, 0))
        with torch.no_grad():
            wrong = (self.logits(a0).argmax(-1) != teacher_ids[..., 0]) & valid0
            error_rate = wrong.sum() / valid0.sum().clamp(min=1)
        glance_p = float(self.config["glance"] * error_rate) if self.training else 0.0
        glanced = torch.rand(batch_size, length, 1, device=device) < glance_p
        u1 = torch.where(glanced | (rows < k)[None, :, None], u0, predicted)
        block = (rows + offset) // k
        before_block = block[None, :] < block[:, None]  # [T, T] the real rows pass 1 attends to
        allowed1 = torch.cat([before_block, block[None, :] == block[:, None]], 1)  # [T, 2T]
        a1, _, _ = self.step(u1, next_tokens, rows, allowed1, k0, v0)

        total, metrics = 0.0, {"glance": glance_p}
        for p, (a, valid) in enumerate(((a0, valid0), (a1, valid0 & (rows >= k)[None]))):
            token_loss, agree = distillation_loss(self.logits(a), label_ids, teacher_ids,
                                                  teacher_probs, valid, self.config["loss"])
            reg = torch.nn.functional.smooth_l1_loss(a, reg_target, reduction="none").mean(-1)
            reg = (reg * valid).sum() / valid.sum().clamp(min=1)
            total = total + self.config["token_weight"] * token_loss + self.config["reg_weight"] * reg
            metrics[f"top1_{p}"] = float(agree)
        return total, metrics

    def block_logits(self, features: torch.Tensor, next_tokens: torch.Tensor, start: int,
                     past_keys=None, past_values=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One semi-autoregressive forward over one block of k rows starting at position
        ``start``: features [k, H], next_tokens [k] -> (draft logits [k, Vd] of the next k tokens,
        predicted features [k, H] of the following block)."""
        k = features.shape[0]
        past = 0 if past_keys is None else past_keys.shape[1]
        allowed = torch.ones(k, past + k, dtype=torch.bool)
        a, _, _ = self.step(features[None], next_tokens[None],
                            torch.arange(start, start + k, device=features.device), allowed,
                            past_keys, past_values)
        return self.logits(a[0]), a[0]


class FalconDrafter(DrafterBase):
    """``drafters.get("falcon", weights="falcon", widths=(4, 2), passes=3, beam=3, max_nodes=24)``.

    ``widths``: children per depth within a block (length k); ``passes``: drafter forwards per
    step (tree depth up to ``passes * k``); ``beam``: leaves expanded by each later pass.
    """

    needs_hidden_states = True

    def __init__(self, weights: str | Path | FalconModule = "falcon", widths=None, passes: int = 3,
                 beam: int = 3, max_nodes: int = 24, with_draft_probs: bool = True,
                 dtype: str | torch.dtype | None = "auto"):
        self.weights = weights
        self.module: FalconModule | None = weights if isinstance(weights, FalconModule) else None
        for name, value in (("passes", passes), ("beam", beam), ("max_nodes", max_nodes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.widths = None if widths is None else [int(w) for w in widths]
        if self.widths is not None and (not self.widths or min(self.widths) < 1):
            raise ValueError(f"widths must be positive integers, one per token of a block, got {widths!r}")
        self.passes, self.beam, self.max_nodes = passes, beam, max_nodes
        self.with_draft_probs = with_draft_probs
        self.dtype = dtype
        self._target = None
        # the layer's key/value rows: committed context, then the tree being drafted
        self._cache = LayerCache()
        self._features = None
        self._fed = 0

    def begin(self, state: DecodingState) -> None:
        if self.module is None or self._target is not state.target:
            if not isinstance(self.weights, FalconModule):
                self.module = FalconModule.from_pretrained(self.weights, state.target)
                if self.dtype == "auto":
                    self.module.to(fast_dtype(state.device))
            if isinstance(self.dtype, torch.dtype):
                self.module.to(self.dtype)
            self._target = state.target
        k = self.module.block
        if self.widths is None:
            self.widths = [4, 2] + [1] * (k - 2)
        if len(self.widths) != k:
            raise ValueError(f"widths has {len(self.widths)} entries but the Falcon block drafts "
                             f"{k} tokens per forward: give one width per token")
        self._cache = LayerCache()
        self._features = None
        self._fed = 0

    def _extend_context(self, state: DecodingState) -> None:
        """Cache keys/values of the rows of the tokens committed since the last call (a row's
        keys/values depend only on its own input, so any attention pattern gives the same)."""
        module = self.module
        hidden = state.hidden_states[-1].to(module.fc.weight.dtype)  # [m, H]
        m = hidden.shape[0]
        start = len(state.tokens) - 1 - m
        if start != self._fed:
            raise RuntimeError(f"Falcon drafter out of step: {self._fed} rows cached, new rows start "
                               f"at {start}; call begin() before a new generation")
        allowed = torch.ones(m, start + m, dtype=torch.bool).tril_(start)
        module.step_cached(hidden[None], torch.tensor([state.tokens[-m:]], device=hidden.device),
                           torch.arange(start, start + m, device=hidden.device), allowed,
                           self._cache, start)
        previous = self._features if start else hidden[:0]
        self._features = torch.cat([previous, hidden])[-module.block:]  # [<= k, H] newest rows
        self._fed = start + m

    @torch.no_grad()
    def propose(self, state: DecodingState) -> DraftTree:
        if self.module is None:
            self.begin(state)
        if state.hidden_states is None:
            return DraftTree.empty()
        module, k = self.module, self.module.block
        self._extend_context(state)
        n = len(state.tokens) - 1  # the root's position
        if n < k:  # not enough committed rows for a first block
            return DraftTree.empty()
        draft_to_target = module.draft_to_target
        want_probs = self.with_draft_probs and not state.sampling.greedy
        tokens: list[int] = []
        parents: list[int] = []
        values: list[float] = []
        depths: list[int] = []
        draft_probs: dict[int, torch.Tensor] = {}

        def grow(leaf: int, logits: torch.Tensor, depth: int) -> list[int]:
            """Add the block's k depths below ``leaf``; returns the new deepest nodes."""
            probs = torch.softmax(logits.float(), -1)  # [k, Vd]
            frontier = [leaf]
            for j, width in enumerate(self.widths):
                top = torch.topk(probs[j], width)
                ids, ps = draft_to_target[top.indices].tolist(), top.values.tolist()
                q = (draft_probs_on_target(logits[j], draft_to_target, state.vocab_size, state)
                     if want_probs else None)
                below = []
                for parent in frontier:
                    if q is not None:
                        draft_probs[parent] = q
                    base = 1.0 if parent < 0 else values[parent]
                    for token, p in zip(ids, ps):
                        below.append(len(tokens))
                        tokens.append(token)
                        parents.append(parent)
                        values.append(base * p)
                        depths.append(depth + j + 1)
                frontier = below
            return frontier

        # pass 1: the block of the last k committed rows (its queries see the context before it
        # and the whole block); it rewrites those rows' keys/values, which depend only on the
        # rows' own inputs, so the cache keeps the same numbers
        past = n - k
        device = self._features.device
        a = module.step_cached(self._features[None],
                               torch.tensor([state.tokens[-k:]], device=device),
                               torch.arange(past, n, device=device),
                               torch.ones(k, n, dtype=torch.bool), self._cache, past)
        logits, features = module.logits(a[0]), a[0]
        leaves = grow(-1, logits, 0)
        block_out = {leaf: features for leaf in leaves}  # leaf -> features of its next block
        n_tree = 0  # tree rows in the cache (after the context's)
        lineage: dict[int, list[int]] = {leaf: [] for leaf in leaves}  # tree rows of the path
        passes, max_nodes = self.passes, self.max_nodes
        if state.node_budget is not None:
            # the cost-aware budget cut the last tree to node_budget nodes: draft one more (so
            # the tree can grow back) and skip the passes whose depths it would drop
            max_nodes = min(max_nodes, state.node_budget + 1)
            passes = min(passes, -(-max_nodes // k))
        for p in range(1, passes):
            chosen = sorted(leaves, key=lambda i: -values[i])[: self.beam]
            if not chosen:
                break
            rows = len(chosen) * k
            allowed = torch.zeros(rows, self._fed + n_tree + rows, dtype=torch.bool)
            allowed[:, : self._fed] = True
            u, next_tokens = [], []
            for b, leaf in enumerate(chosen):
                path = self._path(leaf, parents)
                own = [n_tree + b * k + j for j in range(k)]
                for j in range(k):
                    allowed[b * k + j, [self._fed + r for r in lineage[leaf] + own]] = True
                u.append(block_out[leaf])
                next_tokens += [tokens[i] for i in path[-k:]]
            start = n + (p - 1) * k  # rows of the tokens drafted by the previous pass
            positions = torch.arange(start, start + k).repeat(len(chosen))
            a = module.step_cached(torch.cat(u)[None], torch.tensor([next_tokens]), positions,
                                   allowed, self._cache, self._fed + n_tree)
            all_logits = module.logits(a[0])  # [rows, Vd]
            leaves = []
            for b, leaf in enumerate(chosen):
                new = grow(leaf, all_logits[b * k:(b + 1) * k], depths[leaf])
                for child in new:
                    block_out[child] = a[0, b * k:(b + 1) * k]
                    lineage[child] = lineage[leaf] + [n_tree + b * k + j for j in range(k)]
                leaves += new
            n_tree += rows
        order = sorted(range(len(tokens)), key=lambda i: (-values[i], depths[i], i))
        keep = sorted(order[:max_nodes], key=lambda i: (depths[i], i))
        index = {-1: -1, **{old: new for new, old in enumerate(keep)}}
        return DraftTree([tokens[i] for i in keep], [index[parents[i]] for i in keep],
                         {index[q]: d for q, d in draft_probs.items() if q in index}, {},
                         "deterministic", torch.tensor([values[i] for i in keep]))

    @staticmethod
    def _path(node: int, parents: list[int]) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]
