"""drafters.union: trees of several drafters merged into one trie; greedy-lossless on the
embedded model with prompt lookup and the shipped Hydra heads; bad settings are refused."""

import pytest
import torch

import drafters
from conftest import humaneval_prompts
from drafters.union import UnionDrafter, merge_trees
from specdec.loop import speculative_generate
from specdec.tree import DraftTree


def paths(tree: DraftTree) -> set[tuple[int, ...]]:
    return {tuple(tree.tokens[i] for i in tree.path_to(node)) for node in range(len(tree))}


def test_merge_shares_prefixes_and_keeps_every_path():
    lookup = DraftTree.chain([5, 6, 7, 8])  # no scores: 0.5 ** depth
    heads = DraftTree([5, 9, 6, 3], [-1, -1, 0, 2], node_scores=torch.tensor([0.7, 0.2, 0.3, 0.1]))
    merged = merge_trees([lookup, heads], unscored=0.5)
    assert paths(merged) == paths(lookup) | paths(heads)
    assert len(merged) == 6  # 5-6 shared, then 7-8 from the lookup, 9 and 5-6-3 from the heads
    score = {tuple(merged.tokens[i] for i in merged.path_to(n)): s
             for n, s in enumerate(merged.node_scores.tolist())}
    assert score[(5,)] == pytest.approx(0.7) and score[(5, 6)] == pytest.approx(0.3)
    assert score[(5, 6, 7)] == pytest.approx(0.125) and score[(5, 6, 3)] == pytest.approx(0.1)
    assert score[(9,)] == pytest.approx(0.2)
    assert merged.sampling_of(-1) == "deterministic" and not merged.draft_probs
    assert len(merge_trees([DraftTree.empty(), heads])) == len(heads)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        UnionDrafter(members=[])
    with pytest.raises(ValueError, match="unscored must be in"):
        UnionDrafter(members=["pld"], unscored=0.0)
    with pytest.raises(ValueError, match="not members"):
        UnionDrafter(members=["pld"], member_args={"hydra": {}})


@pytest.mark.slow
def test_prompt_lookup_and_hydra_together_match_generate(embedded):
    model, tokenizer = embedded
    ids = tokenizer(humaneval_prompts(2)[1], return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:].tolist()
    union = drafters.get("union", members=["pld", "hydra"])
    assert union.needs_hidden_states  # Hydra reads the target's features
    sizes = []
    original = union.propose

    def spy(state):
        tree = original(state)
        sizes.append(len(tree))
        return tree

    union.propose = spy
    out = speculative_generate(model, ids, drafter=union, verifier="greedy", max_new_tokens=64)
    assert out.new_token_ids == want
    alone = speculative_generate(model, ids, drafter="hydra", verifier="greedy", max_new_tokens=64)
    assert alone.new_token_ids == want
    # prompt lookup's runs on code: more accepted per step than the heads alone
    assert out.stats.tau > alone.stats.tau
    assert max(sizes) > 16  # some steps carry the lookup's chain beside the heads' tree


class Chain:
    """A scripted unscored drafter: proposes ``tokens`` every step."""

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, state):
        return DraftTree.chain(self.tokens)


def test_unscored_members_are_scored_by_their_own_acceptance_record():
    from types import SimpleNamespace

    from specdec.state import StepResult

    union = UnionDrafter(members=[Chain([4, 5, 6])], unscored=0.5)
    state = SimpleNamespace(vocab_size=16)
    first = union.propose(state)
    assert first.node_scores.tolist() == pytest.approx([0.5, 0.25, 0.125])  # the prior
    for _ in range(40):  # the first two tokens always accepted, the third never
        tree = union.propose(state)
        union.observe(StepResult(tree, [0, 1], [4, 5, 9]))
    rates = union.rates(0)
    assert rates[0] > 0.9 and rates[1] > 0.9 and rates[2] < 0.1
    scores = union.propose(state).node_scores.tolist()
    assert scores[1] > 0.8 and scores[2] < 0.1
    # a budget-pruned tree (only the first node verified, then rejected) counts what it shows
    pruned = DraftTree.chain([4])
    before = [list(c) for c in union.counts[0]]
    union.propose(state)
    union.observe(StepResult(pruned, [], [7]))
    assert union.counts[0][0][1] > before[0][1] * (1 - 1 / 128) - 1e-9
    assert union.counts[0][1][1] == pytest.approx(before[1][1] * (1 - 1 / 128))
