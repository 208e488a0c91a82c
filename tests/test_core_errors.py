"""Bad input gets a clear error that says what to change."""

import pytest
import torch

import drafters
import verifiers
from conftest import tiny_model
from drafters.base import DrafterBase
from specdec import DraftTree, TreeError, speculative_generate


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=96)


def generate(target, prompt=((1, 2, 3),), **kw):
    args = dict(drafter="pld", verifier="greedy", max_new_tokens=5)
    args.update(kw)
    return speculative_generate(target, torch.tensor(prompt) if prompt is not None else None, **args)


def test_mismatched_vocabularies(target):
    draft = tiny_model("llama", vocab=80)
    with pytest.raises(ValueError, match=r"vocabulary \(80 tokens\) does not match the target's \(96\)"):
        generate(target, drafter=drafters.get("small-lm", model=draft))


class FixedTree(DrafterBase):
    def __init__(self, tree):
        self.tree = tree

    def propose(self, state):
        return self.tree


def test_malformed_trees(target):
    with pytest.raises(TreeError, match="outside the target vocabulary"):
        generate(target, drafter=FixedTree(DraftTree([5, 500], [-1, 0])))
    with pytest.raises(TreeError, match="no draft_probs"):
        generate(target, drafter=FixedTree(DraftTree([5, 6], [-1, -1], sampling={-1: "iid"})),
                 verifier="exact")
    with pytest.raises(TreeError, match="parents must come before"):
        DraftTree([5, 6], [1, -1])
    with pytest.raises(TreeError, match="over the budget"):
        DraftTree.chain(list(range(20))).validate(96, max_nodes=16)


def test_empty_prompt_and_impossible_lengths(target):
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(target, prompt=[[]])
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
            generate(target, max_new_tokens=bad)
    with pytest.raises(ValueError, match="longer than the model's context of 256: truncate"):
        generate(target, prompt=[list(range(90)) * 3])
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 57"):
        generate(target, prompt=[list(range(50)) * 4], max_new_tokens=100)


def test_batches_are_refused(target):
    with pytest.raises(ValueError, match="batch size 2 is not supported yet.*once per prompt"):
        generate(target, prompt=[[1, 2, 3], [4, 5, 6]])


def test_names_and_modes(target):
    with pytest.raises(ValueError, match="unknown drafter 'medusa-xl'; valid names: .*pld"):
        drafters.get("medusa-xl")
    with pytest.raises(ValueError, match="unknown verifier 'nope'; valid names: .*exact.*greedy"):
        verifiers.get("nope")
    with pytest.raises(ValueError, match="use verifier 'exact' to sample"):
        generate(target, temperature=0.8)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(target, temperature=-1.0, verifier="exact")
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(target, temperature=1.0, top_p=1.5, verifier="exact")
    with pytest.raises(ValueError, match="does not support sampling='beam'|not one of"):
        DraftTree([1], [-1], default_sampling="beam")


def test_context_is_respected_near_its_end(target):
    """A prompt ending near the context limit still generates: trees are pruned to fit."""
    prompt = [[i % 96 for i in range(250)]]
    out = generate(target, prompt=prompt, max_new_tokens=7, drafter=FixedTree(DraftTree.chain([1] * 12)))
    assert out.stats.new_tokens == 7
