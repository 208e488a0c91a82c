"""Cost-aware tree budget on the embedded model: drafters with and without ``tree_budget="auto"``.

Prints the target's latency profile (verify forward over n tokens after a 256-token context;
read from the cache, measured on the first run or with ``--remeasure``), then runs MT-Bench first
turns with each drafter as drafted and with the budget, beside HF greedy ``generate``, interleaved
per prompt after a warm-up, greedy, ``--max-new-tokens`` new tokens, timing each whole generation
(prefill included). One budget per drafter is reused across prompts (it keeps what it learned).
Per method: median tau, mean kept / drafted nodes per step, median tokens/s and median speedup
over HF greedy on the same prompt; every output is checked against HF greedy's.

    python benchmarks/bench_budget.py --limit 3 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import drafters
from specdec.engine.cost import LatencyProfile, TreeBudget
from specdec.embedded import load_embedded
from specdec.loop import speculative_generate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def mt_bench(tokenizer, limit: int, data_dir: Path) -> list[torch.Tensor]:
    with open(data_dir / "mt_bench" / "question.jsonl") as f:
        texts = [json.loads(line)["turns"][0] for line in f][:limit]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                     tokenize=False, add_generation_prompt=True),
                      return_tensors="pt", add_special_tokens=False).input_ids for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=3, help="MT-Bench prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--drafters", default="trie,medusa")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the latency profile again and replace the cached one")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_embedded()
    eos, n = tokenizer.eos_token_id, args.max_new_tokens
    path, _ = LatencyProfile.cache_path(model)
    if args.remeasure:
        path.unlink(missing_ok=True)
    cached = path.is_file()
    start = time.perf_counter()
    profile = LatencyProfile.for_model(model)
    print(f"latency profile ({'cached' if cached else f'measured in {time.perf_counter() - start:.0f}s'}"
          f", {torch.get_num_threads()} threads; {path}):")
    print("  n tokens: " + " ".join(f"{k:>6}" for k in profile.sizes))
    print("  ms      : " + " ".join(f"{s * 1000:6.1f}" for s in profile.seconds))

    def hf(input_ids):
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos), None

    def ours(drafter, budget):
        def run(input_ids):
            out = speculative_generate(model, input_ids, drafter=drafter, verifier="greedy",
                                       max_new_tokens=n, eos_token_id=eos, tree_budget=budget)
            return out.sequences, out.stats
        return run

    methods = {"hf-greedy": hf}
    for name in args.drafters.split(","):
        drafter = drafters.get(name)
        methods[name] = ours(drafter, None)
        methods[f"{name}+budget"] = ours(drafter, TreeBudget(profile))

    warm = mt_bench(tokenizer, 1, args.data_dir)[0]
    for fn in methods.values():
        fn(warm)

    rows = {name: {"tau": [], "kept": [], "drafted": [], "tps": [], "speedup": [], "bad": 0,
                   "expected_verify": [], "measured_verify": []} for name in methods}
    for index, input_ids in enumerate(mt_bench(tokenizer, args.limit, args.data_dir)):
        results = {}
        for name, fn in methods.items():
            start = time.perf_counter()
            sequences, stats = fn(input_ids)
            results[name] = (sequences, stats, time.perf_counter() - start)
        base, _, base_time = results["hf-greedy"]
        for name, (sequences, stats, seconds) in results.items():
            row = rows[name]
            row["tps"].append((sequences.shape[1] - input_ids.shape[1]) / seconds)
            row["speedup"].append(base_time / seconds)
            row["bad"] += sequences.tolist() != base.tolist()
            if stats is not None:
                row["tau"].append(stats.tau)
                row["kept"].append(sum(stats.tree_sizes) / stats.steps)
                budget = stats.extra.get("tree_budget")
                row["drafted"].append(budget["mean_drafted_nodes"] if budget else row["kept"][-1])
                if budget:
                    row["expected_verify"].append(budget["expected_verify_ms"])
                    row["measured_verify"].append(budget["measured_verify_ms"])
        print(f"prompt {index}: " + ", ".join(f"{name} {results[name][2]:.1f}s" for name in methods),
              flush=True)

    print(f"\nembedded SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, greedy, {n} new "
          f"tokens, {args.limit} MT-Bench first turns, medians over prompts (tree sizes: means)")
    print("| method | tau | nodes kept / drafted per step | tokens/s | speedup vs HF greedy "
          "| verify ms expected / measured | outputs != HF greedy |")
    print("|---|---|---|---|---|---|---|")
    med = statistics.median
    for name, row in rows.items():
        tau = f"{med(row['tau']):.2f}" if row["tau"] else "1.00"
        size = (f"{statistics.mean(row['kept']):.1f} / {statistics.mean(row['drafted']):.1f}"
                if row["kept"] else "-")
        verify = (f"{med(row['expected_verify']):.0f} / {med(row['measured_verify']):.0f}"
                  if row["expected_verify"] else "-")
        print(f"| {name} | {tau} | {size} | {med(row['tps']):.1f} | {med(row['speedup']):.2f}x "
              f"| {verify} | {row['bad']} |")


if __name__ == "__main__":
    main()
