"""One drafter in several settings, on the embedded model, beside HF greedy ``generate`` and the
undrafted loop, interleaved per prompt.

The settings are eval method specs (``eagle2:min_value=0.0,eagle2:min_value=0.05``; add
``tree_budget=auto`` for a cost-aware tree budget per setting). Every method runs through the eval
runner (`benchmarks/_harness.py`). Besides tau and the two speedups it prints per setting the
median over prompts of its time relative to the first setting's on the same prompt, the draft
share of the time and the draft milliseconds per step, and the share of outputs equal to the first
setting's (all lossless at temperature 0, so they must be equal).

    python benchmarks/bench_settings.py --methods 'eagle2:tree_budget=auto,eagle2:min_value=0.0,tree_budget=auto' --limit 4
"""

from __future__ import annotations

import argparse
import statistics

import _harness as harness  # this folder is on sys.path when run as a script


def draft_ms(record: dict) -> float | None:
    loop = record["loop"]
    if loop is None:
        return None
    return 1000 * loop["draft_time"] / max(1, len(loop["tree_sizes"]))


def against_first(rows: list[dict], first: str) -> list[dict]:
    """Adds ``time_vs_first`` and ``equal_to_first`` (paired by prompt) to every row."""
    reference = {(r["dataset"], r["id"]): r for row in rows if row["method"] == first
                 for r in row["records"]}
    for row in rows:
        pairs = [(r, reference[r["dataset"], r["id"]]) for r in row["records"]
                 if (r["dataset"], r["id"]) in reference]
        row["time_vs_first"] = statistics.median(r["wall_time"] / f["wall_time"]
                                                 for r, f in pairs) if pairs else None
        row["equal_to_first"] = (sum(r["output_ids"] == f["output_ids"] for r, f in pairs)
                                 / len(pairs)) if pairs else None
    return rows


COLUMNS = [("time vs first", lambda r: harness.number(r["time_vs_first"], 3)),
           harness.DRAFT_SHARE,
           ("draft ms/step", lambda r: harness.number(harness.median_of(r, draft_ms), 1)),
           ("equal to first", lambda r: harness.number(r["equal_to_first"]))]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, methods="eagle2:tree_budget=auto,"
                                          "eagle2:min_value=0.0,tree_budget=auto",
                          datasets="mt_bench", limit=4)
    args = parser.parse_args(argv)
    specs, _ = harness.check(args)
    settings = [spec.label for spec in specs if spec.label not in harness.REFERENCES]
    if not settings:
        raise harness.UsageError("--methods names no setting besides baseline and none")
    print(f"time and outputs against the first setting, {settings[0]}")
    return harness.benchmark(args, COLUMNS, finish=lambda rows: against_first(rows, settings[0]))


if __name__ == "__main__":
    harness.main(main)
