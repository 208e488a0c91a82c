"""Lossless multi-draft rules: exact output distributions by enumeration on tiny vocabularies.

For every rule, sampling kind and k = 1..4 we enumerate every draft tuple with its probability
and add up the rule's exact conditional output (``output_distribution``); the emitted token must
be distributed as the target to 1e-9. An always-accept rule fails the same check.
"""

from __future__ import annotations

import math

import pytest
import torch

import verifiers
from verifiers.multidraft import OptimalRule, optimal_acceptance
from verifiers.rejection import ExactRule
from verifiers.spectr import SpecTrRule, kseq_acceptance
from verifier_enumeration import TOLERANCE, distributions, draft_tuples, output_marginal


class AlwaysAccept:
    """Negative control: accepts the first child whatever the target says."""

    lossless = False

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        accept_probs = torch.zeros(len(draft_tokens), dtype=torch.float64)
        accept_probs[0] = 1.0
        return accept_probs, torch.zeros_like(target_probs)


RULES = {
    "exact": (ExactRule(), ("iid", "without_replacement", "deterministic")),
    "spectr": (SpecTrRule(), ("iid",)),
    "optimal-lp": (OptimalRule(), ("iid", "without_replacement", "deterministic")),
    "optimal-classes": (OptimalRule(max_keys=15), ("iid",)),  # 3-5 classes for k = 2-4
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
        rule = OptimalRule()
        _, acceptance = output_marginal(rule, target, draft, k, sampling)
        assert acceptance == pytest.approx(optimal_acceptance(target, draft, k, sampling), abs=1e-6)
        assert rule.acceptance(target, draft, k, sampling) == pytest.approx(acceptance, abs=1e-9)
        _, exact = output_marginal(ExactRule(), target, draft, k, sampling)
        assert exact <= acceptance + 1e-7  # the LP solver's tolerance


@pytest.mark.parametrize("k", [2, 3, 4])
def test_optimal_rule_with_classes_is_exact_and_reports_a_lower_bound(k):
    """Class selection LP (small ``max_keys``): the output is the target, `acceptance` is a
    lower bound on the enumerated acceptance, which is at most the optimum."""
    with_classes = 0
    for target, draft in distributions(seed=30 + k, vocab=6):
        rule = OptimalRule(max_keys=15)
        plan = rule.plan(target, draft, k, "iid")
        classes_used = bool((torch.bincount(torch.as_tensor(plan.class_of[plan.class_of >= 0]))
                             > 1).any())  # some class holds several tokens
        with_classes += classes_used
        marginal, acceptance = output_marginal(rule, target, draft, k, "iid")
        assert torch.allclose(marginal, target, atol=TOLERANCE, rtol=0), (marginal, target)
        reported = rule.acceptance(target, draft, k, "iid")
        assert reported <= acceptance + 1e-9
        assert acceptance <= optimal_acceptance(target, draft, k, "iid") + 1e-9
        if not classes_used:  # one token per class: the coupling LP, exact
            assert reported == pytest.approx(acceptance, abs=1e-7)
    assert with_classes >= 2


def test_class_plan_stays_near_the_bound_on_a_large_support():
    """120 tokens, ``max_keys`` = 500 (8-31 classes): within 2% of the optimum at k = 2..4
    (within 0.05% on these cases; the issue's goal is 2%)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = 2.5 * torch.randn(120, generator=generator, dtype=torch.float64)
        target = torch.softmax(logits, 0)
        draft = torch.softmax(logits / 0.6 + 0.5 * torch.randn(120, generator=generator,
                                                                 dtype=torch.float64), 0)
        for k in (2, 3, 4):
            rule = OptimalRule(max_keys=500)
            assert len(rule.plan(target, draft, k, "iid").keys) <= 500
            bound = optimal_acceptance(target, draft, k, "iid")
            assert 0.98 * bound <= rule.acceptance(target, draft, k, "iid") <= bound + 1e-9


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_spectr_acceptance_closed_form_and_guarantee(k):
    for target, draft in distributions(seed=20 + k, vocab=5):
        _, acceptance = output_marginal(SpecTrRule(), target, draft, k, "iid")
        assert acceptance == pytest.approx(kseq_acceptance(target, draft, k), abs=1e-9)
        bound = optimal_acceptance(target, draft, k, "iid")
        assert acceptance >= (1 - 1 / math.e) * bound - 1e-9


@pytest.mark.parametrize("name", ["exact", "spectr", "optimal-lp", "optimal-classes"])
@pytest.mark.parametrize("sampling", ["iid", "without_replacement", "deterministic"])
def test_select_samples_match_output_distribution(name, sampling):
    """The sampling path agrees with the exact reference (4-sigma binomial bounds)."""
    rule, _ = RULES[name]
    if sampling not in rule.supported:
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
