"""The cost-aware tree budget (specdec/cost.py): latency profiles, acceptance estimates, the
choice of tree size, and the loop with ``tree_budget``."""

from __future__ import annotations

import json
import random

import pytest
import torch

import drafters
from conftest import tiny_model
from drafters.base import DrafterBase
from specdec.cost import AcceptanceEstimator, LatencyProfile, TreeBudget, make_budget
from specdec.loop import speculative_generate
from specdec.state import StepResult
from specdec.tree import DraftTree, TreeError


def random_tree(rng: random.Random, n: int, scored: bool) -> DraftTree:
    parents, scores = [], []
    for node in range(n):
        parent = rng.randrange(-1, node)
        parents.append(parent)
        top = 1.0 if parent < 0 else scores[parent]
        scores.append(top * rng.uniform(0.05, 1.0))
    return DraftTree(list(range(n)), parents, node_scores=scores if scored else None)


# ---------------------------------------------------------------------------------- tree edits
def test_prune_keeps_scores_and_refuses_orphans():
    tree = DraftTree([5, 6, 7, 8], [-1, 0, 0, 1], node_scores=[0.9, 0.5, 0.3, 0.2])
    pruned = tree.prune([3, 1, 0])
    assert pruned.tokens == [5, 6, 8] and pruned.parent_list == [-1, 0, 1]
    assert pruned.node_scores.tolist() == pytest.approx([0.9, 0.5, 0.2])
    assert tree.truncate_depth(1).node_scores.tolist() == pytest.approx([0.9])
    with pytest.raises(TreeError, match="without its parent"):
        tree.prune([0, 3])
    with pytest.raises(TreeError, match="cannot grow"):
        DraftTree([1, 2], [-1, 0], node_scores=[0.2, 0.5])
    with pytest.raises(TreeError, match="one score per node"):
        DraftTree([1, 2], [-1, 0], node_scores=[0.2])


# ---------------------------------------------------------------------------------- profile
def test_cost_is_monotone_and_interpolates():
    profile = LatencyProfile([1, 4, 16], [0.05, 0.04, 0.10])  # noisy: 4 measured below 1
    assert profile.cost(1) == profile.cost(4) == 0.05
    assert profile.cost(10) == pytest.approx(0.075)
    assert profile.cost(32) == pytest.approx(0.10 + 16 * 0.05 / 12)
    costs = [profile.cost(n) for n in range(1, 70)]
    assert costs == sorted(costs)


def test_profile_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calls = []
    real = LatencyProfile.measure.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LatencyProfile, "measure", classmethod(counting))
    first = LatencyProfile.for_model(model, sizes=(1, 2, 4), context=8, repeats=1, cache_dir=tmp_path)
    second = LatencyProfile.for_model(model, sizes=(1, 2, 4), context=8, repeats=1, cache_dir=tmp_path)
    assert len(calls) == 1
    assert second.seconds == first.seconds and first.sizes == [1, 2, 4]
    assert all(s > 0 for s in first.seconds)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["key"]["dtype"] == "torch.float32" and saved["key"]["device"] == "cpu"
    torch.set_num_threads(torch.get_num_threads())  # other thread counts get their own profile


# ---------------------------------------------------------------------------------- choice
@pytest.mark.parametrize("scored", [True, False])
def test_choice_is_the_best_size_and_never_costs_more_than_it_gains(scored):
    rng = random.Random(0)
    for trial in range(200):
        c0, c1 = rng.uniform(0.01, 0.1), rng.uniform(0.0, 0.02)
        bend = rng.uniform(0.0, 0.002)  # convex cost curves, as on real hardware
        sizes = [1, 2, 4, 8, 16, 32, 64]
        profile = LatencyProfile(sizes, [c0 + c1 * n + bend * n * n for n in sizes])
        budget = TreeBudget(profile)
        tree = random_tree(rng, rng.randint(1, 40), scored)
        draft_time = rng.uniform(0.0, 0.05)
        pruned = budget.choose(tree, draft_time)
        order, rates = budget.plan(tree, draft_time)
        k = len(pruned)
        # brute force over every prefix of the plan: the chosen size is the argmax
        assert rates[k] == pytest.approx(max(rates))
        # and its expected gain covers its measured cost: tokens/s >= a plain step's
        probs = budget.estimator.probabilities(tree)
        expected = 1 + sum(probs[n] for n in order[:k])
        assert expected / (draft_time + profile.cost(k + 1)) >= 1 / (draft_time + profile.cost(1)) - 1e-12
        assert budget.last_expected_tokens == pytest.approx(expected)
        # the kept nodes are a prefix of the plan, so their parents are kept too
        kept = set(order[:k])
        assert all(tree.parent_list[n] < 0 or tree.parent_list[n] in kept for n in kept)


def test_steep_cost_keeps_nothing_and_flat_cost_keeps_everything():
    tree = DraftTree([1, 2, 3, 4], [-1, 0, 1, -1], node_scores=[0.6, 0.4, 0.2, 0.1])
    steep = TreeBudget(LatencyProfile([1, 2, 8], [0.01, 0.1, 1.0]))
    assert len(steep.choose(tree)) == 0 and steep.last_expected_tokens == 1.0
    flat = TreeBudget(LatencyProfile([1, 64], [0.05, 0.05]))
    assert len(flat.choose(tree)) == 4


def test_estimates_follow_observed_acceptance():
    estimator = AcceptanceEstimator()
    chain = DraftTree([1, 2, 3], [-1, 0, 1])
    before = estimator.probabilities(chain)
    assert before == pytest.approx([0.5, 0.25, 0.125])
    for _ in range(50):  # the first token always accepted, the second never
        estimator.observe(StepResult(chain, [0], [1, 9]))
    after = estimator.probabilities(chain)
    assert after[0] > 0.9 and after[1] < 0.1
    scored = DraftTree([1, 2], [-1, 0], node_scores=[0.8, 0.7])
    for _ in range(50):  # an overconfident drafter: its 0.7-0.8 nodes are never accepted
        estimator.observe(StepResult(scored, [], [4]))
    assert max(estimator.probabilities(scored)) < 0.1


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="tree_budget must be"):
        make_budget("fast", None)
    with pytest.raises(TypeError, match="LatencyProfile"):
        TreeBudget({1: 0.1})


# ---------------------------------------------------------------------------------- loop
class ScoredChain(DrafterBase):
    """Drafts the next tokens of a fixed sequence, with made-up scores, and sometimes garbage."""

    def __init__(self, reference: list[int], prompt_length: int):
        self.reference, self.prompt_length = reference, prompt_length

    def propose(self, state):
        at = len(state.tokens)
        tokens = self.reference[at: at + 6]
        if state.step % 3 == 2:
            tokens = [(t + 1) % 64 for t in tokens]
        return DraftTree.chain(tokens) if not tokens else DraftTree(
            tokens, list(range(-1, len(tokens) - 1)),
            node_scores=[0.9 ** (i + 1) for i in range(len(tokens))])


@pytest.mark.parametrize("drafter_name", ["trie", "scored"])
def test_greedy_with_budget_equals_generate(drafter_name):
    model = tiny_model("llama", vocab=64)
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[3, 7, 3, 7, 3, 7, 1, 2]])
    expected = model.generate(prompt, do_sample=False, max_new_tokens=30)
    drafter = (drafters.get("trie") if drafter_name == "trie"
               else ScoredChain(expected[0].tolist(), prompt.shape[1]))
    # a cost curve where short trees pay and long ones do not
    budget = TreeBudget(LatencyProfile([1, 2, 4, 8], [0.010, 0.011, 0.016, 0.040]))
    out = speculative_generate(model, prompt, drafter=drafter, verifier="greedy",
                               max_new_tokens=30, temperature=0.0, tree_budget=budget)
    assert out.sequences.tolist() == expected.tolist()
    info = out.stats.extra["tree_budget"]
    assert info["mean_nodes"] == pytest.approx(sum(out.stats.tree_sizes) / out.stats.steps)
    # deep trees do not pay under this curve: the budget cut what was drafted
    assert info["mean_nodes"] < info["mean_drafted_nodes"]
    assert max(out.stats.tree_sizes) <= 4
    assert "tree budget" in out.stats.summary()
