"""Verifiers: node rules that decide which draft tokens the target accepts.

``verifiers.get(name)`` builds a rule by name; ``verifiers.available()`` lists the names. Any
object satisfying `verifiers.base.NodeRule` can be passed to the loop instead. A new rule joins by
adding one row to ``_REGISTRY`` (imports are lazy so optional dependencies stay optional).
"""

from __future__ import annotations

import importlib

from verifiers.base import NodeRule, walk_tree

_REGISTRY: dict[str, str] = {
    "greedy": "verifiers.greedy:GreedyRule",
    "exact": "verifiers.rejection:ExactRule",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str | NodeRule, **kwargs) -> NodeRule:
    """The rule called ``name`` built with ``kwargs``; a rule object is returned unchanged."""
    if not isinstance(name, str):
        if not hasattr(name, "select"):
            raise TypeError(f"{name!r} is neither a verifier name nor an object with select(...)")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; valid names: {', '.join(available())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["NodeRule", "available", "get", "walk_tree"]
