"""Keep calling ``model.generate``: `wrap` makes it speculative.

``specdec.wrap(model, drafter="pld", verifier="exact")`` replaces the instance's ``generate`` so
that ``model.generate(**inputs, max_new_tokens=..., do_sample=..., temperature=..., top_k=...,
top_p=..., streamer=...)`` runs the speculative loop with the merged ``GenerationConfig``
honoured (model defaults, then the call's arguments, as transformers does). Also honoured:
``stop_strings`` (with ``tokenizer=``, as in transformers), ``max_time``, ``stopping_criteria``
and ``return_dict_in_generate`` (the output then holds ``sequences`` only).

Refused with a one-line `specdec.errors.UsageError` instead of being silently ignored: options
the loop cannot honour exactly (beam search, repetition penalties, several return sequences,
padding, logits processors, ``output_scores`` and the other per-step outputs), transformers' own
speculative modes (``assistant_model``, ``prompt_lookup_num_tokens``: use specdec's drafters), and
any argument that is neither a ``GenerationConfig`` field nor one of ``generate``'s (transformers
refuses unused model arguments too). ``synced_gpus`` is accepted and has no effect on one
unpadded sequence.

``specdec.last_stats(model)`` returns the stats of the last call; ``specdec.unwrap(model)``
restores the original method. `wrap`'s other keyword arguments go to `speculative_generate`
(``tree_budget="auto"``); they, the drafter and the verifier are checked when `wrap` is called.
A ``copy.deepcopy`` of a wrapped model is wrapped too and generates with its own weights.
"""

from __future__ import annotations

import copy
import inspect

import torch

from specdec import checks
from specdec.engine.cost import make_budget
from specdec.errors import UsageError
from specdec.loop import speculative_generate

# GenerationConfig fields whose non-default values change the output in ways the loop does not
# implement; value = the neutral settings (None is always neutral)
_UNSUPPORTED = {
    "num_beams": (1,), "num_beam_groups": (1,), "num_return_sequences": (1,),
    "penalty_alpha": (), "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,), "bad_words_ids": (), "force_words_ids": (),
    "min_length": (0,), "min_new_tokens": (0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,), "min_p": (), "top_h": (), "sequence_bias": (), "suppress_tokens": (),
    "begin_suppress_tokens": (), "constraints": (), "guidance_scale": (1.0,),
    "watermarking_config": (), "forced_bos_token_id": (), "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (), "dola_layers": (), "token_healing": (False,),
    "diversity_penalty": (0.0,), "speculation_type": (), "use_mtp": (False,),
    # the loop keeps no per-step scores, logits, attentions or hidden states to return
    "output_scores": (False,), "output_logits": (False,), "output_attentions": (False,),
    "output_hidden_states": (False,),
}

# transformers' own speculative modes, and what to use instead
_USE_DRAFTERS = {
    "assistant_model": "pass the assistant as a drafter: specdec.wrap(model, "
                       "drafter=drafters.get('small-lm', model=assistant_model))",
    "assistant_tokenizer": "specdec drafters share the target's tokenizer: use "
                           "drafters.get('small-lm', model=...) with a same-vocabulary model",
    "prompt_lookup_num_tokens": "prompt lookup is specdec's 'pld' drafter: "
                                "specdec.wrap(model, drafter='pld')",
    "assistant_early_exit": "use one of specdec's self-drafters instead, e.g. "
                            "specdec.wrap(model, drafter='quantized')",
}
# generate arguments that change the output in ways the loop does not implement
_REFUSED_ARGUMENTS = ("logits_processor", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                      "negative_prompt_attention_mask", "custom_generate", "past_key_values")
# generate arguments with no effect on one unpadded sequence
_IGNORED_ARGUMENTS = ("synced_gpus",)
# speculative_generate's arguments that the wrapped generate fills on every call
_PER_CALL = ("model", "input_ids", "drafter", "verifier", "max_new_tokens", "temperature", "top_k",
             "top_p", "eos_token_id", "generator", "streamer", "stopping_criteria")


def _check_supported(config) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and value not in neutral:
            raise UsageError(
                f"generation option {name}={value!r} is not supported by speculative decoding; "
                f"unset it, or call specdec.unwrap(model) to use plain generate"
            )


def _check_arguments(config, extra: dict) -> None:
    """Refuse ``extra`` (the arguments that are not GenerationConfig fields) and transformers'
    speculative modes; drop the harmless ones."""
    for name, hint in _USE_DRAFTERS.items():
        if extra.pop(name, getattr(config, name, None)) is not None:
            raise UsageError(f"generate option {name} is not used with specdec.wrap: {hint}")
    for name in _REFUSED_ARGUMENTS:
        if extra.pop(name, None) is not None:
            raise UsageError(
                f"generate argument {name} is not supported by speculative decoding; remove it, "
                f"or call specdec.unwrap(model) to use plain generate"
            )
    for name in _IGNORED_ARGUMENTS:
        extra.pop(name, None)
    if extra:
        raise UsageError(
            f"unknown generate arguments {sorted(extra)}: the wrapped generate takes "
            f"GenerationConfig fields, input_ids, attention_mask, streamer, stopping_criteria, "
            f"tokenizer and generator"
        )


def _check_mask(attention_mask) -> None:
    if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
        raise UsageError(
            "the attention_mask has padding: speculative decoding runs one unpadded prompt at a "
            "time; call generate once per prompt"
        )


def _stopping_criteria(config, stopping_criteria, tokenizer):
    """One `StoppingCriteriaList` of the call's criteria, ``max_time`` and ``stop_strings``, or
    None when there are none."""
    from transformers.generation.stopping_criteria import (MaxTimeCriteria, StoppingCriteriaList,
                                                           StopStringCriteria)

    criteria = StoppingCriteriaList(stopping_criteria or [])
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise UsageError(
                "stop_strings needs the tokenizer to match text against tokens: call "
                "generate(..., stop_strings=..., tokenizer=tokenizer)"
            )
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    return criteria if len(criteria) else None


def _sampling(config) -> dict:
    if not config.do_sample:
        return dict(temperature=0.0, top_k=None, top_p=None)
    temperature = 1.0 if config.temperature is None else float(config.temperature)
    return dict(temperature=temperature, top_k=config.top_k or None, top_p=config.top_p)


def _check_wrap_options(loop_kwargs: dict) -> None:
    allowed = sorted(set(inspect.signature(speculative_generate).parameters) - set(_PER_CALL))
    unknown = sorted(set(loop_kwargs) - set(allowed))
    if unknown:
        raise UsageError(
            f"specdec.wrap got unknown options {unknown}: it takes {', '.join(allowed)}; pass "
            f"generation options to generate(), and drafter or verifier options to the object, "
            f"e.g. drafter=drafters.get('pld', min_ngram=2)"
        )


class SpeculativeGenerate:
    """The ``generate`` that `wrap` installs: a callable holding its model, so a deep copy of the
    model holds a copy that runs the copied model."""

    def __init__(self, model, drafter, verifier, loop_kwargs: dict):
        self.model, self.drafter, self.verifier = model, drafter, verifier
        self.loop_kwargs = loop_kwargs

    def __call__(self, inputs=None, generation_config=None, streamer=None, generator=None,
                 stopping_criteria=None, tokenizer=None, **kwargs):
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise UsageError("generate needs input_ids (or inputs)")
        _check_mask(kwargs.pop("attention_mask", None))
        config = copy.deepcopy(generation_config or self.model.generation_config)
        _check_arguments(config, config.update(**kwargs))
        _check_supported(config)
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = (config.max_length or 20) - int(input_ids.shape[-1])
        out = speculative_generate(
            self.model, input_ids, drafter=self.drafter, verifier=self.verifier,
            max_new_tokens=max_new, eos_token_id=config.eos_token_id, generator=generator,
            streamer=streamer, **_sampling(config),
            stopping_criteria=_stopping_criteria(config, stopping_criteria, tokenizer),
            **self.loop_kwargs,
        )
        self.model._specdec_last_stats = out.stats
        sequences = out.sequences.to(input_ids.device)
        if config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences


def wrap(model, drafter, verifier="exact", **loop_kwargs):
    """Make ``model.generate`` speculative with ``drafter`` and ``verifier``; returns ``model``.

    The model, the drafter and verifier (names are built once to check them) and the options are
    checked here, so a mistake fails now rather than at the first ``generate``."""
    checks.check_model(model)
    checks.build_drafter(drafter)
    checks.build_verifier(verifier)
    _check_wrap_options(loop_kwargs)
    if hasattr(model, "_specdec_generate"):
        unwrap(model)
    if loop_kwargs.get("tree_budget") is not None:
        # one budget for every call, so its acceptance estimates carry over from call to call
        loop_kwargs["tree_budget"] = make_budget(loop_kwargs["tree_budget"], model)
    model._specdec_generate = model.generate
    model.generate = SpeculativeGenerate(model, drafter, verifier, loop_kwargs)
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
