"""Drafters: propose candidate token trees for the target to verify.

``drafters.get(name, **kwargs)`` builds one by name; ``drafters.available()`` lists the names. Any
object with ``propose(state) -> DraftTree`` can be passed to the loop instead. A new drafter joins
by adding one row to ``_REGISTRY``.
"""

from __future__ import annotations

import importlib

from drafters.base import Drafter, DrafterBase

_REGISTRY: dict[str, str] = {
    "pld": "drafters.prompt_lookup:PromptLookupDrafter",
    "trie": "drafters.ngram_trie:NgramTrieDrafter",
    "small-lm": "drafters.small_lm:SmallLMDrafter",
    "medusa": "drafters.medusa:MedusaDrafter",
    "hydra": "drafters.hydra:HydraDrafter",
    "hydra++": "drafters.hydra:HydraPlusPlusDrafter",
    "distilled": "drafters.distilled:DistilledDrafter",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str | Drafter, **kwargs) -> Drafter:
    """The drafter called ``name`` built with ``kwargs``; a drafter object is returned unchanged."""
    if not isinstance(name, str):
        if not hasattr(name, "propose"):
            raise TypeError(f"{name!r} is neither a drafter name nor an object with propose(state)")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown drafter {name!r}; valid names: {', '.join(available())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Drafter", "DrafterBase", "available", "get"]
