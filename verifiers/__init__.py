"""Verifiers: node rules that decide which draft tokens the target accepts.

``verifiers.get(name)`` builds a rule by name; ``verifiers.available()`` lists the names. Any
object satisfying `verifiers.base.NodeRule` can be passed to the loop instead. A new rule joins by
adding one row to ``_REGISTRY`` (imports are lazy so optional dependencies stay optional).
"""

from __future__ import annotations

from specdec.registry import build
from verifiers.base import NodeRule, walk_tree

_REGISTRY: dict[str, str] = {
    "greedy": "verifiers.greedy:GreedyRule",
    "exact": "verifiers.rejection:ExactRule",
    "spectr": "verifiers.spectr:SpecTrRule",
    "optimal": "verifiers.multidraft:OptimalRule",
    "typical": "verifiers.typical:TypicalRule",
    "lantern": "verifiers.lantern:LanternRule",
    "judge": "verifiers.judge:JudgeRule",
    "bild": "verifiers.bild:BiLDRule",
    "continuous": "verifiers.continuous:ContinuousRule",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str | NodeRule, **kwargs) -> NodeRule:
    """The rule called ``name`` built with ``kwargs``; a rule object is returned unchanged."""
    return build(_REGISTRY, "verifier", "select", name, **kwargs)


def optimal_acceptance(target_probs, draft_probs, k: int, sampling: str = "iid") -> float:
    """The optimal acceptance probability of k drafts (see `verifiers.multidraft`)."""
    from verifiers.multidraft import optimal_acceptance as bound

    return bound(target_probs, draft_probs, k, sampling)


__all__ = ["NodeRule", "available", "get", "optimal_acceptance", "walk_tree"]
