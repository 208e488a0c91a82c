"""TreeForward: one tree forward equals sequential decoding; commits keep exactly the accepted
path, so after many steps the cache equals a fresh prefill of the committed tokens."""

import random

import pytest
import torch

from conftest import ARCHS, tiny_model
from specdec.target import TreeForward
from specdec.tree import DraftTree


def random_tree(rng: random.Random, vocab: int, max_nodes: int = 10) -> DraftTree:
    n = rng.randint(0, max_nodes)
    parents = [rng.randint(-1, i - 1) for i in range(n)]
    return DraftTree([rng.randrange(vocab) for _ in range(n)], parents)


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_logits_match_sequential_decoding(arch):
    model = tiny_model(arch)
    prompt = [3, 17, 42, 5, 9, 11]
    fwd = TreeForward(model)
    fwd.prefill(torch.tensor(prompt[:-1]))
    tree = DraftTree([5, 7, 9, 11, 13, 2], [-1, -1, 0, 0, 2, 1])
    out = fwd.verify(prompt[-1], tree)
    torch.testing.assert_close(out.logits[0], reference_logits(model, prompt), atol=1e-5, rtol=0)
    for node in range(len(tree)):
        path = prompt + [tree.tokens[i] for i in tree.path_to(node)]
        torch.testing.assert_close(out.logits[node + 1], reference_logits(model, path),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_after_many_commits_equals_fresh_prefill(arch):
    model = tiny_model(arch)
    rng = random.Random(arch)
    committed = [rng.randrange(96) for _ in range(7)]
    fwd = TreeForward(model)
    fwd.prefill(torch.tensor(committed[:-1]))
    rejections = 0
    for _ in range(25):
        tree = random_tree(rng, 96)
        fwd.verify(committed[-1], tree)
        # accept a random root-to-node path, possibly stopping early (a rejection)
        path = tree.path_to(rng.randrange(len(tree))) if len(tree) else []
        accepted = path[: rng.randint(0, len(path))]
        rejections += len(accepted) < len(path) or len(tree) > len(path)
        fwd.commit_path(accepted)
        committed += [tree.tokens[n] for n in accepted] + [rng.randrange(96)]
    assert rejections > 10
    assert fwd.length == len(committed) - 1
    assert fwd.cached_positions == list(range(len(committed) - 1))
    with torch.no_grad():
        fresh = model(torch.tensor([committed[:-1]]), use_cache=True).past_key_values
    for ours, ref in zip(fwd.cache.layers, fresh.layers):
        torch.testing.assert_close(ours.keys, ref.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.values, ref.values, atol=1e-5, rtol=0)
    # and the next step still decodes correctly from the committed cache
    out = fwd.verify(committed[-1], DraftTree.empty())
    torch.testing.assert_close(out.logits[0], reference_logits(model, committed), atol=1e-5, rtol=0)


def test_tree_grown_over_several_forwards_and_rolled_back():
    """A drafter feeds a tree level by level (parents index earlier speculative tokens)."""
    model = tiny_model("llama")
    prompt = [4, 8, 15, 16, 23, 42]
    fwd = TreeForward(model)
    fwd.prefill(torch.tensor(prompt))
    level1 = fwd.forward(torch.tensor([7, 9]), torch.tensor([-1, -1]))
    level2 = fwd.forward(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(level1.logits[1], reference_logits(model, prompt + [9]), atol=1e-5, rtol=0)
    torch.testing.assert_close(level2.logits[2], reference_logits(model, prompt + [9, 3]), atol=1e-5, rtol=0)
    fwd.rollback()
    assert fwd.length == len(prompt)
    again = fwd.forward(torch.tensor([9]), torch.tensor([-1]))
    torch.testing.assert_close(again.logits[0], reference_logits(model, prompt + [9]), atol=1e-5, rtol=0)


def test_positions_beyond_context_raise():
    model = tiny_model("llama")
    fwd = TreeForward(model)
    fwd.prefill(torch.arange(250) % 96)
    with pytest.raises(ValueError, match="beyond the model's context of 256"):
        fwd.verify(1, DraftTree.chain(list(range(10))))
