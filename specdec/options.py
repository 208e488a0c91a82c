"""Command-line options shared by the ``specdec`` subcommands.

- ``key=value`` pairs (``--drafter-arg depth=3``, the eval's ``trie:node_budget=8``): values are
  Python literals where they parse (``branching=[2,1]``, ``mode='iid'``), strings otherwise.
- drafter and verifier names and their keyword arguments, checked against the registries and the
  classes' constructor signatures without building anything (no model, no weights).
- ranges of numeric settings and the ``--device`` / ``--dtype`` choices.

Every check raises `specdec.errors.UsageError` with one line that names the flag to change.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import math
from typing import Any, Iterable

from specdec.errors import UsageError

DTYPES = ("float32", "float16", "bfloat16")

# verifier name -> keyword arguments it gets from the target model unless given
TARGET_SUPPLIED: dict[str, tuple[str, ...]] = {"lantern": ("embeddings",)}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows each option's default where it has one (not for flags, required
    options or options without a default)."""

    def _get_help_string(self, action):
        default = action.default
        if action.required or default is None or default is False or default == []:
            return action.help
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------- key=value
def parse_value(text: str) -> Any:
    """A Python literal where ``text`` is one (``3``, ``[2, 1]``, ``None``), else the string."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pair(pair: str, where: str) -> tuple[str, Any]:
    """``"key=value"`` -> (``key`` with '-' as '_', parsed value); ``where`` names the option in
    the error (``"--drafter-arg"``)."""
    key, equals, value = pair.partition("=")
    if not equals or not key.strip():
        raise UsageError(f"{where} {pair!r} must look like key=value")
    return key.strip().replace("-", "_"), parse_value(value)


def parse_kwargs(pairs: Iterable[str] | None, where: str = "option") -> dict[str, Any]:
    """``["depth=3", "mode=iid"]`` -> ``{"depth": 3, "mode": "iid"}`` (a key given twice: the
    last wins, as on any command line)."""
    return dict(parse_pair(pair, where) for pair in pairs or [])


# ---------------------------------------------------------------------------------- registries
def check_name(name: str, valid: Iterable[str], flag: str) -> None:
    """``name`` is one of ``valid``, or a `UsageError` naming the closest ones."""
    valid = list(valid)
    if name in valid:
        return
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"{flag} {name!r} is unknown{hint}; valid names: {', '.join(valid)}")


def registered_class(package, name: str) -> type:
    """The class ``drafters`` or ``verifiers`` registers as ``name``, imported, not built."""
    module, cls = package._REGISTRY[name].split(":")  # the registry of the package's get()
    return getattr(importlib.import_module(module), cls)


def check_kwargs(cls: type, kwargs: dict, flag: str, what: str,
                 supplied: Iterable[str] = ()) -> None:
    """Every key of ``kwargs`` is a parameter of ``cls`` and every required parameter is given
    (or in ``supplied``, filled in later); ``flag`` is the option that sets them, ``what`` names
    the thing built (``"drafter 'pld'"``)."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [n for n, p in parameters.items() if p.kind in named]
    takes = f"its options: {', '.join(names)}" if names else "it takes none"
    for key in kwargs:
        if key not in names:
            raise UsageError(f"{flag} {key}=...: {what} has no option {key!r}; {takes}")
    for name in names:
        if parameters[name].default is inspect.Parameter.empty and name not in kwargs \
                and name not in supplied:
            raise UsageError(f"{what} needs {flag} {name}=VALUE")


def verifier_kwargs_for(name: str, kwargs: dict, model) -> dict:
    """``kwargs`` plus what verifier ``name`` takes from the target ``model`` (`TARGET_SUPPLIED`):
    LANTERN's latent neighbourhoods come from the target's input embeddings."""
    kwargs = dict(kwargs)
    if "embeddings" in TARGET_SUPPLIED.get(name, ()):
        kwargs.setdefault("embeddings", model.get_input_embeddings().weight.detach())
    return kwargs


# ---------------------------------------------------------------------------------- ranges
def require(checks: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Rows ``(flag, value, valid, wanted)``: the first invalid one raises
    ``UsageError("FLAG must be WANTED, got VALUE")``."""
    for flag, value, valid, wanted in checks:
        if not valid:
            raise UsageError(f"{flag} must be {wanted}, got {value}")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def check_device(device: str | None, flag: str = "--device") -> None:
    """``device`` parses as a torch device this build and machine have (None: the default)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {device!r} is not a device: use cpu, cuda, cuda:N or mps") \
            from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = torch.version.cuda or getattr(torch.version, "hip", None)
            reason = "no CUDA device is visible" if built else "this PyTorch build has no CUDA"
            raise UsageError(f"{flag} {device}: {reason}; use {flag} cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"{flag} {device}: there are only {count} CUDA devices "
                             f"(cuda:0 to cuda:{count - 1})")
        return
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise UsageError(f"{flag} {device}: {parsed.type} is not available here; use {flag} cpu")
