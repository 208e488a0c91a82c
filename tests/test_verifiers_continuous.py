"""Continuous speculative decoding: the output follows the target density.

Seeded Kolmogorov-Smirnov tests (n = 3000 draws; we require p > 1e-3, so a correct rule fails
with probability 1e-3 per check for a fresh seed, and never for these fixed seeds) and moment
tests (|mean error| and |variance error| below 5 standard errors), in 1 and 3 dimensions, for
diagonal Gaussians, Gaussian mixtures and a callable Laplace density.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import verifiers
from verifiers.continuous import (CallableDensity, ContinuousRule, DiagGaussian, GaussianMixture,
                                  ResidualSamplingError)

DRAWS = 3000


def run(target, draft, seed, draws=DRAWS):
    """(outputs [n, d], acceptance rate) of verifying ``draws`` draft tokens."""
    rule = ContinuousRule()
    generator = torch.Generator().manual_seed(seed)
    outputs, accepted = [], 0
    for x in draft.sample(generator, draws):
        ok, token = rule.verify(target, draft, x, generator)
        accepted += ok
        outputs.append(token)
    return torch.stack(outputs).numpy(), accepted / draws


def gaussian_cdf(mean, std):
    return lambda x: stats.norm.cdf(x, loc=mean, scale=std)


def test_one_dimensional_gaussians_ks():
    target, draft = DiagGaussian([0.0], [1.0]), DiagGaussian([0.8], [1.5])
    outputs, acceptance = run(target, draft, seed=0)
    assert stats.kstest(outputs[:, 0], gaussian_cdf(0.0, 1.0)).pvalue > 1e-3
    # the drafter alone is clearly detected: the test has power
    drafts = draft.sample(torch.Generator().manual_seed(1), DRAWS).numpy()[:, 0]
    assert stats.kstest(drafts, gaussian_cdf(0.0, 1.0)).pvalue < 1e-6
    # acceptance = 1 - TV(target, draft), by numerical integration in the test only
    grid = np.linspace(-12, 12, 200001)
    tv = 0.5 * np.trapezoid(np.abs(stats.norm.pdf(grid, 0, 1) - stats.norm.pdf(grid, 0.8, 1.5)), grid)
    assert abs(acceptance - (1 - tv)) < 5 * math.sqrt(tv * (1 - tv) / DRAWS)


def test_three_dimensional_gaussians_moments_and_marginals():
    mean, std = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 0.5, 2.0])
    target = DiagGaussian(mean, std)
    draft = DiagGaussian(mean + torch.tensor([0.5, -0.3, 1.0]), std * torch.tensor([1.3, 0.8, 1.1]))
    outputs, _ = run(target, draft, seed=2)
    standard_error = std.numpy() / math.sqrt(DRAWS)
    assert (np.abs(outputs.mean(0) - mean.numpy()) < 5 * standard_error).all()
    variance_error = std.numpy() ** 2 * math.sqrt(2 / (DRAWS - 1))
    assert (np.abs(outputs.var(0, ddof=1) - std.numpy() ** 2) < 5 * variance_error).all()
    for dim in range(3):
        cdf = gaussian_cdf(float(mean[dim]), float(std[dim]))
        assert stats.kstest(outputs[:, dim], cdf).pvalue > 1e-3


def test_gaussian_mixture_ks():
    target = GaussianMixture([0.3, 0.7], [[-2.0], [1.0]], [[0.5], [1.0]])
    draft = GaussianMixture([0.6, 0.4], [[-1.5], [1.5]], [[0.7], [0.8]])

    def mixture_cdf(x):
        return 0.3 * stats.norm.cdf(x, -2.0, 0.5) + 0.7 * stats.norm.cdf(x, 1.0, 1.0)

    outputs, _ = run(target, draft, seed=3)
    assert stats.kstest(outputs[:, 0], mixture_cdf).pvalue > 1e-3
    log_density = target.log_prob(torch.tensor([[0.3]]))
    assert float(log_density.exp()) == pytest.approx(
        0.3 * stats.norm.pdf(0.3, -2, 0.5) + 0.7 * stats.norm.pdf(0.3, 1, 1))


def test_two_dimensional_mixture_marginals():
    target = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 2.0]], [[0.6, 1.0], [0.6, 0.5]])
    draft = DiagGaussian([0.0, 1.0], [1.5, 1.5])
    outputs, _ = run(target, draft, seed=4)
    for dim, (m1, s1, m2, s2) in enumerate([(-1, 0.6, 1, 0.6), (0, 1.0, 2, 0.5)]):
        def cdf(x, m1=m1, s1=s1, m2=m2, s2=s2):
            return 0.5 * stats.norm.cdf(x, m1, s1) + 0.5 * stats.norm.cdf(x, m2, s2)
        assert stats.kstest(outputs[:, dim], cdf).pvalue > 1e-3


def test_callable_laplace_target():
    def log_prob(x):
        return (-x.abs() - math.log(2.0)).sum(-1)

    def sample(generator, n):
        u = torch.rand((n, 1), generator=generator, dtype=torch.float64) - 0.5
        return -u.sign() * torch.log1p(-2 * u.abs())

    target = CallableDensity(log_prob, sample)
    draft = DiagGaussian([0.5], [1.2])
    outputs, _ = run(target, draft, seed=5)
    assert stats.kstest(outputs[:, 0], stats.laplace.cdf).pvalue > 1e-3


def test_equal_densities_always_accept_and_seeded_runs_repeat():
    density = DiagGaussian([0.0, 0.0], [1.0, 1.0])
    outputs, acceptance = run(density, density, seed=6, draws=200)
    assert acceptance == 1.0
    again, _ = run(density, density, seed=6, draws=200)
    assert np.array_equal(outputs, again)
    with pytest.raises(ResidualSamplingError):
        ContinuousRule(max_tries=50).sample_residual(density, density, torch.Generator())


def test_registered_rule_handles_discrete_tokens_exactly():
    rule = verifiers.get("continuous")
    assert isinstance(rule, ContinuousRule) and rule.lossless
    target = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    draft = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    accept, recovered = rule.output_distribution(target, [2], draft, sampling="iid")
    assert float(accept[0]) == pytest.approx(0.4)  # min(1, 0.2 / 0.5)
    # rejected with probability 0.6, then the residual max(0, target - draft) is all on token 0
    assert torch.allclose(recovered, torch.tensor([0.6, 0.0, 0.0], dtype=torch.float64))
