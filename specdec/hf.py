"""Keep calling ``model.generate``: `wrap` makes it speculative.

``specdec.wrap(model, drafter="pld", verifier="exact")`` replaces the instance's ``generate`` so
that ``model.generate(**inputs, max_new_tokens=..., do_sample=..., temperature=..., top_k=...,
top_p=..., streamer=...)`` runs the speculative loop with the merged ``GenerationConfig``
honoured (model defaults, then the call's arguments, as transformers does). Options the loop
cannot honour exactly (beam search, repetition penalties, several return sequences, padding) are
refused with an error instead of being silently ignored. ``specdec.last_stats(model)`` returns
the stats of the last call; ``specdec.unwrap(model)`` restores the original method. Other
keyword arguments go to `speculative_generate` (e.g. ``tree_budget="auto"``).
"""

from __future__ import annotations

import copy

import torch

from specdec.engine.cost import make_budget
from specdec.loop import speculative_generate

# GenerationConfig fields whose non-default values change the output in ways the loop does not
# implement; value = the neutral setting
_UNSUPPORTED = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "bad_words_ids": None, "force_words_ids": None, "min_length": 0, "min_new_tokens": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "constraints": None, "guidance_scale": None, "watermarking_config": None,
}


def _check_supported(config) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            raise ValueError(
                f"generation option {name}={value!r} is not supported by speculative decoding; "
                f"unset it, or call specdec.unwrap(model) to use plain generate"
            )


def wrap(model, drafter, verifier="exact", **loop_kwargs):
    """Make ``model.generate`` speculative with ``drafter`` and ``verifier``; returns ``model``."""
    if hasattr(model, "_specdec_generate"):
        unwrap(model)
    if loop_kwargs.get("tree_budget") is not None:
        # one budget for every call, so its acceptance estimates carry over from call to call
        loop_kwargs["tree_budget"] = make_budget(loop_kwargs["tree_budget"], model)
    original = model.generate

    def generate(inputs=None, generation_config=None, streamer=None, generator=None, **kwargs):
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids (or inputs)")
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
            raise ValueError(
                "the attention_mask has padding: speculative decoding runs one unpadded prompt at "
                "a time; call generate once per prompt"
            )
        config = copy.deepcopy(generation_config or model.generation_config)
        unknown = config.update(**kwargs)
        if unknown:
            raise ValueError(f"unsupported generate arguments: {sorted(unknown)}")
        _check_supported(config)
        prompt_len = int(input_ids.shape[-1])
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = (config.max_length or 20) - prompt_len
        if config.do_sample:
            temperature = 1.0 if config.temperature is None else float(config.temperature)
            top_k, top_p = config.top_k, config.top_p
        else:
            temperature, top_k, top_p = 0.0, None, None
        out = speculative_generate(
            model, input_ids, drafter=drafter, verifier=verifier, max_new_tokens=max_new,
            temperature=temperature, top_k=top_k or None, top_p=top_p,
            eos_token_id=config.eos_token_id, generator=generator, streamer=streamer,
            **loop_kwargs,
        )
        model._specdec_last_stats = out.stats
        if config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=out.sequences.to(input_ids.device))
        return out.sequences.to(input_ids.device)

    model._specdec_generate = original
    model.generate = generate
    return model


def unwrap(model):
    """Restore the original ``generate``."""
    if hasattr(model, "_specdec_generate"):
        del model.generate  # the instance attribute; the class method shows through again
        del model._specdec_generate
    return model


def last_stats(model):
    """The `GenerationStats` of the last wrapped ``generate`` call."""
    stats = getattr(model, "_specdec_last_stats", None)
    if stats is None:
        raise ValueError("no speculative generate has run on this model; call specdec.wrap first")
    return stats
