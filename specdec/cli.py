"""The ``specdec`` command line.

    specdec generate --prompt "..." --drafter pld --verifier greedy

Subcommands live in their own modules, each with ``add_arguments(parser)`` and ``run(args)``;
a new one joins by adding a row to ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "generate": ("specdec.cli", "generate: speculative generation on one prompt"),
    "eval": ("evals.cli", "eval: speed, acceptance and quality on MT-Bench, GSM8K, HumanEval"),
    "train": ("drafters.train", "train a drafter (medusa, hydra, hydra++, distilled) on a target"),
}


def load_model(name: str | None, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer): the embedded default, or any HF model id / local path."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if name in (None, "", "embedded"):
        from specdec.embedded import load_embedded
        return load_embedded(dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def parse_kwargs(pairs: list[str]) -> dict:
    """``key=value`` strings -> dict, values parsed as Python literals where possible."""
    import ast

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"option {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = value
    return out


def encode_prompt(tokenizer, prompt: str, chat: bool):
    if not prompt:
        raise SystemExit("--prompt is empty: give some text")
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", default="embedded",
                        help="HF model id or path; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--drafter", default="pld")
    parser.add_argument("--drafter-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for the drafter (repeatable)")
    parser.add_argument("--verifier", default="greedy")
    parser.add_argument("--verifier-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree-budget", choices=["auto"], default=None,
                        help="prune each draft tree to the size that maximises expected tokens/s "
                             "under the target's measured latency (measured once, cached)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    import drafters
    import verifiers
    from specdec.loop import speculative_generate

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    input_ids = encode_prompt(tokenizer, args.prompt, chat=not args.no_chat)
    drafter_kwargs = parse_kwargs(args.drafter_arg)
    if args.drafter == "small-lm" and "model" in drafter_kwargs:
        drafter_kwargs["model"] = load_model(drafter_kwargs["model"], args.dtype, args.device)[0]
    drafter = drafters.get(args.drafter, **drafter_kwargs)
    verifier = verifiers.get(args.verifier, **parse_kwargs(args.verifier_arg))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = speculative_generate(
        model, input_ids.to(device), drafter=drafter, verifier=verifier,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, generator=generator,
        tree_budget=args.tree_budget,
    )
    print(tokenizer.decode(out.new_token_ids, skip_special_tokens=True))
    print()
    stats = out.stats
    print(f"drafter {args.drafter}, verifier {args.verifier}, temperature {args.temperature}")
    print(stats.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        module = modules[name] = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
