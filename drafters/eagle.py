"""EAGLE feature drafters: EAGLE (static tree), EAGLE-2 (dynamic tree), EAGLE-3 (fused features,
training-time test).

Glossary. At position ``t`` the target's *feature* ``f_t`` is its hidden state that predicts token
``t + 1``. The drafter is one decoder layer (drafters/draft_layer.py) whose row ``t`` reads
``u_t`` (a feature of position ``t``) and the embedding of token ``t + 1`` (known once ``t + 1``
is drafted: this removes the sampling uncertainty that makes feature prediction hard), and whose
output ``a_t`` predicts the feature ``f_{t+1}`` and, through the target's own LM head restricted to
a reduced draft vocabulary (drafters/trained.py), token ``t + 2``.

- **EAGLE** (Li et al. 2024a): ``u_t = f_t``, the target's last-layer feature, for committed
  positions; ``u_t = a_{t-1}`` (the drafter's own prediction) for drafted ones. Trained with a
  smooth-L1 regression of ``a_t`` onto ``f_{t+1}`` plus a token loss (weight 0.1) and uniform noise
  on the input features. Drafts a static tree given as Medusa-style rank paths.
- **EAGLE-2** (Li et al. 2024b): a dynamic tree. Every node's *value* is the product of the draft
  probabilities along its path (the drafter's estimate that the target accepts it). Expansion:
  at each depth the ``beam`` highest-valued new nodes are run through the layer and each gets its
  ``top_k`` children; reranking: the ``max_nodes`` highest-valued nodes of all depths form the
  tree. Values shrink along paths, so the selection keeps every chosen node's parent. The values
  are attached as ``DraftTree.node_scores`` for the cost-aware budget.
- **EAGLE-3** (Li et al. 2025): ``u_t`` for committed positions is a projection of the target's
  low, middle and high-layer hidden states (``aux_layers``) instead of the last layer, there is
  no feature regression, and training uses the *training-time test*: the layer is unrolled for
  ``ttt_steps`` steps, step ``j`` feeding row ``t`` with the drafter's own step ``j - 1`` output
  of row ``t - 1``, and attending to the real-feature rows ``<= t - j`` plus its own chain
  (the rows it would see while drafting), so training sees the drafter's own multi-step inputs.

Deviation: EAGLE-3 feeds the token embedding and the feature to the attention as a 2H-wide
input; here both variants fuse them with EAGLE-1's linear ``fc(2H -> H)`` before the layer.

References:
    Li, Wei, Zhang, Zhang. "EAGLE: Speculative Sampling Requires Rethinking Feature
    Uncertainty". ICML 2024. arXiv:2401.15077.
    Li, Wei, Zhang, Zhang. "EAGLE-2: Faster Inference of Language Models with Dynamic Draft
    Trees". EMNLP 2024. arXiv:2406.16858.
    Li, Wei, Zhang, Zhang. "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
    via Training-Time Test". arXiv:2503.01840.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drafters.base import DrafterBase
from drafters.draft_layer import (DRAFT_PANELS, DraftDecoderLayer, LayerCache, RMSNorm, fast_dtype,
                                  rope_base)
from drafters.medusa import DEFAULT_TREE, draft_probs_on_target
from drafters.trained import TrainedModule, distillation_loss, draft_head_weight, rank_tree_children
from specdec.engine import linear
from specdec.state import DecodingState
from specdec.tree import DraftTree

STEP_DECAY = 0.8  # weight of training-time-test step j: STEP_DECAY ** j


class EagleModule(TrainedModule):
    """The trainable drafter: (feature, next-token embedding) -> one decoder layer -> logits."""

    kind = "eagle"

    def __init__(self, config: dict, draft_to_target: torch.Tensor, target):
        super().__init__(config, draft_to_target, target)
        hidden = config["target"]["hidden_size"]
        aux = len(config.get("aux_layers", ()))
        if config["features"] == "fused":
            if not aux:
                raise ValueError("EAGLE-3 (features='fused') needs aux_layers: extract features "
                                 "with low/mid/high layers (specdec train extracts them by default)")
            self.aux_norms = nn.ModuleList(RMSNorm(hidden) for _ in range(aux))
            self.fuse = nn.Linear(aux * hidden, hidden, bias=False)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = DraftDecoderLayer(hidden, config["num_heads"], config["intermediate_size"],
                                       config["rope_theta"])
        self.out_norm = None
        if config["features"] == "fused":
            self.out_norm = RMSNorm(hidden)
            final_norm = getattr(target.get_decoder(), "norm", None)
            if getattr(final_norm, "weight", None) is not None and final_norm.weight.shape == (hidden,):
                # start as the target's own output head: its final norm, then its lm_head rows
                self.out_norm.weight.data.copy_(final_norm.weight.detach().float())
        self.register_buffer("head_weight", draft_head_weight(target, self.draft_to_target),
                             persistent=False)  # [Vd, H] frozen
        # the target's input embeddings, shared (not copied, never saved)
        self.register_buffer("embed_weight", target.get_input_embeddings().weight.detach().float(),
                             persistent=False)  # [V, H]

    @classmethod
    def for_training(cls, target, draft_to_target, loss: str = "kl", features: str = "last",
                     aux_layers=(), ttt_steps: int = 1, reg_weight: float = 1.0,
                     token_weight: float = 0.1, noise: float = 0.1, **_) -> "EagleModule":
        text = target.config.get_text_config()
        config = cls.base_config(
            target, draft_to_target, loss=loss, features=features,
            aux_layers=[int(i) for i in aux_layers] if features == "fused" else [],
            ttt_steps=int(ttt_steps), reg_weight=reg_weight if features == "last" else 0.0,
            token_weight=token_weight if features == "last" else 1.0, noise=noise,
            num_heads=int(text.num_attention_heads),
            intermediate_size=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
            rope_theta=rope_base(text))
        return cls(config, draft_to_target, target)

    # ------------------------------------------------------------------ pieces
    def root_features(self, last_hidden: torch.Tensor, aux_hidden: torch.Tensor | None) -> torch.Tensor:
        """u for committed positions: last_hidden [..., H] or aux_hidden [..., A, H] -> [..., H]."""
        if self.config["features"] == "last":
            return last_hidden
        normed = [norm(aux_hidden[..., i, :]) for i, norm in enumerate(self.aux_norms)]
        return self.fuse(torch.cat(normed, -1))

    def step(self, features: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor,
             allowed: torch.Tensor, past_keys=None, past_values=None):
        """features [B, n, H], next_tokens [B, n] -> (a [B, n, H], keys, values)."""
        return self.layer(self._fused(features, next_tokens), positions, allowed, past_keys,
                          past_values)

    def _fused(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """The layer's input: fc(feature, embedding of the next token)."""
        return linear(torch.cat([features, self.embed_weight[next_tokens]], -1), self.fc.weight,
                      precision=DRAFT_PANELS)

    def step_cached(self, features: torch.Tensor, next_tokens: torch.Tensor,
                    positions: torch.Tensor, allowed: torch.Tensor, cache: LayerCache,
                    start: int) -> torch.Tensor:
        """`step` for drafting: features [1, n, H], next_tokens [1, n] -> a [1, n, H], the rows'
        keys/values written to rows ``start ..`` of ``cache`` (see `DraftDecoderLayer.step_cached`)."""
        return self.layer.step_cached(self._fused(features, next_tokens), positions, allowed,
                                      cache, start)

    def logits(self, a: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] -> draft logits [..., Vd] (or over ``head``'s rows, a slice of the head)."""
        return linear(a if self.out_norm is None else self.out_norm(a),
                      self.head_weight if head is None else head, precision=DRAFT_PANELS)

    # ------------------------------------------------------------------ training
    def unroll(self, u0: torch.Tensor, next_tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """The training-time test: outputs a [B, T, H] of steps 0..steps-1 over whole sequences.

        Step 0 is teacher-forced on the target's features u0 [B, T, H]; step j feeds row t with
        step j - 1's output of row t - 1 and lets it attend to real-feature rows s <= t - j plus
        step i's row t - j + i (i = 1..j): exactly the rows a drafted token at depth j sees."""
        length = u0.shape[1]
        rows = torch.arange(length, device=u0.device)
        keys, values, outputs, u = [], [], [], u0
        for j in range(steps):
            allowed = [rows[None, :] <= rows[:, None] - j]
            allowed += [rows[None, :] == rows[:, None] - j + i for i in range(1, j + 1)]
            a, k, v = self.step(u, next_tokens, rows, torch.cat(allowed, 1),
                                torch.cat(keys, 1) if keys else None,
                                torch.cat(values, 1) if values else None)
            keys.append(k)
            values.append(v)
            outputs.append(a)
            u = torch.nn.functional.pad(a[:, :-1], (0, 0, 1, 0))  # row t <- a of row t - 1
        return outputs

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens, mask = batch["tokens"], batch["mask"]  # [B, T]
        hidden = batch["hidden"]  # [B, T, H]
        length = tokens.shape[1]
        if length < 3:
            raise ValueError("EAGLE training needs sequences of at least 3 tokens")
        device = hidden.device
        u0 = self.root_features(hidden, batch.get("aux_hidden"))
        if self.training and self.config["noise"] > 0:
            # EAGLE's U(-noise, noise) augmentation, scaled to the features' RMS
            scale = u0.detach().pow(2).mean().sqrt()
            u0 = u0 + (torch.rand_like(u0) * 2 - 1) * self.config["noise"] * scale
        next_tokens = torch.nn.functional.pad(tokens[:, 1:], (0, 1))  # row t: token t + 1
        steps = max(1, int(self.config["ttt_steps"]))
        rows = torch.arange(length, device=device)
        # rows t whose targets exist: token t + 1 fed, teacher at t + 1
        has_target = mask & torch.nn.functional.pad(mask[:, 1:], (0, 1))  # [B, T]
        label_ids = torch.nn.functional.pad(batch["label_draft_ids"][:, 2:], (0, 2), value=-1)
        teacher_ids = torch.nn.functional.pad(batch["teacher_draft_ids"][:, 1:], (0, 0, 0, 1), value=-1)
        teacher_probs = torch.nn.functional.pad(batch["teacher_probs"][:, 1:], (0, 0, 0, 1))
        reg_target = torch.nn.functional.pad(hidden[:, 1:], (0, 0, 0, 1))  # f_{t+1}
        total, metrics = 0.0, {}
        for j, a in enumerate(self.unroll(u0, next_tokens, steps)):
            valid = has_target & (rows >= j)[None]
            token_loss, agree = distillation_loss(self.logits(a), label_ids, teacher_ids,
                                                  teacher_probs, valid, self.config["loss"])
            value = self.config["token_weight"] * token_loss
            if self.config["reg_weight"] > 0:
                reg = torch.nn.functional.smooth_l1_loss(a, reg_target, reduction="none").mean(-1)
                value = value + self.config["reg_weight"] * (reg * valid).sum() / valid.sum().clamp(min=1)
            total = total + STEP_DECAY ** j * value
            metrics[f"top1_{j}"] = float(agree)
        return total, metrics


class Eagle3Module(EagleModule):
    kind = "eagle3"

    @classmethod
    def for_training(cls, target, draft_to_target, loss: str = "kl", features: str = "fused",
                     aux_layers=(), ttt_steps: int = 4, noise: float = 0.0, **options):
        return super().for_training(target, draft_to_target, loss=loss, features=features,
                                    aux_layers=aux_layers, ttt_steps=ttt_steps, noise=noise, **options)


class EagleDrafter(DrafterBase):
    """``drafters.get("eagle2", weights="eagle", tree="dynamic", depth=6, top_k=8, beam=8,
    max_nodes=32, min_value=0.05, head_vocab=None)``.

    ``weights``: shipped name (``eagle``, ``eagle3``), a folder from ``specdec train eagle|eagle3``
    or a loaded module. ``tree``: ``"dynamic"`` (EAGLE-2) or Medusa-style rank paths (static,
    EAGLE-1). The drafter keeps its own key/value cache of the committed context (one row per
    committed token but the newest), extended each step with the target's features of the tokens
    the step committed. ``dtype``: the drafter's compute dtype; ``"auto"`` picks bfloat16 where
    the device runs it natively (drafters/draft_layer.py ``fast_dtype``) for weights loaded by
    name or path, and leaves a module passed in as it is.

    Cost controls for CPUs, where every drafter call streams the layer's and the head's weights:
    ``min_value``: a dynamic tree expands only nodes whose value (path probability) is at least
    this; a level with none is not run (deep levels of values ~0.01 cost a layer call each and
    are cut by any budget). ``head_vocab``: draft only among the first ``head_vocab`` tokens of
    the draft vocabulary, which is ordered by frequency, so the head streams that many rows
    instead of all (frequency-ranked drafting, Zhao et al. 2025, "FR-Spec: Accelerating
    Large-Vocabulary Language Models via Frequency-Ranked Speculative Sampling",
    arXiv:2502.14856). Neither affects losslessness.
    """

    needs_hidden_states = True
    default_weights = "eagle"
    default_tree: str | list = DEFAULT_TREE

    def __init__(self, weights: str | Path | EagleModule | None = None, tree=None, depth: int = 6,
                 top_k: int = 8, beam: int = 8, max_nodes: int = 32, with_draft_probs: bool = True,
                 dtype: str | torch.dtype | None = "auto", min_value: float = 0.05,
                 head_vocab: int | None = None):
        self.weights = weights or self.default_weights
        self.module: EagleModule | None = weights if isinstance(weights, EagleModule) else None
        tree = self.default_tree if tree is None else tree
        self.dynamic = tree == "dynamic"
        if not self.dynamic:
            self.tree_paths, _ = rank_tree_children(tree)
        for name, value in (("depth", depth), ("top_k", top_k), ("beam", beam), ("max_nodes", max_nodes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.depth, self.top_k, self.beam, self.max_nodes = depth, top_k, beam, max_nodes
        if not 0.0 <= float(min_value) < 1.0:
            raise ValueError(f"min_value is a path probability in [0, 1), got {min_value!r}")
        if head_vocab is not None and (not isinstance(head_vocab, int) or head_vocab < top_k):
            raise ValueError(f"head_vocab must be an integer of at least top_k ({top_k}), "
                             f"got {head_vocab!r}")
        self.min_value, self.head_vocab = float(min_value), head_vocab
        self._head = self._draft_to_target = None  # the (possibly truncated) head and its ids
        self.with_draft_probs = with_draft_probs
        if dtype not in ("auto", None) and not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, str(dtype), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError("dtype must be 'auto', None or a torch dtype such as 'bfloat16'")
        self.dtype = dtype
        self._target = None
        # the layer's key/value rows: the committed context (one row per committed token but the
        # newest), then the rows of the tree being drafted (overwritten by the next step's)
        self._cache = LayerCache()
        self._fed = 0  # committed tokens whose rows are in the cache

    def begin(self, state: DecodingState) -> None:
        if self.module is None or self._target is not state.target:
            if not isinstance(self.weights, EagleModule):
                kind = _read_kind(self.weights)
                cls = Eagle3Module if kind == "eagle3" else EagleModule
                self.module = cls.from_pretrained(self.weights, state.target)
                if self.dtype == "auto":
                    self.module.to(fast_dtype(state.device))
            if isinstance(self.dtype, torch.dtype):
                self.module.to(self.dtype)
            self._target = state.target
            self._head = None
        if self._head is None:
            rows = self.module.head_weight.shape[0]
            if self.head_vocab is not None and self.head_vocab > rows:
                raise ValueError(f"head_vocab={self.head_vocab} but the drafter's vocabulary has "
                                 f"only {rows} tokens: use at most {rows}")
            # one view kept across steps, so the kernel's cached panels are reused
            self._head = self.module.head_weight[: self.head_vocab or rows]
            self._draft_to_target = self.module.draft_to_target[: self.head_vocab or rows]
        self._cache = LayerCache()
        self._fed = 0

    def _extend_context(self, state: DecodingState) -> torch.Tensor:
        """Feed the rows of the tokens committed since the last call; [H] output of the last row
        (it predicts the first draft token)."""
        module = self.module
        hidden = state.hidden_states
        m = hidden[-1].shape[0]
        aux = None
        dtype = module.fc.weight.dtype
        if module.config["features"] == "fused":
            aux = torch.stack([hidden[i] for i in module.config["aux_layers"]], 1)[None].to(dtype)
        u = module.root_features(hidden[-1][None].to(dtype), aux)  # [1, m, H]
        n_tokens = len(state.tokens)
        start = n_tokens - 1 - m  # position of the first fed row
        if start != self._fed:
            raise RuntimeError(f"EAGLE drafter out of step: {self._fed} rows cached, new rows start "
                               f"at {start}; call begin() before a new generation")
        next_tokens = torch.tensor([state.tokens[-m:]], device=u.device)
        positions = torch.arange(start, start + m, device=u.device)
        allowed = torch.ones(m, start + m, dtype=torch.bool)
        allowed[:, start:] = torch.ones(m, m, dtype=torch.bool).tril_()
        a = module.step_cached(u, next_tokens, positions, allowed, self._cache, start)
        self._fed = start + m
        return a[0, -1]

    @torch.no_grad()
    def propose(self, state: DecodingState) -> DraftTree:
        if self.module is None or self._head is None:
            self.begin(state)
        if state.hidden_states is None:
            return DraftTree.empty()
        module = self.module
        root_out = self._extend_context(state)  # [H]
        root_pos = len(state.tokens) - 1
        context = self._fed
        draft_to_target = self._draft_to_target
        want_probs = self.with_draft_probs and not state.sampling.greedy

        # created nodes: token (target id), parent, value, depth, output row (when expanded)
        tokens: list[int] = []
        parents: list[int] = []
        values: list[float] = []
        depths: list[int] = []
        rank_path: list[tuple[int, ...]] = []
        draft_probs: dict[int, torch.Tensor] = {}
        lineage: dict[int, list[int]] = {-1: []}  # node -> tree rows of its expanded ancestors
        n_tree = 0  # tree rows in the cache (after the context's)

        def add_children(level: list[int], logits: torch.Tensor, depth: int) -> None:
            """Children of each node in ``level`` from its draft logits [n, Vd], in one batch."""
            ranks = [wanted_ranks(node) for node in level]
            top = torch.topk(torch.softmax(logits.float(), -1), max(max(r) for r in ranks) + 1)
            top_tokens = draft_to_target[top.indices].tolist()  # [n, width] target ids
            top_probs = top.values.tolist()
            for row, node in enumerate(level):
                if want_probs:
                    draft_probs[node] = draft_probs_on_target(logits[row], draft_to_target,
                                                              state.vocab_size, state)
                base_value = values[node] if node >= 0 else 1.0
                base_path = rank_path[node] if node >= 0 else ()
                for r in ranks[row]:
                    tokens.append(top_tokens[row][r])
                    parents.append(node)
                    values.append(base_value * top_probs[row][r])
                    depths.append(depth)
                    rank_path.append(base_path + (r,))

        def wanted_ranks(parent: int) -> list[int]:
            if self.dynamic:
                return list(range(self.top_k))
            path = rank_path[parent] if parent >= 0 else ()
            return sorted(p[-1] for p in self.tree_paths if len(p) == len(path) + 1 and p[:-1] == path)

        add_children([-1], module.logits(root_out, self._head)[None], 1)
        max_depth = self.depth if self.dynamic else max(len(p) for p in self.tree_paths)
        max_nodes = self.max_nodes
        if self.dynamic and state.node_budget is not None:
            # the cost-aware budget cut the last tree to node_budget nodes: draft one more (so
            # the tree can grow back when it pays) and no deeper than that many nodes reach,
            # which saves the layer calls of the levels the budget would drop
            max_nodes = min(max_nodes, state.node_budget + 1)
            max_depth = min(max_depth, max_nodes)
        out_of: dict[int, torch.Tensor] = {-1: root_out}
        for depth in range(1, max_depth):
            level = [i for i, d in enumerate(depths) if d == depth]
            if self.dynamic:
                level = sorted((i for i in level if values[i] >= self.min_value),
                               key=lambda i: -values[i])[: self.beam]
            else:
                level = [i for i in level if wanted_ranks(i)]
            if not level:
                break
            # one layer call for the whole level: each row sees the context, its ancestors, itself
            allowed = torch.zeros(len(level), context + n_tree + len(level), dtype=torch.bool)
            allowed[:, :context] = True
            for r, node in enumerate(level):
                lineage[node] = lineage[parents[node]] + [n_tree + r]
                allowed[r, [context + c for c in lineage[node]]] = True
            u = torch.stack([out_of[parents[i]] for i in level])[None]  # [1, n, H]
            next_tokens = torch.tensor([[tokens[i] for i in level]], device=u.device)
            # row of a depth-d node: (predicted feature of position root + d - 1, its token)
            positions = torch.full((len(level),), root_pos + depth - 1, device=u.device)
            a = module.step_cached(u, next_tokens, positions, allowed, self._cache, context + n_tree)
            n_tree += len(level)
            logits = module.logits(a[0], self._head)  # [n, Vd]
            for r, node in enumerate(level):
                out_of[node] = a[0, r]
            add_children(level, logits, depth + 1)

        if self.dynamic:
            # rerank: the most valuable nodes of any depth; a parent's value is never below its
            # child's, and ties go to the shallower node, so parents are always kept
            order = sorted(range(len(tokens)), key=lambda i: (-values[i], depths[i], i))
            keep = sorted(order[:max_nodes], key=lambda i: (depths[i], i))
        else:
            keep = sorted(range(len(tokens)), key=lambda i: (depths[i], i))
        new_index = {-1: -1, **{old: new for new, old in enumerate(keep)}}
        tree_probs = {new_index[p]: q for p, q in draft_probs.items() if p in new_index}
        return DraftTree([tokens[i] for i in keep], [new_index[parents[i]] for i in keep],
                         tree_probs, {}, "deterministic",
                         torch.tensor([values[i] for i in keep], dtype=torch.float32))


def _read_kind(weights) -> str:
    import json

    from drafters.trained import CONFIG_NAME, resolve_weights
    return json.loads((resolve_weights(weights) / CONFIG_NAME).read_text()).get("kind", "eagle")


class Eagle2Drafter(EagleDrafter):
    """``drafters.get("eagle2")``: EAGLE weights, EAGLE-2 dynamic tree."""

    default_tree = "dynamic"


class Eagle3Drafter(EagleDrafter):
    """``drafters.get("eagle3")``: EAGLE-3 weights (fused features, training-time test),
    EAGLE-2 dynamic tree."""

    default_weights = "eagle3"
    default_tree = "dynamic"
