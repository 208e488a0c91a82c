"""specdec: speculative decoding for Hugging Face causal language models."""

from specdec.embedded import load_embedded
from specdec.hf import last_stats, unwrap, wrap
from specdec.loop import GenerationOutput, speculative_generate
from specdec.sampling import SamplingConfig
from specdec.state import DecodingState, GenerationStats, StepResult
from specdec.tree import DraftTree, TreeError

__all__ = [
    "DecodingState", "DraftTree", "GenerationOutput", "GenerationStats", "SamplingConfig",
    "StepResult", "TreeError", "last_stats", "load_embedded", "speculative_generate", "unwrap",
    "wrap",
]
