"""Summaries of eval records: one row per (dataset, method), a Markdown table, plots.

Every number is a function of the JSON records alone (``OUT/records.jsonl``), so a summary can be
recomputed, or recomputed after more records arrive, without generating anything.

Row fields:

- ``n``: prompts; ``new_tokens``: mean new tokens per prompt; ``wall_time``: median seconds per
  generation (prefill included).
- ``tokens_per_s``: median over prompts of new tokens / wall time.
- ``speedup``: median over prompts of this method's tokens/s divided by the baseline's on the same
  prompt, in the same run (1.0 for the baseline itself; None without a baseline). The median of
  paired ratios keeps one slow outlier generation from deciding the result.
- ``speedup_vs_none``: the same ratio to the method ``none`` (the project's own loop without a
  drafter), which tells the gain of drafting apart from that of the loop's forward; None when
  ``none`` was not run.
- ``tau``: new tokens per step, pooled over prompts (Spec-Bench's mean accepted length; for the
  Hugging Face methods a step is a target forward, so the baseline has tau 1).
- ``acceptance_per_depth``: pooled P(draft at depth d accepted | the tree reached depth d); only
  for the project's drafters.
- ``identical``: at temperature 0, the fraction of prompts whose output token ids equal the
  baseline's (must be 1.0 for lossless methods); None when sampling or without a baseline.
- ``dataset``: the dataset's name (a question file's stem, with parent folders where two files
  or a builtin would share it); ``source``: a question file's resolved path, which identifies it.
- ``accuracy`` (GSM8K exact match) and ``pass_at_1`` (HumanEval), for every method, baseline
  included; None for datasets without a metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median
from typing import Sequence

from evals.datasets import dataset_key, display_names

BASELINE = "baseline"
UNDRAFTED = "none"
PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install matplotlib)"


def _pooled_acceptance(records: list[dict]) -> list[float] | None:
    if any(r["depth_attempts"] is None for r in records):
        return None
    depth = max((len(r["depth_attempts"]) for r in records), default=0)
    attempts, accepts = [0] * depth, [0] * depth
    for record in records:
        # depth_accepts stops at the deepest accepted draft, depth_attempts at the deepest tree
        for d, count in enumerate(record["depth_attempts"]):
            attempts[d] += count
        for d, count in enumerate(record["depth_accepts"]):
            accepts[d] += count
    return [a / n if n else 0.0 for a, n in zip(accepts, attempts)]


def _fraction(values: list[bool | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(bool(v) for v in values) / len(values)


def _paired_speedup(group: list[dict], reference: list[dict]) -> float | None:
    by_id = {r["id"]: r for r in reference}
    ratios = [r["tokens_per_s"] / by_id[r["id"]]["tokens_per_s"] for r in group if r["id"] in by_id]
    return median(ratios) if ratios else None


def _identical(group: list[dict], reference: list[dict]) -> float | None:
    by_id = {r["id"]: r for r in reference}
    paired = [(r, by_id[r["id"]]) for r in group if r["id"] in by_id]
    if not paired:
        return None
    return sum(r["output_ids"] == b["output_ids"] for r, b in paired) / len(paired)


def _names(records: Sequence[dict]) -> dict[str, str]:
    """Dataset identity -> the name rows show (question files told apart by their folders)."""
    sources = list(dict.fromkeys(r["source"] for r in records if r.get("source")))
    files = display_names(sources)
    return {dataset_key(r["dataset"], r.get("source")): files.get(r.get("source"), r["dataset"])
            for r in records}


def summarize(records: Sequence[dict], temperature: float = 0.0,
              baseline: str = BASELINE) -> list[dict]:
    """One row per (dataset, method), in the order the records first name them."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        key = dataset_key(record["dataset"], record.get("source"))
        groups.setdefault((key, record["method"]), []).append(record)
    names = _names(records)
    rows = []
    for (key, method), group in groups.items():
        reference = groups.get((key, baseline), [])
        dataset = names[key]
        steps = sum(r["steps"] for r in group)
        correct = [r["correct"] for r in group]
        rows.append({
            "dataset": dataset,
            "source": group[0].get("source"),
            "method": method,
            "lossless": all(r["lossless"] for r in group),
            "n": len(group),
            "new_tokens": sum(r["new_tokens"] for r in group) / len(group),
            "wall_time": median(r["wall_time"] for r in group),
            "tokens_per_s": median(r["tokens_per_s"] for r in group),
            "speedup": _paired_speedup(group, reference),
            "speedup_vs_none": _paired_speedup(group, groups.get((key, UNDRAFTED), [])),
            "tau": sum(r["new_tokens"] for r in group) / steps if steps else None,
            "acceptance_per_depth": _pooled_acceptance(group),
            "identical": _identical(group, reference) if temperature == 0 else None,
            "accuracy": _fraction(correct) if key == "gsm8k" else None,
            "pass_at_1": _fraction(correct) if key == "humaneval" else None,
        })
    return rows


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _quality(row: dict) -> str:
    if row["accuracy"] is not None:
        return f"accuracy {row['accuracy']:.2f}"
    if row["pass_at_1"] is not None:
        return f"pass@1 {row['pass_at_1']:.2f}"
    return "-"


def markdown(rows: Sequence[dict], title: str | None = None) -> str:
    """The rows as a Markdown table; a "speedup vs none" column when ``none`` was run."""
    vs_none = any(row.get("speedup_vs_none") is not None for row in rows)
    header = ["dataset", "method", "lossless", "n", "new tokens", "tokens/s", "speedup",
              *(["speedup vs none"] if vs_none else []), "tau", "identical", "quality"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["dataset"], row["method"], "yes" if row["lossless"] else "no", str(row["n"]),
                 _cell(row["new_tokens"], 1), _cell(row["tokens_per_s"], 1),
                 _ratio(row["speedup"]),
                 *([_ratio(row.get("speedup_vs_none"))] if vs_none else []),
                 _cell(row["tau"]), _cell(row["identical"]), _quality(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """``speedup_tau.png`` (per method and dataset) and ``acceptance_by_depth.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_key = {(r["dataset"], r["method"]): r for r in rows}
    width = 0.8 / max(len(datasets), 1)

    figure, axes = plt.subplots(2, 1, figsize=(max(7, 0.8 * len(methods)), 8))
    for axis, field, label in ((axes[0], "speedup", "speedup vs baseline (median)"),
                               (axes[1], "tau", "tau (tokens per step)")):
        for i, dataset in enumerate(datasets):
            values = [by_key.get((dataset, m), {}).get(field) or 0.0 for m in methods]
            axis.bar([j + i * width for j in range(len(methods))], values, width, label=dataset)
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xticks([j + width * (len(datasets) - 1) / 2 for j in range(len(methods))])
        axis.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    speed_path = out_dir / "speedup_tau.png"
    figure.savefig(speed_path, dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.8),
                                squeeze=False, sharey=True)
    for axis, dataset in zip(axes[0], datasets):
        for method in methods:
            curve = by_key.get((dataset, method), {}).get("acceptance_per_depth")
            if curve:
                axis.plot(range(1, len(curve) + 1), curve, marker="o", label=method)
        axis.set_title(dataset)
        axis.set_xlabel("draft depth")
        axis.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("acceptance rate")
    legend = {}  # label -> handle, over every panel (a method may only appear in some)
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        handles, labels = list(legend.values()), list(legend)
        figure.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(4, len(labels)),
                      bbox_to_anchor=(0.5, -0.02))
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    depth_path = out_dir / "acceptance_by_depth.png"
    figure.savefig(depth_path, dpi=110)
    plt.close(figure)
    return [speed_path, depth_path]


def plot_if_available(rows: Sequence[dict], out_dir: str | Path) -> list[Path] | None:
    """`plot`, or None when matplotlib is not installed (the summaries do not need it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return plot(rows, out_dir)


def write_reports(records: Sequence[dict], out_dir: str | Path, temperature: float = 0.0,
                  title: str | None = None, plots: bool = True) -> list[dict]:
    """``summary.json``, ``summary.md`` and (with ``plots``, where matplotlib is installed) the
    plots in ``out_dir``; returns the rows."""
    out_dir = Path(out_dir)
    rows = summarize(records, temperature)
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(markdown(rows, title), encoding="utf-8")
    if plots:
        plot_if_available(rows, out_dir)
    return rows
