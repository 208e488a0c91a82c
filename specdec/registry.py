"""Name -> class registries for drafters and verifiers (imports are lazy, so optional
dependencies of one algorithm never burden the others)."""

from __future__ import annotations

import importlib


def build(registry: dict[str, str], kind: str, method: str, name, **kwargs):
    """Instantiate ``registry[name]`` ("module:Class") with ``kwargs``.

    An object that already has ``method`` is returned unchanged; an unknown name raises a
    ValueError listing the valid ones.
    """
    if not isinstance(name, str):
        if not hasattr(name, method):
            raise TypeError(f"{name!r} is neither a {kind} name nor an object with {method}(...)")
        return name
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
