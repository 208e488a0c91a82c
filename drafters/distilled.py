"""A small draft LM distilled from the target: its first layers, trained to match its distribution.

The draft model is a copy of the target's architecture with only ``layers`` decoder layers,
initialised from the target's first layers and final norm, sharing the target's (tied) token
embeddings, which stay frozen. It is trained by knowledge distillation, the recipe of DistillSpec:
the loss is the cross-entropy to the target's own next-token distribution (KL up to a constant),
computed over the reduced draft vocabulary (drafters/trained.py) to keep training affordable.

The result is a normal Hugging Face causal LM (``DistilledLM.from_pretrained(...).model``) used
through drafters/small_lm.py; ``drafters.get("distilled")`` loads the shipped one for the embedded
target. Only the draft layers and the norm are stored: the embeddings come from the target at load
time, so the checkpoint stays a few MB and cannot drift from the target's vocabulary.

References:
    Zhou, Lyu, Rawat, Menon, Rostamizadeh, Kumar, Kagy, Agarwal. "DistillSpec: Improving
    Speculative Decoding via Knowledge Distillation". ICLR 2024. arXiv:2310.08461.
    Hinton, Vinyals, Dean. "Distilling the Knowledge in a Neural Network". 2015. arXiv:1503.02531.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from drafters.small_lm import SmallLMDrafter
from drafters.trained import TrainedModule, distillation_loss, draft_head_weight
from specdec.state import DecodingState


class DistilledLM(TrainedModule):
    kind = "distilled"

    def __init__(self, config: dict, draft_to_target: torch.Tensor, target):
        super().__init__(config, draft_to_target, target)
        from transformers import AutoConfig, AutoModelForCausalLM

        options = dict(config["model"])
        model_config = AutoConfig.for_model(options.pop("model_type"), **options)
        self.model = AutoModelForCausalLM.from_config(model_config).to(
            target.get_input_embeddings().weight.device)
        # the target's embeddings (and tied head) are shared, frozen, never stored
        self.model.set_input_embeddings(target.get_input_embeddings())
        self.model.tie_weights()
        self.register_buffer("head_weight", draft_head_weight(target, self.draft_to_target),
                             persistent=False)  # [Vd, H] frozen

    @classmethod
    def for_training(cls, target, draft_to_target, heads: int | None = None,
                     layers: int | None = None, loss: str = "kl") -> "DistilledLM":
        if not target.config.get_text_config().tie_word_embeddings:
            raise ValueError("the distilled LM shares the target's tied embeddings; this target "
                             "has an untied lm_head")
        layers = layers or 2
        model_config = copy.deepcopy(target.config)
        model_config.num_hidden_layers = layers
        if hasattr(model_config, "layer_types") and model_config.layer_types:
            model_config.layer_types = model_config.layer_types[:layers]
        options = model_config.to_dict()
        for key in ("architectures", "transformers_version", "_name_or_path", "quantization_config"):
            options.pop(key, None)
        config = cls.base_config(target, draft_to_target, layers=layers, loss=loss, model=options)
        module = cls(config, draft_to_target, target)
        state = {k: v for k, v in target.state_dict().items()
                 if not k.startswith(("model.embed_tokens", "lm_head"))}
        module.model.load_state_dict(state, strict=False)  # layers >= ``layers`` are skipped
        return module

    def trained_state(self) -> dict[str, torch.Tensor]:
        shared = self.model.get_input_embeddings().weight
        return {name: p.detach() for name, p in self.named_parameters() if p is not shared}

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        tokens, mask = batch["tokens"], batch["mask"]  # [B, T] each
        hidden = self.model.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        draft_logits = hidden[:, :-1] @ self.head_weight.T  # [B, T-1, Vd] predicts tokens 1..T-1
        value, agree = distillation_loss(
            draft_logits, batch["label_draft_ids"][:, 1:], batch["teacher_draft_ids"][:, :-1],
            batch["teacher_probs"][:, :-1], mask[:, 1:], self.config["loss"])
        return value, {"top1": float(agree)}


class DistilledDrafter(SmallLMDrafter):
    """``drafters.get("distilled", weights="distilled", depth=4, branching=...)``: the small-LM
    drafter on a distilled model (shipped name, a folder from ``specdec train distilled``, or a
    `DistilledLM`), built onto the target's embeddings when generation begins."""

    def __init__(self, weights: str | Path | DistilledLM = "distilled", depth: int = 4,
                 branching: int | Sequence[int] = (2, 1, 1, 1), mode: str = "greedy",
                 max_frontier: int | None = None):
        self.weights = weights
        self._options = {"depth": depth, "branching": list(branching) if not isinstance(
            branching, int) else branching, "mode": mode, "max_frontier": max_frontier}
        self._target = None
        self._forward = None

    def begin(self, state: DecodingState) -> None:
        if self._target is not state.target:
            module = self.weights if isinstance(self.weights, DistilledLM) else \
                DistilledLM.from_pretrained(self.weights, state.target)
            SmallLMDrafter.__init__(self, module.model, **self._options)
            self._target = state.target
        super().begin(state)
