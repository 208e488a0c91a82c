"""specdec: speculative decoding for Hugging Face causal language models.

Names are loaded on first use, so ``import specdec.sampling`` (as drafters and verifiers do) does
not import the loop, which itself imports the drafters and verifiers.
"""

import importlib

_EXPORTS = {
    "load_embedded": "specdec.embedded",
    "last_stats": "specdec.hf", "unwrap": "specdec.hf", "wrap": "specdec.hf",
    "GenerationOutput": "specdec.loop", "speculative_generate": "specdec.loop",
    "SamplingConfig": "specdec.sampling",
    "DecodingState": "specdec.state", "GenerationStats": "specdec.state",
    "StepResult": "specdec.state",
    "DraftTree": "specdec.tree", "TreeError": "specdec.tree",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specdec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
