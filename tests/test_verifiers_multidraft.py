"""`optimal_acceptance`: the sort-and-scan bound against the coupling LP and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import verifiers
from verifiers.multidraft import (_without_replacement_all_in_prefix, class_count,
                                  optimal_acceptance, ratio_classes, solve_coupling)


def random_pair(rng):
    vocab = int(rng.integers(2, 7))
    target = rng.dirichlet(np.full(vocab, rng.choice([0.1, 0.3, 1.0, 3.0])))
    draft = rng.dirichlet(np.full(vocab, rng.choice([0.1, 0.3, 1.0, 3.0])))
    if rng.random() < 0.3:
        target[rng.integers(vocab)] = 0.0
    if rng.random() < 0.3 and vocab > 2:
        draft[rng.integers(vocab)] = 0.0
    return target / target.sum(), draft / draft.sum()


@pytest.mark.parametrize("sampling", ["iid", "without_replacement"])
def test_bound_matches_the_coupling_lp_on_random_cases(sampling):
    rng = np.random.default_rng({"iid": 0, "without_replacement": 1}[sampling])
    worst = 0.0
    for _ in range(200):
        target, draft = random_pair(rng)
        k = int(rng.integers(1, 5))
        bound = optimal_acceptance(target, draft, k, sampling)
        lp = solve_coupling(target, draft, k, sampling).acceptance
        worst = max(worst, abs(bound - lp))
    assert worst < 1e-6


def test_ratio_classes_partition_the_draft_support():
    rng = np.random.default_rng(5)
    for _ in range(100):
        vocab = int(rng.integers(2, 40))
        target = rng.dirichlet(np.full(vocab, rng.choice([0.1, 0.3, 1.0])))
        draft = rng.dirichlet(np.full(vocab, rng.choice([0.1, 0.3, 1.0])))
        draft[rng.random(vocab) < 0.2] = 0.0
        if draft.sum() == 0:
            draft[0] = 1.0
        target[rng.random(vocab) < 0.2] = 0.0
        if target.sum() == 0:
            target[-1] = 1.0
        k, count = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        classes = ratio_classes(target, draft, k, count)
        support = np.flatnonzero(draft > 0)
        tokens = np.concatenate(classes)
        assert 1 <= len(classes) <= count
        assert all(len(c) > 0 for c in classes)
        assert np.array_equal(np.sort(tokens), support)  # disjoint and covering
        ratio = target / np.where(draft > 0, draft, 1.0)
        for first, second in zip(classes, classes[1:]):  # contiguous in ratio order
            assert ratio[first].max() <= ratio[second].min()


def test_class_count_fits_max_keys():
    for k in (2, 3, 4):
        count = class_count(5000, k)
        assert math.comb(count + k - 1, k) <= 5000 < math.comb(count + k, k)
    assert (class_count(5000, 2), class_count(5000, 3), class_count(5000, 4)) == (99, 30, 17)


def all_in_by_enumeration(draft, subset, k):
    """P(all k draws without replacement from ``draft`` lie in ``subset``), summed over orders."""
    support = [x for x in range(draft.size) if draft[x] > 0]
    total = 0.0
    for order in itertools.permutations(support, min(k, len(support))):
        prob, drawn = 1.0, set()
        for x in order:
            prob *= draft[x] / sum(draft[y] for y in support if y not in drawn)
            drawn.add(x)
        total += prob if set(order) <= subset else 0.0
    return total


def test_without_replacement_prefix_probabilities_are_exact():
    rng = np.random.default_rng(2)
    for _ in range(60):
        _, draft = random_pair(rng)
        k = int(rng.integers(1, 5))
        support = np.flatnonzero(draft > 0)
        order = rng.permutation(support)
        all_in = _without_replacement_all_in_prefix(draft[order], k)
        for n in range(order.size + 1):
            expected = all_in_by_enumeration(draft, set(order[:n].tolist()), k)
            assert all_in[n] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("sampling", ["iid", "without_replacement"])
def test_a_ratio_sorted_prefix_is_the_best_subset(sampling):
    """Brute force over every subset A of 1 - max_A [Q(all drafts in A) - target(A)]."""
    rng = np.random.default_rng(3)
    for _ in range(40):
        target, draft = random_pair(rng)
        k = int(rng.integers(2, 5))
        best = 0.0
        for size in range(target.size + 1):
            for subset in itertools.combinations(range(target.size), size):
                if sampling == "iid":
                    all_in = draft[list(subset)].sum() ** k
                else:
                    all_in = all_in_by_enumeration(draft, set(subset), k)
                best = max(best, all_in - target[list(subset)].sum())
        assert optimal_acceptance(target, draft, k, sampling) == pytest.approx(1 - best, abs=1e-9)


def test_bound_properties():
    rng = np.random.default_rng(4)
    target, draft = rng.dirichlet(np.ones(50)), rng.dirichlet(np.ones(50))
    for sampling in ("iid", "without_replacement"):
        bounds = [optimal_acceptance(target, draft, k, sampling) for k in (1, 2, 3, 4)]
        assert bounds[0] == pytest.approx(np.minimum(target, draft).sum(), abs=1e-12)
        assert all(a <= b + 1e-12 for a, b in zip(bounds, bounds[1:]))
        assert optimal_acceptance(target, target, 3, sampling) == pytest.approx(1.0)
    # drawing without replacement never hurts (Hu et al. 2025)
    for k in (2, 3, 4):
        assert optimal_acceptance(target, draft, k, "without_replacement") >= \
            optimal_acceptance(target, draft, k, "iid") - 1e-9


def test_full_vocabulary_call_runs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(49152, generator=generator) * 3
    target = torch.softmax(logits, -1)
    draft = torch.softmax(logits * 0.8 + torch.randn(49152, generator=generator) * 0.5, -1)
    for sampling in ("iid", "without_replacement"):
        value = verifiers.optimal_acceptance(target, draft, 4, sampling)
        assert float(torch.minimum(target, draft).sum()) <= value <= 1.0


def test_bound_rejects_unknown_sampling():
    with pytest.raises(ValueError, match="sampling"):
        optimal_acceptance(np.ones(3) / 3, np.ones(3) / 3, 2, "deterministic")
