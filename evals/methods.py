"""Decoding methods the eval compares, named by a small spec language.

::

    METHOD   := PART ["+" PART]              drafter "+" verifier, or one Hugging Face method
    PART     := NAME [":" KEY=VALUE ("," KEY=VALUE)*]

- ``baseline``: ``model.generate`` (greedy or sampled), the reference every ratio is taken to.
- ``hf-pld``: ``model.generate(prompt_lookup_num_tokens=10)``, Hugging Face's prompt lookup.
- ``hf-assisted``: ``model.generate(assistant_model=draft_model)``.
- any drafter of `drafters.available` with an optional verifier of `verifiers.available`:
  ``pld``, ``trie:node_budget=8,max_depth=4+exact``, ``small-lm:depth=3,mode=iid+spectr``.
  The drafter key ``tree_budget=auto`` is handed to the loop (cost-aware tree size,
  specdec/engine/cost.py) instead of the drafter: ``eagle2:tree_budget=auto``.
  Without a verifier: ``greedy`` at temperature 0, ``exact`` otherwise.

Values are Python literals where they parse (``branching=[2,2,1]``; commas inside brackets do not
split), strings otherwise. The Hugging Face methods take ``generate`` keyword arguments the same
way (``hf-pld:prompt_lookup_num_tokens=5``). ``small-lm`` drafts with the draft model that
`build_methods` loads (``--draft-model``; the target's checkpoint when none) unless the spec names
``model=PATH``; ``lantern`` gets the target's input embeddings unless the spec gives its own.

`build_methods` turns the parsed specs into the methods of one run (what ``specdec eval`` and the
benchmark scripts both call). Each method runs one prompt and returns a `Generation`: the new
token ids, the wall time of the whole call (prefill included, as Spec-Bench measures), and its
step counts. For the Hugging Face methods a step is one forward of the target (counted with a
forward hook), so their ``tau`` is new tokens per target forward; only the project's loop reports
acceptance per depth, and its `specdec.state.GenerationStats` (draft and target time, tree sizes,
tree-budget choices) come with the generation as ``Generation.stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from specdec.errors import UsageError
from specdec.options import parse_pair, verifier_kwargs_for
from specdec.state import GenerationStats
from specdec.timing import clock

HF_METHODS = {
    "baseline": {},
    "hf-pld": {"prompt_lookup_num_tokens": 10},
    "hf-assisted": {},
}


@dataclass
class Generation:
    output_ids: list[int]
    wall_time: float  # seconds for the whole call, prefill included
    steps: int  # target forwards that produced tokens
    accepted_lengths: list[int] | None = None  # per step: accepted drafts + 1 (project loop only)
    depth_attempts: list[int] | None = None  # [d-1]: steps whose tree reached depth d
    depth_accepts: list[int] | None = None  # [d-1]: steps that accepted >= d drafts
    stats: GenerationStats | None = None  # the project's loop only: its counters and times


@dataclass
class SamplingSettings:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _split_top(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def parse_part(text: str, spec: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` -> (name, kwargs)."""
    name, _, arguments = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"method {spec!r}: empty name before {text!r}")
    kwargs: dict[str, Any] = {}
    for pair in _split_top(arguments, ",") if arguments.strip() else []:
        key, value = parse_pair(pair, f"method {spec!r}: option")
        kwargs[key] = value
    return name, kwargs


@dataclass
class MethodSpec:
    label: str  # the spec as written; names the method in records and tables
    name: str  # baseline / hf-pld / hf-assisted, or a drafter name
    kwargs: dict[str, Any] = field(default_factory=dict)
    verifier: str | None = None
    verifier_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_hf(self) -> bool:
        return self.name in HF_METHODS

    @property
    def needs_draft_model(self) -> bool:
        if self.name == "hf-assisted":
            return True
        return self.name == "small-lm" and "model" not in self.kwargs


def parse_method(spec: str) -> MethodSpec:
    """Parse one method spec (see the module docstring); unknown names list the valid ones."""
    import drafters
    import verifiers

    # the verifier follows the last '+'; drafter names may end in '+' themselves (hydra++)
    parts = _split_top(spec.strip(), "+")
    head, tail = "+".join(parts[:-1]), parts[-1]
    if len(parts) == 1 or not tail.strip():
        head, tail = spec.strip(), ""
    name, kwargs = parse_part(head, spec)
    verifier, verifier_kwargs = parse_part(tail, spec) if tail.strip() else (None, {})
    if name in HF_METHODS:
        if verifier is not None:
            raise ValueError(
                f"method {spec!r}: {name} is Hugging Face generate; it takes no verifier"
            )
    elif name not in drafters.available():
        raise ValueError(
            f"unknown method {name!r} in {spec!r}; valid: {', '.join(HF_METHODS)}, or a drafter "
            f"({', '.join(drafters.available())}) optionally followed by +verifier "
            f"({', '.join(verifiers.available())})"
        )
    if verifier is not None and verifier not in verifiers.available():
        raise ValueError(
            f"unknown verifier {verifier!r} in {spec!r}; valid: {', '.join(verifiers.available())}"
        )
    return MethodSpec(spec.strip(), name, kwargs, verifier, verifier_kwargs)


def parse_methods(text: str) -> list[MethodSpec]:
    """A comma-separated list of specs; commas inside a spec's options belong to it.

    ``pld,trie:node_budget=8,max_depth=4+exact`` is two methods: a piece after a comma that
    contains '=' before any ':' or '+' continues the previous spec's options.
    """
    specs: list[str] = []
    for piece in _split_top(text, ","):
        piece = piece.strip()
        if not piece:
            continue
        head = piece.split("+")[0]
        if specs and "=" in head and ":" not in head.split("=")[0]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    if not specs:
        raise ValueError("no methods given")
    labels = [spec.strip() for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a method is listed twice in {text!r}")
    return [parse_method(spec) for spec in specs]


class Method:
    """A method built for one run's sampling settings: call it on one prompt."""

    def __init__(self, spec: MethodSpec, model, sampling: SamplingSettings, *, eos_token_id,
                 pad_token_id=None, draft_model=None):
        self.spec = spec
        self.label = spec.label
        self.model = model
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        if spec.needs_draft_model and draft_model is None:
            raise ValueError(f"method {spec.label!r} needs a draft model")
        if spec.is_hf:
            self.generate_kwargs = {**HF_METHODS[spec.name], **spec.kwargs}
            if spec.name == "hf-assisted":
                self.generate_kwargs["assistant_model"] = draft_model
            self.lossless = True
        else:
            import drafters
            import verifiers

            drafter_kwargs = dict(spec.kwargs)
            # a loop option, not the drafter's: eagle2:tree_budget=auto
            # built once, so its acceptance estimates carry over from prompt to prompt
            from specdec.engine.cost import make_budget
            self.tree_budget = make_budget(drafter_kwargs.pop("tree_budget", None), model)
            if spec.name == "small-lm":
                drafter_kwargs.setdefault("model", draft_model)
            self.drafter = drafters.get(spec.name, **drafter_kwargs)
            verifier_name = spec.verifier or ("greedy" if sampling.greedy else "exact")
            verifier_kwargs = verifier_kwargs_for(verifier_name, spec.verifier_kwargs, model)
            self.verifier = verifiers.get(verifier_name, **verifier_kwargs)
            self.lossless = bool(getattr(self.verifier, "lossless", False))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
        input_ids = input_ids.to(self.device)
        if self.spec.is_hf:
            return self._hf(input_ids, max_new_tokens)
        return self._speculative(input_ids, max_new_tokens)

    def _hf(self, input_ids, max_new_tokens) -> Generation:
        sampling = self.sampling
        forwards = 0

        def count(*_):
            nonlocal forwards
            forwards += 1

        options = dict(do_sample=not sampling.greedy, max_new_tokens=max_new_tokens,
                       eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        if not sampling.greedy:
            # explicit neutral values: the model's generation_config may default top_k to 50
            options.update(temperature=sampling.temperature, top_k=sampling.top_k or 0,
                           top_p=sampling.top_p if sampling.top_p is not None else 1.0)
        torch.manual_seed(sampling.seed)
        hook = self.model.register_forward_hook(count)
        try:
            start = clock(self.device)
            sequences = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                            **options, **self.generate_kwargs)
            wall = clock(self.device) - start
        finally:
            hook.remove()
        return Generation(sequences[0, input_ids.shape[1]:].tolist(), wall, forwards)

    def _speculative(self, input_ids, max_new_tokens) -> Generation:
        from specdec.loop import speculative_generate

        sampling = self.sampling
        generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        start = clock(self.device)
        out = speculative_generate(
            self.model, input_ids, drafter=self.drafter, verifier=self.verifier,
            max_new_tokens=max_new_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, eos_token_id=self.eos_token_id,
            generator=generator, tree_budget=self.tree_budget,
        )
        wall = clock(self.device) - start
        stats = out.stats
        return Generation(out.new_token_ids, wall, stats.steps, list(stats.accepted_lengths),
                          list(stats.depth_attempts), list(stats.depth_accepts), stats)


def build_methods(specs: Sequence[MethodSpec], model, tokenizer, sampling: SamplingSettings, *,
                  load_draft_model: Callable[[], Any] | None = None) -> list[Method]:
    """The `Method` of every spec for one run on ``model``, ending at the model's EOS.

    ``load_draft_model()`` returns the draft model of ``small-lm`` and ``hf-assisted``; it is
    called once, and only when a spec needs one. A spec that cannot be built raises `UsageError`
    naming it.
    """
    draft_model = None
    if load_draft_model is not None and any(spec.needs_draft_model for spec in specs):
        draft_model = load_draft_model()
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    methods = []
    for spec in specs:
        try:
            methods.append(Method(spec, model, sampling, eos_token_id=eos, pad_token_id=pad,
                                  draft_model=draft_model))
        except (ValueError, TypeError) as error:
            message = str(error).removeprefix(f"method {spec.label!r} ")
            raise UsageError(f"method {spec.label!r}: {message}") from None
    return methods
