"""Sampling losslessness, computed exactly.

On a 4-token vocabulary with random target and draft distributions (warped by temperature, top-k
and top-p), every possible draft tree is enumerated with its probability, and for each the tree
walk is run under every outcome of its random decisions (each Bernoulli accept and each categorical
draw branches, weighted by its probability). After the step, the output is completed with target
draws up to depth + 1 tokens. The resulting joint distribution of those tokens must equal the
target's own autoregressive distribution to 1e-9. An always-accept rule must fail the same check.
A seeded statistical test then checks the whole loop on a real (tiny) HF model.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

import drafters
import verifiers
import verifiers.base
import verifiers.rejection
from conftest import perturbed_copy, tiny_model
from specdec import speculative_generate
from specdec.sampling import SamplingConfig
from specdec.tree import DraftTree

VOCAB = 4


def table(seed: int, scale: float):
    """A deterministic random next-token logit table over token prefixes."""
    cache = {}

    def logits(prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in cache:
            rng = np.random.default_rng([seed, len(prefix), *prefix])
            cache[prefix] = torch.tensor(rng.normal(size=VOCAB) * scale, dtype=torch.float64)
        return cache[prefix]

    return logits


class Branching:
    """Runs a function repeatedly so that every outcome of its random decisions is visited."""

    def __init__(self):
        self.script: list[int] = []
        self.trace: list[list[tuple[object, float]]] = []

    def decide(self, options: list[tuple[object, float]]):
        options = [(value, prob) for value, prob in options if prob > 0]
        i = len(self.trace)
        self.trace.append(options)
        return options[self.script[i] if i < len(self.script) else 0][0]

    def accept(self, probability, generator=None, device=None):
        return self.decide([(True, float(probability)), (False, 1.0 - float(probability))])

    def sample(self, probs, generator=None):
        return self.decide([(t, float(probs[t])) for t in range(probs.numel())])

    def outcomes(self, fn):
        """Yield (result, probability) for every decision path of ``fn()``."""
        pending = [[]]
        while pending:
            self.script, self.trace = pending.pop(), []
            result = fn()
            taken = self.script + [0] * (len(self.trace) - len(self.script))
            prob = math.prod(self.trace[j][c][1] for j, c in enumerate(taken))
            for j in range(len(self.script), len(self.trace)):
                for alt in range(1, len(self.trace[j])):
                    pending.append(taken[:j] + [alt])
            yield result, prob


def child_draws(draft_probs: torch.Tensor, draft_logits: torch.Tensor, k: int, sampling: str):
    """Every ordered tuple of k children a drafter may draw, with its probability."""
    support = [t for t in range(VOCAB) if draft_probs[t] > 0]
    if sampling == "deterministic":
        yield torch.topk(draft_logits, k).indices.tolist(), 1.0
    elif sampling == "iid":
        for combo in itertools.product(support, repeat=k):
            yield list(combo), math.prod(float(draft_probs[t]) for t in combo)
    else:
        for combo in itertools.permutations(support, min(k, len(support))):
            prob, left = 1.0, 1.0
            for t in combo:
                prob *= float(draft_probs[t]) / left
                left -= float(draft_probs[t])
            yield list(combo), prob


def draft_trees(branching: list[int], sampling: str, draft_table, config: SamplingConfig):
    """Every tree with branching[d] children per node at depth d, with its probability."""
    def grow(frontier, depth, tokens, parents, probs, prob):
        if depth == len(branching) or not frontier:
            yield DraftTree(tokens, parents, dict(probs), {}, sampling), prob
            return
        per_node = []
        for node, prefix in frontier:
            logits = draft_table(prefix)
            q = config.probs(logits)
            per_node.append([(node, prefix, q, kids, p)
                             for kids, p in child_draws(q, logits, branching[depth], sampling)])
        for choice in itertools.product(*per_node):
            new_tokens, new_parents, new_probs = list(tokens), list(parents), dict(probs)
            new_frontier, p_all = [], prob
            for node, prefix, q, kids, p in choice:
                p_all *= p
                new_probs[node] = q
                for token in kids:
                    new_frontier.append((len(new_tokens), prefix + (token,)))
                    new_tokens.append(token)
                    new_parents.append(node)
            yield from grow(new_frontier, depth + 1, new_tokens, new_parents, new_probs, p_all)

    yield from grow([(-1, ())], 0, [], [], {}, 1.0)


def step_distribution(rule, branching, sampling, config, monkeypatch, seeds=(0, 1)):
    """Exact joint distribution of the first len(branching)+1 tokens after one step."""
    target_table, draft_table = table(seeds[0], 1.5), table(seeds[1], 1.5)
    brancher = Branching()
    for module in (verifiers.rejection, verifiers.base):
        monkeypatch.setattr(module, "sample", brancher.sample)
    monkeypatch.setattr(verifiers.rejection, "accept", brancher.accept)
    length = len(branching) + 1
    joint = np.zeros([VOCAB] * length)
    for tree, tree_prob in draft_trees(branching, sampling, draft_table, config):
        def run():
            def target_probs_of(row):
                prefix = tuple(tree.tokens[n] for n in tree.path_to(row - 1)) if row else ()
                return config.probs(target_table(prefix))
            accepted, token = verifiers.base.walk_tree(rule, tree, target_probs_of, None)
            return [tree.tokens[n] for n in accepted] + [token]
        for emitted, prob in brancher.outcomes(run):
            # complete with target draws, exactly
            completions = [(tuple(emitted), prob * tree_prob)]
            while len(completions[0][0]) < length:
                completions = [(seq + (t,), p * float(config.probs(target_table(seq))[t]))
                               for seq, p in completions for t in range(VOCAB)]
            for seq, p in completions:
                joint[seq[:length]] += p
    expected = np.zeros([VOCAB] * length)
    for seq in itertools.product(range(VOCAB), repeat=length):
        expected[seq] = math.prod(float(config.probs(target_table(seq[:i]))[seq[i]])
                                  for i in range(length))
    return joint, expected


CONFIGS = {
    "t1": SamplingConfig(1.0),
    "t0.7-topk3": SamplingConfig(0.7, top_k=3),
    "t1.3-topp0.8": SamplingConfig(1.3, top_p=0.8),
    "greedy": SamplingConfig(0.0),
}
SHAPES = {"chain1": [1], "chain3": [1, 1, 1], "k2": [2], "k3": [3], "k4": [4], "tree2x2": [2, 2]}


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sampling", ["iid", "without_replacement", "deterministic"])
def test_exact_rule_is_lossless_by_enumeration(sampling, shape, config, monkeypatch):
    joint, expected = step_distribution(verifiers.get("exact"), SHAPES[shape], sampling,
                                        CONFIGS[config], monkeypatch)
    assert joint.sum() == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(joint, expected, atol=1e-9, rtol=0)


def test_greedy_rule_is_lossless_at_temperature_zero(monkeypatch):
    joint, expected = step_distribution(verifiers.get("greedy"), [2, 2], "deterministic",
                                        CONFIGS["greedy"], monkeypatch)
    np.testing.assert_allclose(joint, expected, atol=1e-12, rtol=0)


class AlwaysAccept:
    """Negative control: accepts the first child whatever the target says."""

    lossless = True

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        return 0, draft_tokens[0]


@pytest.mark.parametrize("sampling", ["iid", "without_replacement", "deterministic"])
def test_always_accept_fails_the_same_check(sampling, monkeypatch):
    joint, expected = step_distribution(AlwaysAccept(), [2], sampling, CONFIGS["t1"], monkeypatch)
    assert np.abs(joint - expected).max() > 1e-2


# ---------------------------------------------------------------- the whole loop, real model

def exact_two_token_probs(model, prompt, config):
    with torch.no_grad():
        first = config.probs(model(torch.tensor([prompt])).logits[0, -1]).double()
        batch = torch.tensor([prompt + [t] for t in range(first.numel())])
        second = config.probs(model(batch).logits[:, -1]).double()
    return (first[:, None] * second).numpy()


@pytest.mark.parametrize("name,mode,drafter_kw", [
    ("small-lm", "without_replacement", dict(depth=2, branching=[3, 2])),
    ("small-lm", "iid", dict(depth=3, branching=1)),
    ("quantized", "iid", dict(depth=3, precision="int8")),
])
def test_loop_samples_the_target_distribution(name, mode, drafter_kw):
    """Seeded chi-square test on a tiny Llama: the first two sampled tokens follow the target.

    Bound: with 1500 draws, a p-value below 1e-4 fails (a lossy rule that shifts even a few
    percent of mass fails with overwhelming probability; see the control below)."""
    from scipy.stats import chisquare

    target = tiny_model("llama", vocab=12, scale=3.0)
    draft = perturbed_copy(target, noise=0.05)
    config = SamplingConfig(1.0, top_k=8)
    prompt = [1, 5, 7]
    expected = exact_two_token_probs(target, prompt, config).reshape(-1)
    if name == "quantized":  # the target itself in int8 (the CPU kernel's, or a clear error)
        drafter = drafters.get(name, mode=mode, **drafter_kw)
    else:
        drafter = drafters.get(name, model=draft, mode=mode, **drafter_kw)
    generator = torch.Generator().manual_seed(1234)
    counts = np.zeros_like(expected)
    accepted = 0
    draws = 1500
    for _ in range(draws):
        out = speculative_generate(target, [prompt], drafter=drafter, verifier="exact",
                                   max_new_tokens=2, temperature=1.0, top_k=8,
                                   eos_token_id=None, generator=generator)
        a, b = out.new_token_ids
        counts[a * 12 + b] += 1
        accepted += out.stats.steps == 1
    assert accepted > draws * 0.3  # the test exercises acceptances, not only rejections
    support = expected > 0
    assert counts[~support].sum() == 0
    expected = expected[support] / expected[support].sum()
    assert chisquare(counts[support], expected * draws).pvalue > 1e-4


def test_loop_is_deterministic_under_a_seed():
    target = tiny_model("llama", vocab=32, scale=2.0)
    drafter = drafters.get("small-lm", model=perturbed_copy(target, 0.05), mode="iid", depth=3)
    runs = [speculative_generate(target, [[1, 2, 3]], drafter=drafter, verifier="exact",
                                 max_new_tokens=24, temperature=1.0,
                                 generator=torch.Generator().manual_seed(7)).new_token_ids
            for _ in range(2)]
    other = speculative_generate(target, [[1, 2, 3]], drafter=drafter, verifier="exact",
                                 max_new_tokens=24, temperature=1.0,
                                 generator=torch.Generator().manual_seed(8)).new_token_ids
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_loop_statistical_check_catches_a_lossy_rule():
    """The control for the bound above: always accepting the draft fails it."""
    from scipy.stats import chisquare

    target = tiny_model("llama", vocab=12, scale=3.0)
    draft = perturbed_copy(target, noise=0.5)
    expected = exact_two_token_probs(target, [1, 5, 7], SamplingConfig(1.0, top_k=8)).reshape(-1)
    drafter = drafters.get("small-lm", model=draft, mode="iid", depth=3)
    generator = torch.Generator().manual_seed(99)
    counts = np.zeros_like(expected)
    for _ in range(500):
        out = speculative_generate(target, [[1, 5, 7]], drafter=drafter, verifier=AlwaysAccept(),
                                   max_new_tokens=2, temperature=1.0, top_k=8,
                                   eos_token_id=None, generator=generator)
        a, b = out.new_token_ids
        counts[a * 12 + b] += 1
    support = expected > 0
    off_support = counts[~support].sum()
    expected = expected[support] / expected[support].sum()
    assert off_support > 0 or chisquare(counts[support], expected * 500).pvalue < 1e-4


def test_sample_of_a_point_mass_skips_the_draw_and_others_draw():
    from specdec.sampling import sample

    generator = torch.Generator().manual_seed(0)
    point = torch.zeros(50)
    point[17] = 1.0
    state = generator.get_state()
    assert sample(point, generator) == 17
    assert torch.equal(generator.get_state(), state)  # no random number consumed
    spread = torch.full((50,), 1 / 50)
    draws = {sample(spread, generator) for _ in range(200)}
    assert len(draws) > 30 and not torch.equal(generator.get_state(), state)
