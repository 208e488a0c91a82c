"""Shared fixtures: tiny random HF models of several architectures, the embedded model, data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(arch: str, vocab: int = 96):
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, **TINY)
    if arch == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab, **TINY)
    if arch == "mistral":
        return transformers.MistralConfig(vocab_size=vocab, sliding_window=None, **TINY)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=256, bos_token_id=0, eos_token_id=1)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def tiny_model(arch: str = "llama", vocab: int = 96, seed: int = 0, scale: float = 1.0,
               tie_word_embeddings: bool = False):
    """A random tiny causal LM. ``scale`` sharpens its distributions (larger = peakier), so
    greedy continuations repeat and drafters see both acceptances and rejections."""
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab)
    config.tie_word_embeddings = tie_word_embeddings
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(scale)
    return model


def perturbed_copy(model, noise: float, seed: int = 1):
    """The same architecture with weights perturbed: a draft model that agrees only partly."""
    torch.manual_seed(seed)
    draft = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    draft.load_state_dict(model.state_dict())
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(noise * torch.randn_like(param))
    return draft


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (intra-op threading costs more than it saves);
    the embedded model uses every core."""
    import os
    torch.set_num_threads(os.cpu_count() if "embedded" in request.fixturenames else 1)


def require_kernels():
    """The built CPU kernels (specdec/engine/kernels.py), built on first use, never at collection.
    Skips where the host lacks the build tools (a C++ compiler, ninja) or ``SPECDEC_KERNEL=0``;
    with the tools present a failed build is a failure, not a skip."""
    from specdec.engine import kernels

    missing = kernels.missing_tool()
    if missing is not None:
        pytest.skip(f"the CPU kernels cannot be built here: {missing}")
    if not kernels.enabled():
        pytest.skip(f"the CPU kernels are switched off ({kernels.ENV}=0)")
    assert kernels.available(), f"the CPU kernels failed to build: {kernels.load_error()}"
    return kernels.native()


@pytest.fixture
def native_kernels():
    """`require_kernels` as a fixture."""
    return require_kernels()


@pytest.fixture(scope="session")
def embedded():
    import specdec
    return specdec.load_embedded()


def mt_bench_prompts(n: int) -> list[str]:
    with open(DATA_DIR / "mt_bench" / "question.jsonl") as f:
        return [json.loads(line)["turns"][0] for line in f][:n]


def humaneval_prompts(n: int) -> list[str]:
    import gzip
    with gzip.open(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f][:n]
