"""Checks on a speculative generation call, made before any model work.

`validate_call` is the first thing `specdec.speculative_generate` does: it refuses an object that
is not a Hugging Face causal LM, a prompt that is empty or holds ids outside the model's
vocabulary, an ``eos_token_id`` that is not a token id, and unknown drafter or verifier names,
each with a one-line `specdec.errors.UsageError` that says what to change. It also resolves the
default ``eos_token_id`` (the model's ``generation_config.eos_token_id``, as
``model.generate`` does) and warns once per process per verifier class when a lossy verifier
runs (`LossyVerifierWarning`).

During the loop, `proposed` checks that a drafter returned a `DraftTree`, and `cut_at_stop`
applies ``transformers`` stopping criteria token by token, so a criterion stops generation on the
same token as it does in ``model.generate``.
"""

from __future__ import annotations

import operator
import warnings

import torch

from specdec.errors import UsageError
from specdec.tree import DraftTree


class _ModelDefault:
    def __repr__(self) -> str:
        return "<the model's generation_config.eos_token_id>"


# ``eos_token_id``'s default: the model's own; an explicit None means "never stop at a token"
MODEL_DEFAULT = _ModelDefault()


class LossyVerifierWarning(UserWarning):
    """A verifier whose output is not distributed exactly as the target's is running."""


_WARNED: set[type] = set()  # verifier classes already warned about in this process


def check_model(model) -> None:
    if getattr(model, "config", None) is None or not callable(getattr(model, "forward", None)):
        raise UsageError(
            f"the model must be a Hugging Face causal LM (an object with .config and .forward, "
            f"e.g. from transformers.AutoModelForCausalLM.from_pretrained), got "
            f"{type(model).__name__}"
        )


def check_prompt_ids(model, input_ids) -> None:
    """Refuse an empty prompt and token ids outside the model's vocabulary."""
    from specdec.target import target_vocab_size

    ids = input_ids if torch.is_tensor(input_ids) else torch.as_tensor(input_ids)
    if ids.numel() == 0:
        raise UsageError("the prompt is empty: give at least one token (e.g. the BOS token)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise UsageError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    vocab_size = target_vocab_size(model)
    flat = ids.reshape(-1).tolist()  # once per call, before any forward
    for position, token in enumerate(flat):
        if not 0 <= token < vocab_size:
            raise UsageError(
                f"prompt token id {token} (position {position}) is outside the model's vocabulary "
                f"of {vocab_size} tokens: tokenize the prompt with the model's own tokenizer"
            )


def _is_token_id(value) -> bool:
    if isinstance(value, (bool, str)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def resolve_eos(model, eos_token_id):
    """The ``eos_token_id`` to stop at: the model's default in place of `MODEL_DEFAULT`, checked."""
    if eos_token_id is MODEL_DEFAULT:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return None
    if torch.is_tensor(eos_token_id):
        values = eos_token_id.reshape(-1).tolist()
    elif isinstance(eos_token_id, (list, tuple, set)):
        values = list(eos_token_id)
    else:
        values = [eos_token_id]
    for value in values:
        if isinstance(value, str):
            raise UsageError(
                f"eos_token_id must be a token id (int) or a list of ids, got the string "
                f"{value!r}: pass tokenizer.eos_token_id or tokenizer.convert_tokens_to_ids("
                f"{value!r})"
            )
        if not _is_token_id(value):
            raise UsageError(
                f"eos_token_id must be a token id (int) or a list of ids, got {eos_token_id!r}"
            )
    return eos_token_id


def _build(kind: str, method: str, value):
    """A drafter or verifier (``kind``) from a registered name, or the object itself."""
    import drafters
    import verifiers

    registry = drafters if kind == "drafter" else verifiers
    if not isinstance(value, str):
        if not callable(getattr(value, method, None)):
            raise UsageError(
                f"the {kind} must be a name ({', '.join(registry.available())}) or an object "
                f"with {method}(...), got {type(value).__name__}"
            )
        return value
    if value not in registry.available():
        raise UsageError(
            f"unknown {kind} {value!r}; valid names: {', '.join(registry.available())}"
        )
    try:
        return registry.get(value)
    except TypeError as err:
        raise UsageError(
            f"{kind} {value!r} cannot be built from its name alone ({err}): pass an object, "
            f"e.g. {kind}={registry.__name__}.get({value!r}, ...)"
        ) from err


def build_drafter(drafter):
    return _build("drafter", "propose", drafter)


def build_verifier(verifier):
    return _build("verifier", "select", verifier)


def warn_if_lossy(verifier) -> None:
    """Warn once per process per verifier class whose ``lossless`` flag is False."""
    cls = type(verifier)
    if getattr(verifier, "lossless", True) is not False or cls in _WARNED:
        return
    _WARNED.add(cls)
    warnings.warn(
        f"verifier {cls.__name__} is lossy: its output is not distributed as the target "
        f"model's own and may differ from model.generate even at temperature 0; use a verifier "
        f"whose lossless flag is True (e.g. 'exact' or 'greedy') for exact outputs",
        LossyVerifierWarning, stacklevel=4,  # the caller of speculative_generate
    )


def validate_call(model, input_ids, drafter, verifier, eos_token_id):
    """Check a `speculative_generate` call; returns (drafter, verifier, eos_token_id) resolved."""
    check_model(model)
    check_prompt_ids(model, input_ids)
    eos_token_id = resolve_eos(model, eos_token_id)
    drafter, verifier = build_drafter(drafter), build_verifier(verifier)
    warn_if_lossy(verifier)
    return drafter, verifier, eos_token_id


def proposed(drafter, state) -> DraftTree:
    """``drafter.propose(state)``, checked to be a `DraftTree`."""
    tree = drafter.propose(state)
    if not isinstance(tree, DraftTree):
        got = "None" if tree is None else f"a {type(tree).__name__}"
        raise TypeError(
            f"drafter {type(drafter).__name__}.propose returned {got}; propose must return a "
            f"DraftTree (DraftTree.empty() for no speculation this step)"
        )
    return tree


def cut_at_stop(stopping_criteria, tokens: list[int], emitted: list[int], finished: bool
                ) -> tuple[list[int], bool]:
    """``emitted`` cut right after the first token at which ``stopping_criteria(input_ids
    [1, L], scores=None)`` is true (``tokens`` are the committed ones before it), and whether
    generation is finished. Criteria see CPU tensors: the tokens already live on the host."""
    for i in range(len(emitted)):
        input_ids = torch.tensor([tokens + emitted[: i + 1]], dtype=torch.long)
        if bool(torch.as_tensor(stopping_criteria(input_ids, None)).all()):
            return emitted[: i + 1], True
    return emitted, finished
