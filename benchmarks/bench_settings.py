"""One drafter in several settings, on the embedded model, interleaved per prompt.

Each setting gets its own drafter and (with ``--budget``) its own cost-aware tree budget; every
prompt runs every setting in turn after a warm-up of each, greedy, ``--max-new-tokens`` tokens.
Prints per setting the median over prompts of: its time relative to the first setting's on the
same prompt, tau, the draft share of the time and the draft milliseconds per step, and checks
every output against the first setting's (all greedy and lossless, so they must be equal).

    python benchmarks/bench_settings.py eagle2 '[{"min_value": 0.0}, {"min_value": 0.05}]' --limit 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import drafters
from bench_trained import DATA, encode, prompt_texts  # this folder is on sys.path as a script
from specdec.cli import load_model
from specdec.engine.cost import make_budget
from specdec.loop import speculative_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafter")
    parser.add_argument("settings", help="a JSON list of keyword-argument objects, one per setting")
    parser.add_argument("--dataset", default="mt_bench")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--budget", action=argparse.BooleanOptionalAction, default=True,
                        help="tree_budget='auto' per setting (default on)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as error:
        raise SystemExit(f"settings must be a JSON list of objects: {error}")
    if not isinstance(settings, list) or not settings or not all(isinstance(s, dict) for s in settings):
        raise SystemExit('settings must be a non-empty JSON list of objects, e.g. \'[{}, {"beam": 4}]\'')
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, "float32")
    built = [(drafters.get(args.drafter, **s), make_budget("auto", model) if args.budget else None)
             for s in settings]
    prompts = [encode(tokenizer, t) for t in prompt_texts(args.dataset, args.limit, DATA)]

    def run(drafter, budget, ids):
        start = time.perf_counter()
        out = speculative_generate(model, ids, drafter=drafter, verifier="greedy",
                                   max_new_tokens=args.max_new_tokens, temperature=0.0,
                                   eos_token_id=tokenizer.eos_token_id, tree_budget=budget)
        return out, time.perf_counter() - start

    for drafter, budget in built:
        run(drafter, budget, encode(tokenizer, "Say hello."))
    rows = [[] for _ in settings]
    for ids in prompts:
        first = None
        for i, (drafter, budget) in enumerate(built):
            out, elapsed = run(drafter, budget, ids)
            steps = max(1, len(out.stats.tree_sizes))
            first = out.sequences.tolist() if first is None else first
            rows[i].append({"time": elapsed, "tau": out.stats.tau,
                            "share": out.stats.draft_time / elapsed,
                            "draft_ms": 1000 * out.stats.draft_time / steps,
                            "equal": out.sequences.tolist() == first})
    print(f"{args.drafter} on {args.dataset}, {len(prompts)} prompts, {args.max_new_tokens} tokens, "
          f"budget {'auto' if args.budget else 'off'}, {args.threads} threads")
    print("| setting | time vs first | tau | draft share | draft ms/step | outputs equal |")
    print("|---|---|---|---|---|---|")
    base = [r["time"] for r in rows[0]]
    for setting, runs in zip(settings, rows):
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        relative = statistics.median(r["time"] / b for r, b in zip(runs, base))
        print(f"| {json.dumps(setting)} | {relative:.3f} | {med('tau'):.2f} | {med('share'):.0%} "
              f"| {med('draft_ms'):.1f} | {sum(r['equal'] for r in runs)}/{len(runs)} |")


if __name__ == "__main__":
    main()
