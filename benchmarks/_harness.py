"""The harness every benchmark script shares: the eval's data sets, prompt wording, methods, timing.

Prompts are `evals.datasets` examples (MT-Bench, GSM8K, HumanEval, or any Spec-Bench style
``--data`` file such as ``benchmarks/data/summarize.jsonl``) encoded with
`evals.datasets.chat_input_ids`, so a benchmark and ``specdec eval`` time the same token ids.
Methods are `evals.methods` specs (``eagle2,hydra:tree_budget=auto,pld+exact``) and generations
run through `evals.runner.run_eval`: every method warmed up first, methods interleaved per prompt,
each call timed as a whole (prefill included, after a CUDA synchronize on GPU).

Two references always run in the same pass: ``baseline`` (Hugging Face ``generate``) and ``none``
(the project's own loop with no drafts: the same target forward, one token per step). Every row
reports the method's speed against both, as in `evals.report`: the median over prompts of the
method's tokens/s divided by the reference's on the same prompt. The ratio to ``baseline`` is what
a user of ``generate`` gains; the ratio to ``none`` isolates what drafting buys inside the loop.

Records (``records.jsonl``, resumable) go to ``--out`` (a temporary folder without it); a record of
the project's loop carries the loop's statistics beyond its step counts (draft time, tree sizes,
tree-budget choices) as ``record["loop"]``, from the generation's `evals.methods.Generation.stats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from evals import cli as eval_cli
from evals import datasets as eval_datasets
from evals import methods as eval_methods
from evals.methods import Method, MethodSpec, SamplingSettings, parse_method, parse_methods
from evals.report import summarize
from evals.runner import process_state, run_config, run_eval
from specdec.errors import UsageError

REFERENCES = ("baseline", "none")
BENCHMARKS = Path(__file__).resolve().parent
LONG_PROMPTS = BENCHMARKS / "data" / "summarize.jsonl"
SHARED_DATA = BENCHMARKS.parents[1] / "shared" / "data"


# ------------------------------------------------------------------------------------ arguments
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded",
                        help="HF model id or path; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids thrashing on a CPU shared with other jobs)")


def add_arguments(parser: argparse.ArgumentParser, *, methods: str, datasets: str,
                  limit: int = 3, max_new_tokens: int = 128) -> None:
    """The options every timing script takes, with the script's own defaults."""
    parser.add_argument("--methods", default=methods,
                        help="comma-separated method specs as in specdec eval, e.g. "
                             "'eagle2,hydra:tree_budget=auto,pld+exact'; baseline (HF generate) "
                             f"and none (the undrafted loop) always run (default: {methods})")
    parser.add_argument("--datasets", default=None,
                        help=f"comma-separated: {', '.join(eval_datasets.BUILTIN)} or paths of "
                             f"Spec-Bench style .jsonl files (default: {datasets}, or only the "
                             f"--data files when given)")
    parser.set_defaults(default_datasets=datasets)
    parser.add_argument("--data", action="append", default=[], metavar="FILE",
                        help="a Spec-Bench style question file, e.g. "
                             "benchmarks/data/summarize.jsonl (long prompts); repeatable")
    parser.add_argument("--data-dir", default=None,
                        help="offline data folder (mt_bench/, gsm8k/, humaneval/); default "
                             "$SPECDEC_DATA_DIR, else ../shared/data when present, else the hub")
    parser.add_argument("--limit", type=int, default=limit, help="prompts per data set (first N)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser)
    parser.add_argument("--draft-model", default=None,
                        help="draft model of small-lm and hf-assisted (default: the target's "
                             "checkpoint)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=1,
                        help="unrecorded warm-up generations per method before timing")
    parser.add_argument("--out", default=None,
                        help="folder for the records (resumed if it exists; default: temporary)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the summary rows and records here")


def data_dir(args) -> str | None:
    if args.data_dir:
        return args.data_dir
    if os.environ.get("SPECDEC_DATA_DIR"):
        return os.environ["SPECDEC_DATA_DIR"]
    return str(SHARED_DATA) if SHARED_DATA.is_dir() else None


def dataset_names(args) -> list[str]:
    """``--datasets`` (the script's default when neither it nor ``--data`` is given) + ``--data``."""
    text = args.datasets if args.datasets is not None else (
        "" if args.data else args.default_datasets)
    return [name.strip() for name in text.split(",") if name.strip()] + list(args.data)


def load_examples(args) -> list[eval_datasets.Example]:
    """The first ``--limit`` examples of every data set, as ``specdec eval`` reads them."""
    if args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    names = dataset_names(args)
    if not names:
        raise UsageError("no data sets: give --datasets or --data")
    # every name as a --data entry: the eval tells the builtins from question files itself
    return eval_cli.load_examples(argparse.Namespace(datasets=None, data=names,
                                                     data_dir=data_dir(args), limit=args.limit))


def method_specs(text: str) -> list[MethodSpec]:
    """The specs of ``text`` after the two references (added when not listed)."""
    try:
        specs = parse_methods(text)
    except ValueError as error:
        raise UsageError(str(error)) from None
    listed = {spec.label for spec in specs}
    return [parse_method(name) for name in REFERENCES if name not in listed] + specs


def check(args) -> tuple[list[MethodSpec], list[eval_datasets.Example]]:
    """Methods and examples, checked before any model loads."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    return method_specs(args.methods), load_examples(args)


def input_ids(tokenizer, example: eval_datasets.Example):
    """[1, L] token ids of one example, exactly as the eval runner encodes it."""
    return eval_datasets.chat_input_ids(tokenizer, example.prompt)


# ------------------------------------------------------------------------------------- models
def set_threads(args) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


def load_model(args):
    """(model, tokenizer) of ``--model`` in ``--dtype`` on ``--device``."""
    from specdec.cli import load_model as load

    set_threads(args)
    return load(args.model, getattr(args, "dtype", "float32"), getattr(args, "device", None))


def top_k(args) -> int | None:
    """``--top-k`` of the scripts that sample (0 or absent: the full vocabulary)."""
    return getattr(args, "top_k", None) or None


def sampling(args) -> SamplingSettings:
    return SamplingSettings(args.temperature, top_k(args), None, args.seed)


def build_methods(args, specs: Sequence[MethodSpec], model, tokenizer) -> list[Method]:
    """The eval's methods of ``specs`` (`evals.methods.build_methods`, as ``specdec eval``)."""
    from specdec.cli import load_model as load

    def load_draft_model():
        return load(args.draft_model or args.model, args.dtype, args.device)[0]

    return eval_methods.build_methods(specs, model, tokenizer, sampling(args),
                                      load_draft_model=load_draft_model)


# ---------------------------------------------------------------------------------------- runs
def generate(args, model, tokenizer, methods: Sequence[Method],
             examples: Sequence[eval_datasets.Example]) -> list[dict]:
    """Records of every (example, method), run by the eval runner; ``record["loop"]`` holds the
    loop's statistics (None for the Hugging Face methods)."""
    with tempfile.TemporaryDirectory(prefix="specdec-bench-") as scratch:
        try:
            records = run_eval(model, tokenizer, examples, methods, args.out or scratch,
                               max_new_tokens=args.max_new_tokens,
                               config=run_config(args, sampling(args)), warmup=args.warmup,
                               execute=False, state=process_state(args.device))
        except ValueError as error:
            raise UsageError(str(error)) from None
    for record in records:
        record.setdefault("loop", None)  # a record of an --out written without them
    return records


def groups(records: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records by (dataset, method), in the order they first appear."""
    out: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        out.setdefault((record["dataset"], record["method"]), []).append(record)
    return out


def summary(records: Sequence[dict], temperature: float = 0.0) -> list[dict]:
    """`evals.report.summarize` rows with both ratios: ``speedup_vs_baseline`` (HF ``generate``)
    and ``speedup_vs_none`` (the undrafted loop); ``records`` of each row under ``records``."""
    vs_none = {(row["dataset"], row["method"]): row["speedup"]
               for row in summarize(records, temperature, baseline="none")}
    by_row = groups(records)
    rows = summarize(records, temperature, baseline="baseline")
    for row in rows:
        key = (row["dataset"], row["method"])
        row["speedup_vs_baseline"] = row.pop("speedup")
        row["speedup_vs_none"] = vs_none[key]
        row["records"] = by_row[key]
    return rows


def median_of(row: dict, value: Callable[[dict], float | None]) -> float | None:
    """The median of ``value(record)`` over the row's records where it is not None."""
    values = [v for v in map(value, row["records"]) if v is not None]
    return statistics.median(values) if values else None


def draft_share(record: dict) -> float | None:
    loop = record["loop"]
    return None if loop is None else loop["draft_time"] / record["wall_time"]


# -------------------------------------------------------------------------------------- output
def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


Column = tuple[str, Callable[[dict], str]]

LEADING: list[Column] = [("dataset", lambda r: r["dataset"]), ("method", lambda r: r["method"]),
                         ("n", lambda r: str(r["n"])),
                         ("tokens/s", lambda r: number(r["tokens_per_s"], 1)),
                         ("tau", lambda r: number(r["tau"]))]
DRAFT_SHARE: Column = ("draft share", lambda r: percent(median_of(r, draft_share)))
TRAILING: list[Column] = [("speedup vs baseline", lambda r: ratio(r["speedup_vs_baseline"])),
                          ("speedup vs none", lambda r: ratio(r["speedup_vs_none"])),
                          ("identical to baseline", lambda r: number(r["identical"]))]


def table(rows: Sequence[dict], columns: Sequence[Column] = ()) -> str:
    """Markdown: the common columns around the script's own ``columns``."""
    columns = LEADING + list(columns) + TRAILING
    lines = ["| " + " | ".join(name for name, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def caption(args, examples: Sequence[eval_datasets.Example]) -> str:
    import torch

    sets = ", ".join(dict.fromkeys(example.dataset for example in examples))
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    return (f"model {args.model}, {sampling}, {args.max_new_tokens} new tokens, {sets}, "
            f"{args.limit} prompts per set, {torch.get_num_threads()} threads; speedups: median "
            f"over prompts of tokens/s against baseline (HF generate) and none (undrafted loop) "
            f"on the same prompt, interleaved, after {args.warmup} warm-up per method")


def write_json(path: Path | None, rows: Sequence[dict], **extra) -> None:
    if path is not None:
        path.write_text(json.dumps({"rows": list(rows), **extra}, indent=1) + "\n",
                        encoding="utf-8")


def benchmark(args, columns: Sequence[Column] = (),
              setup: Callable[[object], None] | None = None,
              finish: Callable[[list[dict]], list[dict]] | None = None) -> list[dict]:
    """Check, load, run and print: the whole of a timing script; returns the summary rows.
    ``setup(model)`` runs once the model is loaded, before the methods are built;
    ``finish(rows)`` adds the script's own fields to the rows before they are printed."""
    specs, examples = check(args)
    model, tokenizer = load_model(args)
    if setup is not None:
        setup(model)
    methods = build_methods(args, specs, model, tokenizer)
    rows = summary(generate(args, model, tokenizer, methods, examples), args.temperature)
    if finish is not None:
        rows = finish(rows)
    print(caption(args, examples))
    print(table(rows, columns), flush=True)
    write_json(args.json, rows)
    return rows


def main(run: Callable[[list[str] | None], object]) -> None:
    """Run a script's ``main``; bad input prints one line and exits with status 2."""
    try:
        run(None)
    except UsageError as error:
        print(f"{Path(sys.argv[0]).name}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
