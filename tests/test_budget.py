"""The cost-aware tree budget (specdec/engine/cost.py): latency profiles, acceptance estimates, the
choice of tree size, and the loop with ``tree_budget``."""

from __future__ import annotations

import itertools
import json
import random
import statistics
import time

import pytest
import torch

import drafters
import specdec
from conftest import tiny_model
from drafters.base import DrafterBase
from specdec.engine.cost import AcceptanceEstimator, LatencyProfile, TreeBudget, make_budget
from specdec.loop import speculative_generate
from specdec.state import StepResult
from specdec.tree import DraftTree, TreeError

SIZES = [1, 2, 4, 8, 16, 32, 64]


def random_tree(rng: random.Random, n: int, scored: bool) -> DraftTree:
    parents, scores = [], []
    for node in range(n):
        parent = rng.randrange(-1, node)
        parents.append(parent)
        top = 1.0 if parent < 0 else scores[parent]
        scores.append(top * rng.uniform(0.05, 1.0))
    return DraftTree(list(range(n)), parents, node_scores=scores if scored else None)


def random_profile(rng: random.Random) -> LatencyProfile:
    c0, c1 = rng.uniform(0.01, 0.1), rng.uniform(0.0, 0.02)
    bend = rng.uniform(0.0, 0.002)  # convex, as on real hardware; plus timing noise
    return LatencyProfile(SIZES, [(c0 + c1 * n + bend * n * n) * rng.uniform(0.9, 1.1)
                                  for n in SIZES])


# ---------------------------------------------------------------------------------- tree edits
def test_prune_keeps_scores_and_refuses_orphans():
    tree = DraftTree([5, 6, 7, 8], [-1, 0, 0, 1], {-1: torch.ones(9) / 9, 1: torch.ones(9) / 9},
                     {1: "iid"}, node_scores=[0.9, 0.5, 0.3, 0.2])
    pruned = tree.prune([3, 1, 0])
    assert pruned.tokens == [5, 6, 8] and pruned.parent_list == [-1, 0, 1]
    assert pruned.node_scores.tolist() == pytest.approx([0.9, 0.5, 0.2])
    assert set(pruned.draft_probs) == {-1, 1} and pruned.sampling_of(1) == "iid"
    assert pruned.sampling_of(0) == "deterministic"
    shallow = tree.truncate_depth(1)
    assert shallow.tokens == [5] and shallow.node_scores.tolist() == pytest.approx([0.9])
    assert len(tree.prune([])) == 0
    with pytest.raises(TreeError, match="without its parent 1"):
        tree.prune([0, 3])
    with pytest.raises(TreeError, match="the tree has 4 nodes"):
        tree.prune([0, 4])


def test_node_scores_are_checked():
    with pytest.raises(TreeError, match="cannot grow"):
        DraftTree([1, 2], [-1, 0], node_scores=[0.2, 0.5])
    with pytest.raises(TreeError, match="cannot grow"):
        DraftTree([1], [-1], node_scores=[1.5])
    with pytest.raises(TreeError, match="one score per node"):
        DraftTree([1, 2], [-1, 0], node_scores=[0.2])
    assert DraftTree([1, 2, 3], [-1, 0, -1], node_scores=[0.5, 0.5, 0.9]).node_scores.shape == (3,)


# ---------------------------------------------------------------------------------- profile
def test_cost_is_monotone_and_interpolates(tmp_path):
    profile = LatencyProfile([16, 1, 4], [0.10, 0.05, 0.04])  # unsorted, and 4 measured below 1
    assert profile.sizes == [1, 4, 16]
    assert profile.cost(1) == profile.cost(4) == 0.05
    assert profile.cost(10) == pytest.approx(0.075)
    assert profile.cost(32) == pytest.approx(0.10 + 16 * 0.05 / 12)  # last slope, extrapolated
    costs = [profile.cost(n) for n in range(1, 70)]
    assert costs == sorted(costs)
    again = LatencyProfile.load(profile.save(tmp_path / "p.json"))
    assert (again.sizes, again.seconds) == (profile.sizes, profile.seconds)
    with pytest.raises(ValueError, match="finite and positive"):
        LatencyProfile([1, 2], [0.1, 0.0])
    with pytest.raises(ValueError, match="one time per size"):
        LatencyProfile([1, 2], [0.1])


def test_profile_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calls = []
    real = LatencyProfile.measure.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LatencyProfile, "measure", classmethod(counting))
    options = dict(sizes=(1, 2, 4), context=8, repeats=1, warmup=0, cache_dir=tmp_path)
    first = LatencyProfile.for_model(model, **options)
    second = LatencyProfile.for_model(model, **options)
    assert len(calls) == 1
    assert second.seconds == first.seconds and first.sizes == [1, 2, 4]
    assert all(s > 0 for s in first.seconds)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["key"]["dtype"] == "torch.float32" and saved["key"]["device"] == "cpu"
    assert saved["key"]["layers"] == 2 and "lm_head_sha256" in saved["key"]
    # another thread count, another model: measured again, each in its own file
    torch.set_num_threads(2)
    LatencyProfile.for_model(model, **options)
    torch.set_num_threads(1)
    LatencyProfile.for_model(tiny_model("llama", seed=1), **options)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 3


def test_measure_fits_a_short_context():
    model = tiny_model("gpt2")  # 256 learned positions: 256 context tokens + 64 do not fit
    profile = LatencyProfile.measure(model, sizes=(1, 64), context=256, repeats=1, warmup=0)
    assert profile.key["context"] == 256 - 64 and len(profile.seconds) == 2


# ---------------------------------------------------------------------------------- choice
def closed_subsets(tree: DraftTree):
    """Every ancestor-closed node set of a small tree."""
    parents = tree.parent_list
    for mask in itertools.product([False, True], repeat=len(tree)):
        if all(not m or parents[n] < 0 or mask[parents[n]] for n, m in enumerate(mask)):
            yield [n for n, m in enumerate(mask) if m]


@pytest.mark.parametrize("scored", [True, False])
def test_choice_is_the_best_size_and_never_costs_more_than_it_gains(scored):
    rng = random.Random(0)
    budget = TreeBudget(LatencyProfile([1], [1.0]))
    for trial in range(200):
        profile = random_profile(rng)
        budget.profile = profile
        tree = random_tree(rng, rng.randint(1, 40), scored)
        draft_time = rng.uniform(0.0, 0.05)
        pruned = budget.choose(tree, draft_time)
        order, probs, rates = budget.plan(tree, draft_time)
        k = len(pruned)
        assert budget.history[-1].nodes == k and budget.history[-1].drafted == len(tree)
        # brute force over every size n = 0..N: the chosen size has the best tokens/s
        expected = [1 + sum(probs[:n]) for n in range(len(tree) + 1)]
        speed = [e / (draft_time + profile.cost(n + 1)) for n, e in enumerate(expected)]
        assert speed[k] == pytest.approx(max(speed)) and rates == pytest.approx(speed)
        # its expected gain covers its measured cost: tokens/s >= a plain step's
        assert speed[k] >= speed[0]
        assert budget.last_expected_tokens == pytest.approx(expected[k])
        # the kept nodes are the plan's first k, their parents kept too
        assert sorted(order[:k]) == [i for i in range(len(tree)) if tree.tokens[i] in pruned.tokens]
        # feed back a random outcome so later trials see learned, not only prior, estimates
        path = tree.path_to(rng.randrange(len(tree)))[: rng.randint(0, 3)]
        budget.estimator.observe(StepResult(tree, path, [0] * (len(path) + 1)))


@pytest.mark.parametrize("scored", [True, False])
def test_choice_is_the_best_subtree_of_any_shape(scored):
    rng = random.Random(1)
    for trial in range(40):
        budget = TreeBudget(random_profile(rng))
        tree = random_tree(rng, rng.randint(1, 9), scored)
        probs = budget.estimator.probabilities(tree)
        pruned = budget.choose(tree, 0.01)
        best = max((1 + sum(probs[n] for n in keep)) / (0.01 + budget.profile.cost(len(keep) + 1))
                   for keep in closed_subsets(tree))
        got = budget.last_expected_tokens / (0.01 + budget.profile.cost(len(pruned) + 1))
        assert got == pytest.approx(best)


def test_steep_cost_keeps_nothing_and_flat_cost_keeps_everything():
    tree = DraftTree([1, 2, 3, 4], [-1, 0, 1, -1], node_scores=[0.6, 0.4, 0.2, 0.1])
    steep = TreeBudget(LatencyProfile([1, 2, 8], [0.01, 0.1, 1.0]))
    assert len(steep.choose(tree)) == 0 and steep.last_expected_tokens == 1.0
    flat = TreeBudget(LatencyProfile([1, 64], [0.05, 0.05]))
    kept = flat.choose(tree)
    assert kept is tree and flat.last_expected_tokens == pytest.approx(2.3)
    # the CPU figures (60 / 107 / 277 ms for 1 / 16 / 64 tokens): a likely chain pays,
    # a long tail of unlikely nodes does not
    cpu = TreeBudget(LatencyProfile([1, 16, 64], [0.060, 0.107, 0.277]))
    chain = DraftTree(list(range(40)), list(range(-1, 39)),
                      node_scores=[0.8 ** (i + 1) for i in range(40)])
    assert 3 <= len(cpu.choose(chain)) < 40


def test_estimates_follow_observed_acceptance():
    estimator = AcceptanceEstimator()
    chain = DraftTree([1, 2, 3], [-1, 0, 1])
    assert estimator.probabilities(chain) == pytest.approx([0.5, 0.25, 0.125])
    for _ in range(50):  # the first token always accepted, the second never
        estimator.observe(StepResult(chain, [0], [1, 9]))
    after = estimator.probabilities(chain)
    assert after[0] > 0.9 and after[1] < 0.1
    scored = DraftTree([1, 2], [-1, 0], node_scores=[0.8, 0.7])
    for _ in range(50):  # an overconfident drafter: its 0.7-0.8 nodes are never accepted
        estimator.observe(StepResult(scored, [], [4]))
    assert max(estimator.probabilities(scored)) < 0.1
    # evidence fades: after many plain steps the estimates are back near the priors, so a
    # budget that stopped drafting tries again
    for _ in range(2000):
        estimator.observe(StepResult(DraftTree.empty(), [], [4]))
    assert estimator.probabilities(chain)[1] > 0.2
    assert estimator.probabilities(scored)[0] > 0.5


def test_rates_are_learned_per_rank_as_drafted():
    budget = TreeBudget(LatencyProfile([1, 4], [0.01, 0.013]))
    budget.estimator.rank_counts[(1, 0)] = [0.0, 100.0]  # the top-ranked guess never pays
    tree = DraftTree([7, 8], [-1, -1])
    pruned = budget.choose(tree)
    assert pruned.tokens == [8]  # rank 1 as drafted, rank 0 once pruned
    budget.observe(StepResult(pruned, [0], [8, 5]))
    assert budget.estimator.rank_counts[(1, 1)][0] == pytest.approx(1.0)
    assert budget.estimator.rank_counts[(1, 0)][0] == 0.0
    assert budget.history[-1].measured_verify_s == 0.0  # StepResult's default target_time


def test_estimates_and_choice_are_cheap():
    rng = random.Random(2)
    budget = TreeBudget(LatencyProfile([1, 16, 64], [0.060, 0.107, 0.277]))
    for scored in (True, False):
        times = []
        for _ in range(60):
            tree = random_tree(rng, 64, scored)
            start = time.perf_counter()
            pruned = budget.choose(tree, 0.005)
            budget.observe(StepResult(pruned, pruned.path_to(0) if len(pruned) else [], [1]))
            times.append(time.perf_counter() - start)
        assert statistics.median(times) < 1e-3  # per step, on a 64-node tree


def test_bad_budget_is_refused():
    for bad in ("fast", 5, {"auto": True}):
        with pytest.raises(ValueError, match="tree_budget must be None, 'auto'"):
            make_budget(bad, None)
    with pytest.raises(TypeError, match="LatencyProfile"):
        TreeBudget({1: 0.1})
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="tree_budget must be"):
        speculative_generate(model, torch.tensor([[1, 2]]), drafter="pld", verifier="greedy",
                             max_new_tokens=2, tree_budget="on")


# ---------------------------------------------------------------------------------- loop
class ScoredTree(DrafterBase):
    """An EAGLE-2-like drafter: knows the greedy continuation, drafts it with wrong siblings and
    made-up path probabilities, and every third step drafts only garbage."""

    def __init__(self, reference: list[int], vocab: int):
        self.reference, self.vocab = reference, vocab
        self.hints: list[int | None] = []

    def propose(self, state):
        self.hints.append(state.node_budget)
        at = len(state.tokens)
        right = self.reference[at: at + 6]
        if not right:
            return DraftTree.empty()
        if state.step % 3 == 2:
            right = [(t + 1) % self.vocab for t in right]
        tokens, parents, scores = [], [], []
        parent, score = -1, 1.0
        for t in right:  # the spine, and a wrong sibling beside each spine node
            tokens += [t, (t + 2) % self.vocab]
            parents += [parent, parent]
            scores += [score * 0.8, score * 0.1]
            parent, score = len(tokens) - 2, score * 0.8
        return DraftTree(tokens, parents, node_scores=scores)


@pytest.fixture
def latency_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    return tmp_path / "latency"


@pytest.mark.parametrize("drafter_name", ["trie", "pld", "scored"])
def test_greedy_with_auto_budget_equals_generate(drafter_name, latency_cache):
    model = tiny_model("llama", vocab=64, scale=4.0)
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[3, 7, 3, 7, 3, 7, 1, 2, 3, 7]])
    expected = model.generate(prompt, do_sample=False, max_new_tokens=40)
    drafter = (ScoredTree(expected[0].tolist(), 64) if drafter_name == "scored"
               else drafters.get(drafter_name))
    out = speculative_generate(model, prompt, drafter=drafter, verifier="greedy",
                               max_new_tokens=40, temperature=0.0, tree_budget="auto")
    assert out.sequences.tolist() == expected.tolist()
    assert len(list(latency_cache.glob("*.json"))) == 1  # measured once, cached
    info = out.stats.extra["tree_budget"]
    assert info["nodes_per_step"] == out.stats.tree_sizes
    assert info["mean_nodes"] == pytest.approx(sum(out.stats.tree_sizes) / out.stats.steps)
    assert 0 < info["mean_drafted_nodes"] and info["mean_nodes"] <= info["mean_drafted_nodes"]
    assert 1.0 <= info["expected_tau"] and info["measured_verify_ms"] > 0
    assert sorted(info["profile"]) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert f"tree budget: {info['mean_nodes']:.1f}" in out.stats.summary()


def test_budget_cuts_trees_and_hints_the_drafter():
    model = tiny_model("llama", vocab=64, scale=4.0)
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[3, 7, 3, 7, 1, 2]])
    expected = model.generate(prompt, do_sample=False, max_new_tokens=30)
    drafter = ScoredTree(expected[0].tolist(), 64)
    # short trees pay under this curve, long ones do not
    budget = TreeBudget(LatencyProfile([1, 2, 4, 8], [0.010, 0.011, 0.016, 0.040]))
    out = speculative_generate(model, prompt, drafter=drafter, verifier="greedy",
                               max_new_tokens=30, temperature=0.0, tree_budget=budget)
    assert out.sequences.tolist() == expected.tolist()
    info = out.stats.extra["tree_budget"]
    assert info["mean_nodes"] < info["mean_drafted_nodes"] and max(out.stats.tree_sizes) <= 5
    # the hint a step sees is the previous step's kept size when that step was cut; twice the
    # kept size when a tree drafted under a hint was kept whole; else None
    for step in range(1, out.stats.steps):
        choice, before = budget.history[step - 1], drafter.hints[step - 1]
        if choice.nodes < choice.drafted:
            assert drafter.hints[step] == choice.nodes
        elif before is not None:
            assert drafter.hints[step] == max(1, 2 * choice.nodes)
        else:
            assert drafter.hints[step] is None
    assert drafter.hints[0] is None and any(h is not None for h in drafter.hints)
    # a reused budget reports only this generation's steps
    again = speculative_generate(model, prompt, drafter=drafter, verifier="greedy",
                                 max_new_tokens=30, temperature=0.0, tree_budget=budget)
    assert len(again.stats.extra["tree_budget"]["nodes_per_step"]) == again.stats.steps
    assert len(budget.history) == out.stats.steps + again.stats.steps


def test_next_node_budget_grows_back_geometrically():
    from specdec.loop import next_node_budget

    assert next_node_budget(None, 12, 12) is None  # nothing cut, no hint
    assert next_node_budget(None, 12, 3) == 3  # cut
    assert next_node_budget(5, 6, 0) == 0  # cut to a plain step
    assert next_node_budget(0, 1, 1) == 2  # the hinted tree paid: let it double
    assert next_node_budget(2, 3, 3) == 6
    assert next_node_budget(0, 0, 0) == 1  # nothing drafted under a hint: still room to try


def test_wrap_builds_one_budget(latency_cache):
    model = tiny_model("llama", vocab=64, scale=4.0)
    prompt = torch.tensor([[3, 7, 3, 7, 1, 2]])
    expected = model.generate(prompt, do_sample=False, max_new_tokens=12)
    budget = TreeBudget(LatencyProfile([1, 64], [0.01, 0.02]))
    specdec.wrap(model, drafter="trie", verifier="greedy", tree_budget=budget)
    try:
        for _ in range(2):
            assert model.generate(prompt, do_sample=False, max_new_tokens=12).tolist() == \
                expected.tolist()
        steps = specdec.last_stats(model).steps
        assert len(budget.history) > steps  # both calls used the same budget
    finally:
        specdec.unwrap(model)


def test_eval_spec_hands_the_budget_to_the_loop(latency_cache):
    from evals.methods import Method, SamplingSettings, parse_method

    model = tiny_model("llama", vocab=64, scale=4.0)
    method = Method(parse_method("trie:node_budget=6,tree_budget=auto"), model, SamplingSettings(),
                    eos_token_id=None)
    assert isinstance(method.tree_budget, TreeBudget) and method.drafter.node_budget == 6
    first = method(torch.tensor([[3, 7, 3, 7, 1, 2]]), 10)
    method(torch.tensor([[3, 7, 3, 7, 1, 2]]), 10)
    assert len(method.tree_budget.history) == 2 * first.steps  # one budget across prompts
