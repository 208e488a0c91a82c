"""Trained drafters on the embedded model (Medusa, Hydra, Hydra++, the distilled small LM, EAGLE,
EAGLE-2, EAGLE-3, Falcon) beside HF greedy ``generate`` and the undrafted loop.

Methods are eval specs, so one drafter runs in several settings by its options
(``eagle3,eagle3:max_nodes=64``) and ``tree_budget=auto`` hands the loop a cost-aware tree budget
(``hydra:tree_budget=auto``); ``hf-pld`` and the other eval methods work too. Every method runs
through the eval runner (`benchmarks/_harness.py`): the eval's prompts, warm-up, methods
interleaved per prompt, each whole generation timed (prefill included). Per data set it prints
tau (accepted drafts + 1 per step, pooled), the acceptance per tree depth (pooled over the prompts:
accepted / reached), the mean tree size, the median draft share of the time, the median speedup
over HF ``generate`` and over the undrafted loop on the same prompts, and the share of outputs
equal to HF greedy's.

    python benchmarks/bench_trained.py --limit 3 --max-new-tokens 128
    python benchmarks/bench_trained.py --methods eagle2,eagle2:tree_budget=auto --data benchmarks/data/summarize.jsonl
"""

from __future__ import annotations

import argparse
import statistics

import _harness as harness  # this folder is on sys.path when run as a script

METHODS = "medusa,hydra,hydra++,distilled,falcon"


def per_depth(row: dict) -> str:
    return " ".join(f"{p:.2f}" for p in row["acceptance_per_depth"] or [])


def mean_tree(row: dict) -> str:
    """Drafted nodes per step, averaged over the prompts' means."""
    sizes = [statistics.mean(r["loop"]["tree_sizes"]) for r in row["records"]
             if r["loop"] and r["loop"]["tree_sizes"]]
    return harness.number(statistics.mean(sizes), 1) if sizes else "-"


COLUMNS = [("acceptance per depth", per_depth), ("mean tree", mean_tree), harness.DRAFT_SHARE]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, methods=METHODS, datasets="mt_bench,gsm8k,humaneval", limit=3)
    return harness.benchmark(parser.parse_args(argv), COLUMNS)


if __name__ == "__main__":
    harness.main(main)
