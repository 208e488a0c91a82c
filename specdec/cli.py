"""The ``specdec`` command line.

    specdec generate --prompt "..." --drafter pld --verifier greedy

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args)``;
a new one joins by adding a row to ``_SUBCOMMANDS``. Bad input is a `specdec.errors.UsageError`,
raised before the model loads where the check does not need it, and printed as one line on stderr
with exit status 2 (docs/errors.md lists every message); so are argparse's own errors.

``specdec generate`` streams the text as the verifier accepts it, then prints the run's
statistics. ``--verifier auto`` is ``greedy`` at temperature 0 and ``exact`` when sampling, both
lossless; a lossy verifier is announced by a note on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from specdec.errors import UsageError
from specdec.options import (DTYPES, TARGET_SUPPLIED, HelpFormatter, check_device, check_kwargs,
                             check_name, finite, first_line, parse_kwargs, registered_class,
                             require, verifier_kwargs_for)

_SUBCOMMANDS = {
    "generate": ("specdec.cli", "generate: speculative generation on one prompt"),
    "eval": ("evals.cli", "eval: speed, acceptance and quality on MT-Bench, GSM8K, HumanEval"),
    "train": ("drafters.train", "train: fit a drafter (medusa, hydra, eagle, ...) to a target"),
}


def load_model(name: str | None, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer): the embedded default, or any HF model id / local path."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, dtype)
    if name in (None, "", "embedded"):
        from specdec.embedded import load_embedded
        return load_embedded(dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    check_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:  # neither a local folder nor a reachable hub model
        raise UsageError(f"cannot load model {name!r}: {first_line(error)}") from None
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def check_model(name: str | None) -> None:
    """A model given as a path (``./m``, ``/m``, ``~/m``) exists."""
    if str(name).startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise UsageError(f"cannot load model {name!r}: no such folder")


def encode_prompt(tokenizer, prompt: str, chat: bool):
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import drafters
    import verifiers

    parser.formatter_class = HelpFormatter
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--model", default="embedded",
                        help="HF model id or path; 'embedded': the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--drafter", default="pld",
                        help=f"one of: {', '.join(drafters.available())}")
    parser.add_argument("--drafter-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument of the drafter, a Python literal or a string "
                             "(repeatable); small-lm takes its draft model as model=ID_OR_PATH")
    parser.add_argument("--verifier", default="auto",
                        help=f"auto (greedy at temperature 0, exact when sampling) or one of: "
                             f"{', '.join(verifiers.available())}")
    parser.add_argument("--verifier-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument of the verifier (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many")
    parser.add_argument("--tree-budget", choices=["auto", "off"], default="off",
                        help="auto: prune each draft tree to the size that maximises expected "
                             "tokens/s under the target's measured latency (measured once, cached)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


@dataclass
class Plan:
    """What ``specdec generate`` builds, checked before the model loads."""

    drafter_kwargs: dict
    verifier: str
    verifier_kwargs: dict
    lossless: bool


def check_settings(args: argparse.Namespace) -> None:
    """Ranges of the numeric settings, the prompt and the device (`UsageError` names the flag)."""
    require([
        ("--prompt", repr(args.prompt), bool(args.prompt), "some text"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
        ("--temperature", args.temperature,
         finite(args.temperature) and args.temperature >= 0, "a finite number >= 0"),
        ("--top-k", args.top_k, args.top_k >= 0, "an integer >= 0 (0: no top-k)"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
    ])
    check_device(args.device)


def plan(args: argparse.Namespace) -> Plan:
    """Every check that needs no model: settings, names, options (`UsageError` on bad input)."""
    import drafters
    import verifiers

    check_settings(args)
    check_model(args.model)
    check_name(args.drafter, drafters.available(), "--drafter")
    verifier = args.verifier
    if verifier == "auto":
        verifier = "greedy" if args.temperature == 0 else "exact"
    check_name(verifier, ["auto", *verifiers.available()], "--verifier")
    drafter_kwargs = parse_kwargs(args.drafter_arg, "--drafter-arg")
    verifier_kwargs = parse_kwargs(args.verifier_arg, "--verifier-arg")
    if args.drafter == "small-lm":
        check_model(drafter_kwargs.get("model"))
    check_kwargs(registered_class(drafters, args.drafter), drafter_kwargs, "--drafter-arg",
                 f"drafter {args.drafter!r}")
    rule = registered_class(verifiers, verifier)
    check_kwargs(rule, verifier_kwargs, "--verifier-arg", f"verifier {verifier!r}",
                 supplied=TARGET_SUPPLIED.get(verifier, ()))
    if getattr(rule, "greedy_only", False) and args.temperature != 0:
        raise UsageError(f"--verifier {verifier} decodes greedily, but --temperature is "
                         f"{args.temperature}: use --verifier auto or exact to sample")
    return Plan(drafter_kwargs, verifier, verifier_kwargs, bool(getattr(rule, "lossless", False)))


def check_context(model, input_ids, max_new_tokens: int) -> None:
    """The prompt plus ``--max-new-tokens`` fit the model's context."""
    from specdec.target import context_length

    context, prompt = context_length(model.config), int(input_ids.shape[1])
    # the last emitted token is never fed back, so it needs no position
    if context is not None and prompt + max_new_tokens - 1 > context:
        if prompt > context:
            raise UsageError(f"--prompt has {prompt} tokens, more than the model's context of "
                             f"{context}: shorten it")
        raise UsageError(f"--max-new-tokens {max_new_tokens}: the prompt has {prompt} tokens and "
                         f"the model's context is {context}: lower --max-new-tokens to at most "
                         f"{context - prompt + 1}")


def build(args: argparse.Namespace, plan: Plan, model):
    """(drafter, verifier) for ``model``; a constructor's refusal becomes a `UsageError`."""
    import drafters
    import verifiers

    drafter_kwargs = dict(plan.drafter_kwargs)
    if args.drafter == "small-lm" and isinstance(drafter_kwargs.get("model"), str):
        drafter_kwargs["model"] = load_model(drafter_kwargs["model"], args.dtype, args.device)[0]
    try:
        drafter = drafters.get(args.drafter, **drafter_kwargs)
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(f"--drafter {args.drafter}: {error}") from None
    try:
        verifier = verifiers.get(plan.verifier,
                                 **verifier_kwargs_for(plan.verifier, plan.verifier_kwargs, model))
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(f"--verifier {plan.verifier}: {error}") from None
    return drafter, verifier


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from specdec.loop import speculative_generate

    chosen = plan(args)
    if not chosen.lossless:
        print(f"specdec generate: note: verifier {chosen.verifier!r} is lossy, so the output is "
              f"not distributed as the target's own sampling", file=sys.stderr)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    input_ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat)
    check_context(model, input_ids, args.max_new_tokens)
    drafter, verifier = build(args, chosen, model)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        out = speculative_generate(
            model, input_ids.to(device), drafter=drafter, verifier=verifier,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None,
            eos_token_id=tokenizer.eos_token_id, generator=generator,
            tree_budget=None if args.tree_budget == "off" else args.tree_budget,
            streamer=streamer,
        )
    except ValueError as error:  # the loop's refusals: a drafter's weights for another target
        raise UsageError(str(error)) from None
    print()
    print(f"drafter {args.drafter}, verifier {chosen.verifier}, temperature {args.temperature}")
    print(out.stats.summary())
    return 0


class Parser(argparse.ArgumentParser):
    """Errors as one line on stderr (``specdec generate: error: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="specdec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        module = modules[name] = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args)
    except UsageError as error:
        print(f"specdec {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"specdec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
