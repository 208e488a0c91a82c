"""Drafters: propose candidate token trees for the target to verify.

``drafters.get(name, **kwargs)`` builds one by name; ``drafters.available()`` lists the names. Any
object with ``propose(state) -> DraftTree`` can be passed to the loop instead. A new drafter joins
by adding one row to ``_REGISTRY``.
"""

from __future__ import annotations

from drafters.base import Drafter, DrafterBase
from specdec.registry import build

_REGISTRY: dict[str, str] = {
    "none": "drafters.none:NoDrafter",
    "pld": "drafters.prompt_lookup:PromptLookupDrafter",
    "trie": "drafters.ngram_trie:NgramTrieDrafter",
    "small-lm": "drafters.small_lm:SmallLMDrafter",
    "medusa": "drafters.medusa:MedusaDrafter",
    "hydra": "drafters.hydra:HydraDrafter",
    "hydra++": "drafters.hydra:HydraPlusPlusDrafter",
    "distilled": "drafters.distilled:DistilledDrafter",
    "eagle": "drafters.eagle:EagleDrafter",
    "eagle2": "drafters.eagle:Eagle2Drafter",
    "eagle3": "drafters.eagle:Eagle3Drafter",
    "falcon": "drafters.falcon:FalconDrafter",
    "union": "drafters.union:UnionDrafter",
    "quantized": "drafters.quantized:QuantizedSelfDrafter",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str | Drafter, **kwargs) -> Drafter:
    """The drafter called ``name`` built with ``kwargs``; a drafter object is returned unchanged."""
    return build(_REGISTRY, "drafter", "propose", name, **kwargs)


__all__ = ["Drafter", "DrafterBase", "available", "get"]
