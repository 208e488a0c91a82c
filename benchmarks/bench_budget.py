"""Cost-aware tree budget on the embedded model: drafters with and without ``tree_budget=auto``.

Prints the target's latency profile (verify forward over n tokens after a 256-token context; read
from the cache, measured on the first run or with ``--remeasure``), then runs each method beside
HF greedy ``generate`` and the undrafted loop through the eval runner (`benchmarks/_harness.py`:
the eval's prompts, warm-up, methods interleaved per prompt, each whole generation timed). A
method's budget is built once and reused across prompts (it keeps what it learned). Per method:
tau, mean kept / drafted nodes per step, the budget's expected and measured verify milliseconds,
the median speedups over HF ``generate`` and over the undrafted loop, and the share of outputs
equal to HF greedy's.

    python benchmarks/bench_budget.py --limit 3 --max-new-tokens 128
    python benchmarks/bench_budget.py --methods eagle2,eagle2:tree_budget=auto --data benchmarks/data/summarize.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import _harness as harness  # this folder is on sys.path when run as a script


def show_profile(model, remeasure: bool) -> None:
    import torch

    from specdec.engine.cost import LatencyProfile

    path, _ = LatencyProfile.cache_path(model)
    if remeasure:
        path.unlink(missing_ok=True)
    cached = path.is_file()
    start = time.perf_counter()
    profile = LatencyProfile.for_model(model)
    how = "cached" if cached else f"measured in {time.perf_counter() - start:.0f}s"
    print(f"latency profile ({how}, {torch.get_num_threads()} threads; {path}):")
    print("  n tokens: " + " ".join(f"{k:>6}" for k in profile.sizes))
    print("  ms      : " + " ".join(f"{s * 1000:6.1f}" for s in profile.seconds))


def budget_fields(row: dict) -> dict:
    """Mean nodes kept / drafted per step and median verify ms expected / measured."""
    loops = [r["loop"] for r in row["records"] if r["loop"] is not None]
    budgets = [loop["tree_budget"] for loop in loops if loop["tree_budget"]]
    kept = [statistics.mean(loop["tree_sizes"]) for loop in loops if loop["tree_sizes"]]
    drafted = [b["mean_drafted_nodes"] for b in budgets] if budgets else kept
    measured = [b["measured_verify_ms"] for b in budgets if b["measured_verify_ms"] is not None]
    mean = lambda values: statistics.mean(values) if values else None  # noqa: E731
    middle = lambda values: statistics.median(values) if values else None  # noqa: E731
    return {"kept_nodes": mean(kept), "drafted_nodes": mean(drafted),
            "expected_verify_ms": middle([b["expected_verify_ms"] for b in budgets]),
            "measured_verify_ms": middle(measured)}


def with_budget_fields(rows: list[dict]) -> list[dict]:
    for row in rows:
        row.update(budget_fields(row))
    return rows


def pair(row: dict, first: str, second: str, digits: int) -> str:
    if row[first] is None:
        return "-"
    return f"{harness.number(row[first], digits)} / {harness.number(row[second], digits)}"


COLUMNS = [("nodes kept / drafted per step", lambda r: pair(r, "kept_nodes", "drafted_nodes", 1)),
           ("verify ms expected / measured",
            lambda r: pair(r, "expected_verify_ms", "measured_verify_ms", 0))]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, methods="trie,trie:tree_budget=auto,medusa,"
                                          "medusa:tree_budget=auto", datasets="mt_bench", limit=3)
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the latency profile again and replace the cached one")
    args = parser.parse_args(argv)
    return harness.benchmark(args, COLUMNS, setup=lambda model: show_profile(model, args.remeasure),
                             finish=with_budget_fields)


if __name__ == "__main__":
    harness.main(main)
