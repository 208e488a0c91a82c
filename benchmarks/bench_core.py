"""Core benchmark: HF greedy, HF prompt lookup, and specdec's PLD and n-gram trie.

All methods run in one process on the embedded model (or --model), interleaved per prompt after a
warm-up, greedy, timing each whole generation (prefill included). Prints per-set medians of
tokens/s and the ratio of each method to HF greedy measured on the same prompts, and checks that
every speculative output equals HF greedy's.

    python benchmarks/bench_core.py --limit 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch

import drafters
from specdec.cli import load_model, parse_kwargs
from specdec.loop import speculative_generate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def prompts(tokenizer, name: str, limit: int, data_dir: Path) -> list[torch.Tensor]:
    if name == "mt_bench":
        with open(data_dir / "mt_bench" / "question.jsonl") as f:
            texts = [json.loads(line)["turns"][0] for line in f][:limit]
        return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                         tokenize=False, add_generation_prompt=True),
                          return_tensors="pt", add_special_tokens=False).input_ids for t in texts]
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["prompt"] for line in f][:limit]
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--datasets", default="mt_bench,humaneval")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--pld-tokens", type=int, default=10,
                        help="prompt_lookup_num_tokens for HF and num_draft_tokens for ours")
    parser.add_argument("--trie-arg", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    n = args.max_new_tokens

    def hf(input_ids, **extra):
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos, **extra)

    def ours(drafter):
        return lambda ids: speculative_generate(model, ids, drafter=drafter, verifier="greedy",
                                                max_new_tokens=n, eos_token_id=eos).sequences

    methods = {
        "hf-greedy": hf,
        "hf-pld": lambda ids: hf(ids, prompt_lookup_num_tokens=args.pld_tokens),
        "pld": ours(drafters.get("pld", num_draft_tokens=args.pld_tokens)),
        "trie": ours(drafters.get("trie", **parse_kwargs(args.trie_arg))),
    }
    warm = prompts(tokenizer, "mt_bench", 1, args.data_dir)[0].to(device)
    for fn in methods.values():
        fn(warm)

    rows = []
    for dataset in args.datasets.split(","):
        speed = {name: [] for name in methods}
        ratio = {name: [] for name in methods}
        mismatches = {name: 0 for name in methods}
        for index, input_ids in enumerate(prompts(tokenizer, dataset, args.limit, args.data_dir)):
            input_ids = input_ids.to(device)
            results = {}
            for name, fn in methods.items():
                out, seconds = timed(lambda: fn(input_ids), device)
                results[name] = (out, seconds)
            base_out, base_time = results["hf-greedy"]
            for name, (out, seconds) in results.items():
                new = out.shape[1] - input_ids.shape[1]
                speed[name].append(new / seconds)
                ratio[name].append(base_time / seconds)
                mismatches[name] += out.tolist() != base_out.tolist()
            print(f"{dataset} prompt {index}: " + ", ".join(
                f"{name} {results[name][1]:.2f}s" for name in methods), flush=True)
        for name in methods:
            rows.append((dataset, name, statistics.median(speed[name]),
                         statistics.median(ratio[name]), mismatches[name]))
        print(f"done {dataset}", flush=True)

    print(f"\nmodel {args.model}, device {device}, greedy, {n} new tokens, "
          f"{args.limit} prompts per set, medians over prompts")
    print("| dataset | method | tokens/s | speedup vs HF greedy | outputs != HF greedy |")
    print("|---|---|---|---|---|")
    for dataset, name, tps, speedup, bad in rows:
        print(f"| {dataset} | {name} | {tps:.1f} | {speedup:.2f}x | {bad} |")


if __name__ == "__main__":
    main()
