"""The node-rule contract every verifier implements, and the tree walk that applies it.

Glossary (after vLLM's rejection sampler):

- **draft tokens**: a node's children, proposed by the drafter, in drafting order.
- **accepted token**: a draft token the rule keeps; the walk descends into it.
- **recovered token**: the token a rule emits at a node when it rejects every child, drawn from the
  residual of the target distribution.
- **bonus token**: the token drawn from the target at a leaf, after every draft on the path was
  accepted.

A rule is a pure function of tensors plus a ``torch.Generator``: it never calls a model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from specdec.sampling import sample
from specdec.tree import ROOT, DraftTree


@runtime_checkable
class NodeRule(Protocol):
    lossless: ClassVar[bool]

    def select(self, target_probs: torch.Tensor,  # [V] warped target distribution at this node
               draft_tokens: list[int],  # [k] this node's children, in drafting order
               draft_probs: torch.Tensor | None,  # [V] q the children were drawn from, or None
               *, sampling: str, generator: torch.Generator | None,
               context: Any = None) -> tuple[int, int]:
        """(index of the accepted child or -1, token emitted at this node)."""


def check_sampling(rule: object, sampling: str, supported: tuple[str, ...]) -> None:
    if sampling not in supported:
        raise ValueError(
            f"verifier {type(rule).__name__} does not support sampling={sampling!r} children "
            f"(supported: {', '.join(supported)}); choose another verifier or drafter mode"
        )


def walk_tree(rule: NodeRule, tree: DraftTree, target_probs_of, generator, context_of=None
              ) -> tuple[list[int], int]:
    """Walk ``tree`` from the root with ``rule``.

    ``target_probs_of(row)`` gives the warped target distribution after tree row ``row`` (0 = root,
    ``i + 1`` = node ``i``); rows are computed lazily because the walk visits few of them.
    Returns (accepted node indices in path order, the emitted recovered-or-bonus token).
    """
    accepted: list[int] = []
    node = ROOT
    while True:
        children = tree.children(node)
        target_probs = target_probs_of(node + 1)  # [V]
        if not children:
            return accepted, sample(target_probs, generator)
        draft_tokens = [tree.tokens[c] for c in children]
        context = context_of(node, children) if context_of is not None else None
        index, token = rule.select(target_probs, draft_tokens, tree.draft_probs_of(node),
                                   sampling=tree.sampling_of(node), generator=generator,
                                   context=context)
        if index < 0:
            return accepted, token
        node = children[index]
        accepted.append(node)
