"""Every registered verifier walks a real DraftTree through `verifiers.walk_tree`, seeded."""

from __future__ import annotations

import pytest
import torch

import verifiers
from specdec.tree import DraftTree
from verifiers.judge import JudgeHead

VOCAB, HIDDEN = 12, 6


def build(name):
    if name == "lantern":
        return verifiers.get(name, embeddings=torch.randn(VOCAB, 4,
                                                          generator=torch.Generator().manual_seed(0)))
    if name == "judge":
        torch.manual_seed(0)
        return verifiers.get(name, head=JudgeHead(HIDDEN), threshold=0.5)
    return verifiers.get(name)


def tree_and_target(sampling):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, VOCAB, generator=generator)
    rows = torch.softmax(logits, -1)  # [N + 1, V] target after the root and after each node
    draft = torch.softmax(logits[0] * 0.7, -1)  # [V] q of the root's children
    if sampling == "iid":
        children = torch.multinomial(draft, 3, replacement=True, generator=generator).tolist()
    elif sampling == "without_replacement":
        children = torch.multinomial(draft, 3, replacement=False, generator=generator).tolist()
    else:
        children = torch.topk(draft, 3).indices.tolist()
    # three children of the root, then a chain of two under the first child (every q > 0, so
    # any token could have been drawn there)
    chain_draft = torch.softmax(logits[1] * 0.7, -1)  # [V]
    tree = DraftTree(torch.tensor(children + [5, 7]), torch.tensor([-1, -1, -1, 0, 3]),
                     {-1: draft, 0: chain_draft, 3: chain_draft}, {}, sampling)
    return tree, rows


@pytest.mark.parametrize("name", sorted(set(verifiers.available()) - {"greedy"}))
@pytest.mark.parametrize("sampling", ["iid", "without_replacement", "deterministic"])
def test_walk_tree_with_every_rule(name, sampling):
    rule = build(name)
    tree, rows = tree_and_target(sampling)
    hidden = torch.randn(len(tree) + 1, HIDDEN, generator=torch.Generator().manual_seed(2))

    def context_of(node, children):
        return {"parent_hidden": hidden[node + 1], "children_hidden": hidden[[c + 1 for c in children]]}

    def walk(seed):
        return verifiers.walk_tree(rule, tree, lambda row: rows[row],
                                   torch.Generator().manual_seed(seed), context_of)

    supported = getattr(rule, "supported", ("iid", "without_replacement", "deterministic"))
    if sampling not in supported:
        with pytest.raises(ValueError, match="does not support sampling"):
            walk(0)
        return
    for seed in range(20):
        accepted, token = walk(seed)
        assert accepted == tree.path_to(accepted[-1]) if accepted else accepted == []
        assert 0 <= token < VOCAB
        assert walk(seed) == (accepted, token)  # same seed, same walk


def test_unknown_name_lists_the_verifiers():
    with pytest.raises(ValueError, match="spectr"):
        verifiers.get("nope")
