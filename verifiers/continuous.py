"""Continuous speculative decoding: speculative sampling for continuous-valued tokens.

Autoregressive image models that emit continuous tokens (MAR-style diffusion or mixture heads)
have densities, not vocabularies. Wang et al. carry speculative sampling over: a draft token
x ~ draft density is accepted with probability min(1, target(x) / draft(x)); on rejection a token
is drawn from the residual density norm(max(0, target - draft)), and the output is distributed
exactly as the target. The residual's normaliser (the total-variation distance) is an integral we
never compute: since max(0, target - draft) <= target, acceptance-rejection with the *target* as
proposal and envelope constant 1 is exact — draw y ~ target, keep it with probability
max(0, 1 - draft(y) / target(y)). Each round keeps y with probability TV(target, draft) and the
residual branch itself runs with probability TV, so a step costs one target draw on average.

Densities are objects with ``log_prob(x [..., d]) -> [...]`` and ``sample(generator, n) -> [n, d]``:
`DiagGaussian`, `GaussianMixture` (diagonal components) and `CallableDensity` (any log-density
with a sampler). ``ContinuousRule.verify(target, draft, x, generator) -> (accepted, token)`` is
the API; all randomness comes from ``generator``.

Registered as ``continuous``; its node-rule ``select`` on discrete tensors is the same rule with
counting densities, i.e. exact speculative sampling (`verifiers.rejection.ExactRule`), so the rule
can sit in the discrete loop too.

Not covered here: Wang et al.'s denoising-trajectory alignment and token pre-filling, which make a
diffusion head's density tractable; this module starts from densities that can be evaluated.

References:
    Wang et al. "Continuous Speculative Decoding for Autoregressive Image Generation". 2024.
        arXiv:2411.11925.
    Leviathan, Kalman, Matias. "Fast Inference from Transformers via Speculative Decoding".
        ICML 2023 (the discrete rule this generalises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch

from specdec.sampling import uniform
from verifiers.rejection import ExactRule


class Density(Protocol):
    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...  # [..., d] -> [...]

    def sample(self, generator: torch.Generator | None, n: int = 1) -> torch.Tensor: ...  # [n, d]


@dataclass
class DiagGaussian:
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    def __post_init__(self):
        self.mean = torch.as_tensor(self.mean, dtype=torch.float64).reshape(-1)
        self.std = torch.as_tensor(self.std, dtype=torch.float64).reshape(-1).expand_as(self.mean)
        if (self.std <= 0).any():
            raise ValueError("DiagGaussian needs positive standard deviations")

    def log_prob(self, x):
        z = (x.double() - self.mean) / self.std
        return (-0.5 * z.pow(2) - self.std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, generator, n=1):
        noise = torch.randn((n, self.mean.numel()), generator=generator, dtype=torch.float64)
        return self.mean + self.std * noise


@dataclass
class GaussianMixture:
    weights: torch.Tensor  # [M]
    means: torch.Tensor  # [M, d]
    stds: torch.Tensor  # [M, d]

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(self.means, dtype=torch.float64).reshape(self.weights.numel(), -1)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).expand_as(self.means)
        if (self.stds <= 0).any():
            raise ValueError("GaussianMixture needs positive standard deviations")

    def log_prob(self, x):
        z = (x.double().unsqueeze(-2) - self.means) / self.stds  # [..., M, d]
        component = (-0.5 * z.pow(2) - self.stds.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(component + self.weights.log(), dim=-1)

    def sample(self, generator, n=1):
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # [n]
        noise = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        return self.means[which] + self.stds[which] * noise


@dataclass
class CallableDensity:
    """Any density: ``log_prob(x [..., d]) -> [...]`` and ``sample(generator, n) -> [n, d]``."""

    log_prob_fn: Callable[[torch.Tensor], torch.Tensor]
    sample_fn: Callable[[torch.Generator | None, int], torch.Tensor]

    def log_prob(self, x):
        return torch.as_tensor(self.log_prob_fn(x), dtype=torch.float64)

    def sample(self, generator, n=1):
        return torch.as_tensor(self.sample_fn(generator, n), dtype=torch.float64).reshape(n, -1)


class ResidualSamplingError(RuntimeError):
    """The residual density had (numerically) no mass within the allowed number of tries."""


class ContinuousRule:
    lossless: ClassVar[bool] = True
    supported: ClassVar[tuple[str, ...]] = ExactRule.supported

    def __init__(self, max_tries: int = 100_000):
        self.max_tries = max_tries
        self._discrete = ExactRule()

    def verify(self, target: Density, draft: Density, x: torch.Tensor,
               generator: torch.Generator | None) -> tuple[bool, torch.Tensor]:
        """(True, x) if the draft token ``x  # [d]`` is accepted, else (False, residual sample)."""
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        log_ratio = float(target.log_prob(x) - draft.log_prob(x))
        if log_ratio >= 0 or uniform(generator) < math.exp(log_ratio):
            return True, x
        return False, self.sample_residual(target, draft, generator)

    def sample_residual(self, target: Density, draft: Density,
                        generator: torch.Generator | None) -> torch.Tensor:
        """One draw from norm(max(0, target - draft)): target proposals, envelope constant 1."""
        for _ in range(self.max_tries):
            y = target.sample(generator, 1)[0]  # [d]
            keep = -math.expm1(min(0.0, float(draft.log_prob(y) - target.log_prob(y))))
            if uniform(generator) < keep:
                return y
        raise ResidualSamplingError(
            f"no residual sample in {self.max_tries} tries: the target and draft densities are "
            f"(nearly) equal, so a rejection should not have happened; check the densities"
        )

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        """Discrete tokens: the same rule with counting densities (exact speculative sampling)."""
        return self._discrete.select(target_probs, draft_tokens, draft_probs, sampling=sampling,
                                     generator=generator)

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling):
        return self._discrete.output_distribution(target_probs, draft_tokens, draft_probs,
                                                  sampling=sampling)
