"""Tree forwards and KV-cache commits for any Hugging Face decoder-only model.

One module, no per-architecture code: a tree of draft tokens is verified in a single forward by
passing a float 4D attention mask ``[1, 1, n, past + n]`` (0 where attention is allowed, the
dtype's minimum elsewhere) and explicit depth-based ``position_ids``. After verification the cache
keeps the committed prefix plus the accepted path: the ``DynamicCache`` layers' keys and values are
gathered along the sequence axis. Works for every model whose attention honours a custom 4D mask
(Llama, Qwen2, Mistral, GPT-2, ... tested on tiny random configs in tests/test_target.py).

Convention: the cache holds every committed token except the last one (the *root*). Each step
feeds the root plus the tree, so row 0 of the logits is the distribution after the root and row
``i + 1`` the distribution after tree node ``i``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from specdec.tree import DraftTree


def target_head_weight(target) -> torch.Tensor:
    """[V, H] the target's output projection (its embeddings when tied)."""
    head = target.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(target).__name__} has no output embeddings (lm_head)")
    return head.weight


def target_vocab_size(model) -> int:
    """Rows of the target's output head (the config's text vocabulary size without one)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def target_fingerprint(target) -> dict:
    """What a trained drafter or a cached latency profile must agree on with its target."""
    weight = target_head_weight(target).detach()
    # every 64th row, rounded to bfloat16: cheap to hash, and the same whether the target is
    # loaded in float32 or bfloat16
    sample = weight[::64].to(torch.bfloat16).float().cpu().contiguous()
    digest = hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]
    return {"hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0]),
            "lm_head_sha256": digest}


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class TreeOutput:
    logits: torch.Tensor  # [n, V] n = tree nodes + 1 (row 0: after the root)
    hidden_states: tuple[torch.Tensor, ...] | None  # per layer [n, H], when requested


class TreeForward:
    """A causal LM plus its KV cache, fed token trees.

    Tokens up to ``base`` are *committed*; tokens fed after it are *speculative*: each attends to
    the committed prefix, its speculative ancestors and itself. ``forward`` appends speculative
    tokens (possibly over several calls, as a drafter grows a tree level by level); ``commit``
    keeps chosen positions and drops the rest.
    """

    def __init__(self, model, output_hidden_states: bool = False,
                 transposed_gemm: bool | str | None = "auto",
                 fastpath: bool | str | None = "auto"):
        from specdec import engine

        self.model = model
        self.output_hidden_states = output_hidden_states
        # the lean Llama-family forward (specdec/engine/fastpath.py) for every non-prefill
        # forward, or multi-token forwards through transposed weight copies
        # (specdec/engine/gemm.py); a `FastForward` of this model is used as given (e.g. one
        # with bfloat16 panels)
        if isinstance(fastpath, engine.FastForward):
            if fastpath.model is not model:
                raise ValueError("the FastForward given as fastpath was built for another model")
            chosen = fastpath
        else:
            chosen = engine.for_model(model, fastpath, transposed_gemm)
        self.fast = chosen if isinstance(chosen, engine.FastForward) else None
        self.linears = chosen if isinstance(chosen, engine.TransposedLinears) else None
        self.cache = DynamicCache(config=model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_positions = context_length(model.config)
        # position id of each cached token (tree siblings share one, so not simply the index)
        self.cached_positions: list[int] = []
        self.base = 0  # committed length
        # for each speculative cached token (index - base): its speculative ancestors and itself
        self._spec_lineage: list[list[int]] = []

    @property
    def length(self) -> int:
        return len(self.cached_positions)

    def prefill(self, input_ids: torch.Tensor) -> TreeOutput | None:
        """Feed and commit a plain causal sequence [L]."""
        n = int(input_ids.numel())
        if n == 0:
            return None
        if self.length != self.base:
            raise RuntimeError("prefill needs a cache without speculative tokens; call rollback()")
        past = self.length
        start = self.cached_positions[-1] + 1 if past else 0
        allowed = torch.ones(n, past + n, dtype=torch.bool)
        allowed[:, past:] = torch.ones(n, n, dtype=torch.bool).tril_()
        # prefill logits are never read: the step after it re-feeds the root. The stock layout,
        # so the prompt's cache is computed exactly as model.generate computes it
        out = self._run(input_ids.reshape(-1), list(range(start, start + n)), allowed,
                        logits_to_keep=1, stock_layout=True)
        self.base = self.length
        return out

    def forward(self, token_ids: torch.Tensor, parents: torch.Tensor) -> TreeOutput:
        """Feed speculative tokens ``token_ids`` [n].

        ``parents[i]`` indexes the speculative tokens fed since the last commit (earlier calls
        first, then this call's), or is -1: a child of the last committed token.
        """
        past, base = self.length, self.base
        n = int(token_ids.numel())
        n_spec = past - base
        last_pos = self.cached_positions[base - 1] if base > 0 else -1
        positions = []
        for i, parent in enumerate(parents.tolist()):
            rel = n_spec + i
            if not -1 <= parent < rel:
                raise ValueError(f"token {i} has parent {parent}: parents must be fed before children")
            if parent < 0:
                lineage = [rel]
                positions.append(last_pos + 1)
            else:
                lineage = self._spec_lineage[parent] + [rel]
                positions.append(self._spec_position(parent, positions, n_spec) + 1)
            self._spec_lineage.append(lineage)
        allowed = torch.zeros(n, past + n, dtype=torch.bool)
        allowed[:, :base] = True
        for i in range(n):
            allowed[i, [base + r for r in self._spec_lineage[n_spec + i]]] = True
        return self._run(token_ids, positions, allowed)

    @torch.no_grad()
    def _run(self, token_ids: torch.Tensor, positions: list[int], allowed: torch.Tensor,
             logits_to_keep: int = 0, stock_layout: bool = False) -> TreeOutput:
        """One model forward; ``allowed`` [n, past + n] says which cached/new tokens each sees."""
        n, total = allowed.shape
        if self.max_positions is not None and positions and max(positions) >= self.max_positions:
            raise ValueError(
                f"position {max(positions)} is beyond the model's context of {self.max_positions} "
                f"tokens: shorten the prompt or lower max_new_tokens"
            )
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        fast = self.fast is not None and not stock_layout
        # the fast forward takes no mask when every token sees everything (a one-token step)
        mask = None
        if not (fast and bool(allowed.all())):
            mask = torch.zeros(1, 1, n, total, dtype=self.dtype)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            mask = mask.to(self.device)
        if fast:
            logits, hidden = self.fast(token_ids.to(self.device), position_ids, mask, self.cache,
                                       output_hidden_states=self.output_hidden_states)
            self.cached_positions.extend(positions)
            return TreeOutput(logits, hidden)
        layout = (contextlib.nullcontext() if self.linears is None or stock_layout
                  else self.linears.active(n))
        with layout:
            out = self.model(
                input_ids=token_ids.to(self.device).view(1, n),
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
                output_hidden_states=self.output_hidden_states,
                logits_to_keep=logits_to_keep,
            )
        self.cached_positions.extend(positions)
        hidden = tuple(h[0] for h in out.hidden_states) if self.output_hidden_states else None
        return TreeOutput(out.logits[0], hidden)

    def _spec_position(self, rel: int, new_positions: list[int], n_spec: int) -> int:
        if rel < n_spec:
            return self.cached_positions[self.base + rel]
        return new_positions[rel - n_spec]

    def commit(self, keep: list[int]) -> None:
        """Keep cache indices ``keep`` (ascending), drop the rest, and mark all kept as committed."""
        if keep != list(range(self.length)):
            # keep = an unchanged prefix (the committed tokens and the accepted path's first
            # nodes when they come first) + a tail moved down into place: only the tail's rows
            # are copied, the rest stays where it is (a view), whatever the context length
            prefix = 0
            while prefix < len(keep) and keep[prefix] == prefix:
                prefix += 1
            tail = keep[prefix:]
            index = torch.tensor(tail, dtype=torch.long, device=self.device) if tail else None
            for layer in self.cache.layers:
                if type(layer) is not DynamicLayer:
                    raise NotImplementedError(
                        f"cache layer {type(layer).__name__} cannot be rolled back to an accepted "
                        f"path; specdec needs a plain DynamicCache (disable sliding-window caches)"
                    )
                if not layer.is_initialized or not layer.keys.numel():
                    continue
                if index is not None:  # tail rows sit after position `prefix`: read, then write
                    for name in ("keys", "values"):
                        cached = getattr(layer, name)
                        moved = cached.index_select(-2, index)
                        cached[..., prefix: len(keep), :].copy_(moved)
                layer.keys = layer.keys[..., : len(keep), :]
                layer.values = layer.values[..., : len(keep), :]
        self.cached_positions = [self.cached_positions[i] for i in keep]
        self.base = len(keep)
        self._spec_lineage = []

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` cached tokens, all committed."""
        self.commit(list(range(min(length, self.length))))

    def rollback(self) -> None:
        """Drop every speculative token, keeping the committed prefix."""
        self.commit(list(range(self.base)))

    def verify(self, root_token: int, tree: DraftTree) -> TreeOutput:
        """Feed the root plus ``tree``: logits row 0 follows the root, row i + 1 node i."""
        if self.length != self.base:
            raise RuntimeError("verify needs a cache without speculative tokens; call rollback()")
        tokens = torch.cat([torch.tensor([root_token]), tree.token_ids])
        parents = torch.cat([torch.tensor([-1]), tree.parents + 1])
        return self.forward(tokens, parents)

    def commit_path(self, accepted_nodes: list[int]) -> None:
        """After `verify`: commit the root and the accepted tree nodes, drop the other nodes."""
        base = self.base
        self.commit(list(range(base + 1)) + [base + 1 + node for node in accepted_nodes])
