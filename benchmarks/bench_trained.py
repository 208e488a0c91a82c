"""Trained drafters on the embedded model (Medusa, Hydra, Hydra++, the distilled small LM, EAGLE,
EAGLE-2, EAGLE-3, Falcon) beside HF greedy ``generate`` and HF prompt lookup.

A method is a drafter name, optionally with a label after a slash so one drafter can run in
several settings (``eagle3/wide`` with ``--drafter-arg eagle3/wide:max_nodes=64``), or ``hf-pld``
(``generate(prompt_lookup_num_tokens=10)``). ``--drafter-arg NAME:tree_budget=auto`` hands the
loop a cost-aware tree budget instead of passing it to the drafter.

Every method runs in one process beside HF greedy ``generate``, interleaved per prompt, after a
warm-up of each, greedy, ``--max-new-tokens`` new tokens, timing each whole generation (prefill
included). Per data set it prints the median tau (accepted drafts + 1 per step), the acceptance
per tree depth (pooled over the prompts: accepted / reached), the median draft time share, and
the median speedup over HF greedy on the same prompt; every speculative output is checked against
HF greedy's.

    python benchmarks/bench_trained.py --limit 3 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import drafters
from specdec.cli import load_model, parse_kwargs
from specdec.engine.cost import make_budget
from specdec.loop import speculative_generate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ["medusa", "hydra", "hydra++", "distilled", "falcon"]


def prompt_texts(name: str, limit: int, data_dir: Path) -> list[str]:
    if name == "mt_bench":
        with open(data_dir / "mt_bench" / "question.jsonl") as f:
            return [json.loads(line)["turns"][0] for line in f][:limit]
    if name == "gsm8k":
        with open(data_dir / "gsm8k" / "test.jsonl") as f:
            return [json.loads(line)["question"] for line in f][:limit]
    if name == "humaneval":
        with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
            return ["Complete this Python function.\n\n" + json.loads(line)["prompt"]
                    for line in f][:limit]
    raise SystemExit(f"unknown data set {name!r}: mt_bench, gsm8k, humaneval")


def encode(tokenizer, text: str) -> torch.Tensor:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(chat, return_tensors="pt", add_special_tokens=False).input_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--datasets", default="mt_bench,gsm8k,humaneval")
    parser.add_argument("--limit", type=int, default=3, help="prompts per data set")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--drafter-arg", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="keyword argument for one drafter, e.g. medusa:tree=[[0],[1],[0,0]]")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--dtype", default="float32",
                        help="the target's dtype (bfloat16: cheaper tree verification on CPUs with "
                             "native bf16; greedy equality with HF then holds up to bf16 rounding)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids thrashing on a CPU shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, args.dtype)
    methods = args.methods.split(",")
    options: dict[str, list[str]] = {m: [] for m in methods}
    for item in args.drafter_arg:
        name, _, pair = item.partition(":")
        options.setdefault(name, []).append(pair)
    loop_options, built = {}, {}
    for m in methods:
        if m == "hf-pld":
            continue
        kwargs = parse_kwargs(options[m])
        # one budget per method, so its acceptance estimates carry over from prompt to prompt
        loop_options[m] = {"tree_budget": make_budget(kwargs.pop("tree_budget", None), model)}
        built[m] = drafters.get(m.split("/")[0], **kwargs)
    eos = tokenizer.eos_token_id

    def hf_greedy(input_ids):
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=args.max_new_tokens,
                             eos_token_id=eos, pad_token_id=eos)
        return out, time.perf_counter() - start

    def speculative(method, input_ids):
        if method == "hf-pld":
            calls = []
            hook = model.register_forward_hook(lambda *_: calls.append(1))
            start = time.perf_counter()
            try:
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                     do_sample=False, max_new_tokens=args.max_new_tokens,
                                     eos_token_id=eos, pad_token_id=eos, prompt_lookup_num_tokens=10)
            finally:
                hook.remove()
            elapsed = time.perf_counter() - start
            new = out.shape[1] - input_ids.shape[1]
            # one forward of the target per step: tau is new tokens per target forward
            stats = SimpleNamespace(tau=new / max(len(calls), 1), new_tokens=new, draft_time=0.0,
                                    depth_attempts=[], depth_accepts=[], extra={})
            return SimpleNamespace(sequences=out, stats=stats), elapsed
        start = time.perf_counter()
        out = speculative_generate(model, input_ids, drafter=built[method], verifier="greedy",
                                   max_new_tokens=args.max_new_tokens, temperature=0.0,
                                   eos_token_id=eos, generator=torch.Generator().manual_seed(0),
                                   **loop_options[method])
        return out, time.perf_counter() - start

    warm = encode(tokenizer, "Say hello.")
    hf_greedy(warm)
    for method in methods:
        speculative(method, warm)

    results = {}
    for dataset in args.datasets.split(","):
        rows = results[dataset] = {m: [] for m in methods}
        for i, text in enumerate(prompt_texts(dataset, args.limit, args.data_dir)):
            input_ids = encode(tokenizer, text)
            reference, hf_time = hf_greedy(input_ids)
            for method in methods:
                out, elapsed = speculative(method, input_ids)
                stats = out.stats
                rows[method].append({
                    "prompt": i, "hf_time": hf_time, "time": elapsed,
                    "speedup": hf_time / elapsed, "tau": stats.tau,
                    "new_tokens": stats.new_tokens, "draft_share": stats.draft_time / elapsed,
                    "depth_attempts": stats.depth_attempts, "depth_accepts": stats.depth_accepts,
                    "mean_tree": statistics.mean(stats.tree_sizes) if getattr(stats, "tree_sizes", None) else 0.0,
                    "equal": out.sequences.tolist() == reference.tolist(),
                })
            print(f"{dataset} prompt {i}: HF {hf_time:.2f}s | " + " | ".join(
                f"{m} x{rows[m][-1]['speedup']:.2f} tau {rows[m][-1]['tau']:.2f}" for m in methods),
                flush=True)

    print(f"\n| data set | method | tau | acceptance per depth | mean tree | draft share "
          f"| speedup vs HF greedy | equal to HF |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset, rows in results.items():
        for method, runs in rows.items():
            depth = max(len(r["depth_attempts"]) for r in runs) if runs else 0
            reached = [sum(r["depth_attempts"][d] for r in runs if d < len(r["depth_attempts"]))
                       for d in range(depth)]
            accepted = [sum(r["depth_accepts"][d] for r in runs if d < len(r["depth_accepts"]))
                        for d in range(depth)]
            per_depth = " ".join(f"{a / n:.2f}" for a, n in zip(accepted, reached) if n)
            print(f"| {dataset} | {method} | {statistics.median(r['tau'] for r in runs):.2f} "
                  f"| {per_depth} | {statistics.mean(r['mean_tree'] for r in runs):.1f} "
                  f"| {statistics.median(r['draft_share'] for r in runs):.0%} "
                  f"| {statistics.median(r['speedup'] for r in runs):.2f}x "
                  f"| {sum(r['equal'] for r in runs)}/{len(runs)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
