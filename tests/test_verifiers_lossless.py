"""Lossless multi-draft rules: exact output distributions by enumeration on tiny vocabularies.

For every rule, sampling kind and k = 1..4 we enumerate every draft tuple with its probability
and add up the rule's exact conditional output (``output_distribution``); the emitted token must
be distributed as the target to 1e-9. An always-accept rule fails the same check.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import specdec  # noqa: F401  (imports the package before verifiers, as users do)
import verifiers
from verifiers.multidraft import OptimalRule, optimal_acceptance
from verifiers.rejection import ExactRule
from verifiers.spectr import SpecTrRule, kseq_acceptance

TOLERANCE = 1e-9


def draft_tuples(draft_probs, k, sampling):
    """(tuple of draft tokens, probability) for every way the children can be drawn."""
    support = [x for x in range(draft_probs.numel()) if draft_probs[x] > 0]
    if sampling == "iid":
        for drafts in itertools.product(support, repeat=k):
            yield list(drafts), math.prod(float(draft_probs[x]) for x in drafts)
    elif sampling == "without_replacement":
        for drafts in itertools.permutations(support, min(k, len(support))):
            prob, drawn = 1.0, set()
            for x in drafts:
                prob *= float(draft_probs[x]) / sum(float(draft_probs[y]) for y in support
                                                    if y not in drawn)
                drawn.add(x)
            yield list(drafts), prob
    else:  # deterministic: the top-k of the drafter, then an arbitrary fixed tuple
        yield torch.argsort(draft_probs, descending=True)[:k].tolist(), 1.0


def output_marginal(rule, target_probs, draft_probs, k, sampling):
    """(distribution of the token emitted at the node [V], acceptance probability)."""
    marginal = torch.zeros_like(target_probs)
    acceptance = 0.0
    for drafts, prob in draft_tuples(draft_probs, k, sampling):
        accept_probs, recovered_probs = rule.output_distribution(target_probs, drafts, draft_probs,
                                                                 sampling=sampling)
        assert abs(float(accept_probs.sum() + recovered_probs.sum()) - 1.0) < TOLERANCE
        assert (accept_probs >= -TOLERANCE).all() and (recovered_probs >= -TOLERANCE).all()
        marginal += prob * recovered_probs
        for index, token in enumerate(drafts):
            marginal[token] += prob * accept_probs[index]
        acceptance += prob * float(accept_probs.sum())
    return marginal, acceptance


class AlwaysAccept:
    """Negative control: accepts the first child whatever the target says."""

    lossless = False

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        accept_probs[0] = 1.0
        return accept_probs, torch.zeros_like(target_probs)


def distributions(seed, vocab):
    """(target, draft) pairs: peaked, flat, with zeros on either side, and identical."""
    rng = np.random.default_rng(seed)
    cases = [tuple(torch.from_numpy(rng.dirichlet(np.full(vocab, concentration)))
                   for _ in range(2)) for concentration in (0.3, 1.0)]
    target, draft = cases[0]
    target_gap, draft_gap = target.clone(), draft.clone()
    target_gap[0] = 0.0  # a token the target forbids
    draft_gap[1] = 0.0  # a token the drafter never proposes
    cases.append((target_gap / target_gap.sum(), draft_gap / draft_gap.sum()))
    cases.append((target, target.clone()))  # identical distributions: everything accepted
    return cases


RULES = {
    "exact": (ExactRule(), ("iid", "without_replacement", "deterministic")),
    "spectr": (SpecTrRule(), ("iid",)),
    "optimal-lp": (OptimalRule(), ("iid", "without_replacement", "deterministic")),
    "optimal-fallback": (OptimalRule(max_keys=0), ("iid", "without_replacement")),
}
CASES = [(name, sampling, k) for name, (_, kinds) in RULES.items() for sampling in kinds
         for k in (1, 2, 3, 4)]


@pytest.mark.parametrize("name,sampling,k", CASES)
def test_lossless_by_enumeration(name, sampling, k):
    rule, _ = RULES[name]
    vocab = 5 if sampling == "iid" and k == 4 else 6
    for target, draft in distributions(seed=k, vocab=vocab):
        marginal, _ = output_marginal(rule, target, draft, k, sampling)
        assert torch.allclose(marginal, target, atol=TOLERANCE, rtol=0), (marginal, target)


@pytest.mark.parametrize("sampling", ["iid", "without_replacement"])
def test_always_accept_fails_the_same_check(sampling):
    target, draft = distributions(seed=0, vocab=5)[0]
    marginal, _ = output_marginal(AlwaysAccept(), target, draft, 2, sampling)
    assert (marginal - target).abs().max() > 1e-2


@pytest.mark.parametrize("sampling", ["iid", "without_replacement"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_optimal_rule_attains_the_bound(sampling, k):
    for target, draft in distributions(seed=10 + k, vocab=5):
        _, acceptance = output_marginal(OptimalRule(), target, draft, k, sampling)
        assert acceptance == pytest.approx(optimal_acceptance(target, draft, k, sampling), abs=1e-6)
        _, exact = output_marginal(ExactRule(), target, draft, k, sampling)
        assert exact <= acceptance + 1e-7  # the LP solver's tolerance


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_spectr_acceptance_closed_form_and_guarantee(k):
    for target, draft in distributions(seed=20 + k, vocab=5):
        _, acceptance = output_marginal(SpecTrRule(), target, draft, k, "iid")
        assert acceptance == pytest.approx(kseq_acceptance(target, draft, k), abs=1e-9)
        bound = optimal_acceptance(target, draft, k, "iid")
        assert acceptance >= (1 - 1 / math.e) * bound - 1e-9


@pytest.mark.parametrize("name", ["exact", "spectr", "optimal-lp"])
@pytest.mark.parametrize("sampling", ["iid", "without_replacement", "deterministic"])
def test_select_samples_match_output_distribution(name, sampling):
    """The sampling path agrees with the exact reference (4-sigma binomial bounds)."""
    rule, kinds = RULES[name]
    if sampling not in kinds:
        with pytest.raises(ValueError, match="does not support sampling"):
            rule.select(torch.ones(4) / 4, [0], torch.ones(4) / 4, sampling=sampling,
                        generator=torch.Generator())
        return
    target, draft = distributions(seed=3, vocab=5)[1]
    drafts = next(iter(draft_tuples(draft, 3, sampling)))[0] if sampling != "iid" else [1, 1, 3]
    accept_probs, recovered_probs = rule.output_distribution(target, drafts, draft,
                                                             sampling=sampling)
    generator = torch.Generator().manual_seed(0)
    trials = 3000
    counts = torch.zeros(len(drafts) + target.numel(), dtype=torch.float64)
    for _ in range(trials):
        index, token = rule.select(target.float(), drafts, draft.float(), sampling=sampling,
                                   generator=generator)
        if index >= 0:
            assert token == drafts[index]
            counts[index] += 1
        else:
            counts[len(drafts) + token] += 1
    expected = torch.cat([accept_probs, recovered_probs])
    sigma = (expected * (1 - expected) / trials).sqrt()
    assert ((counts / trials - expected).abs() <= 4 * sigma + 2e-3).all(), (counts / trials, expected)


def test_registry_builds_the_multidraft_rules():
    assert isinstance(verifiers.get("spectr"), SpecTrRule)
    assert isinstance(verifiers.get("optimal", max_keys=10), OptimalRule)
    assert verifiers.get("spectr").lossless and verifiers.get("optimal").lossless
