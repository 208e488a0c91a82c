"""Exact output distributions of node rules, by enumerating every way the drafts can be drawn."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

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
