"""Core benchmark: Hugging Face prompt lookup and the project's model-free drafters (PLD, n-gram
trie) beside HF greedy ``generate`` and the undrafted loop.

Every method runs through the eval runner (`benchmarks/_harness.py`): the eval's prompts, one
process, warm-up, methods interleaved per prompt, each whole generation timed (prefill included).
Prints per data set the median tokens/s, tau, the median speedup over HF ``generate``
(``baseline``) and over the undrafted loop (``none``) on the same prompts, and the share of prompts
whose output equals HF greedy's (1.00 for every lossless method).

    python benchmarks/bench_core.py --limit 10 --max-new-tokens 128
    python benchmarks/bench_core.py --methods 'hf-pld:prompt_lookup_num_tokens=5,pld,trie:node_budget=24'
    python benchmarks/bench_core.py --data benchmarks/data/summarize.jsonl --limit 5
"""

from __future__ import annotations

import argparse

import _harness as harness  # this folder is on sys.path when run as a script


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, methods="hf-pld,pld,trie", datasets="mt_bench,humaneval",
                          limit=10)
    return harness.benchmark(parser.parse_args(argv))


if __name__ == "__main__":
    harness.main(main)
