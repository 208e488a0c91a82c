"""``specdec eval``: speed, acceptance and quality of decoding methods (MT-Bench, GSM8K, HumanEval).

    specdec eval --datasets mt_bench,gsm8k,humaneval --methods baseline,hf-pld,pld,trie \\
        --limit 5 --max-new-tokens 128 --data-dir ../shared/data --out eval-embedded

Data-parallel over GPUs with ``accelerate launch -m specdec.cli eval ...``, over CPU processes with
``torchrun --nproc_per_node N -m specdec.cli eval ...``.
Method specs: see `evals.methods`; outputs: see `evals.runner` and `evals.report`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evals import datasets as eval_datasets
from specdec import options
from specdec.errors import UsageError
from specdec.options import DTYPES

DEFAULT_METHODS = "baseline,hf-pld,pld,trie"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", default=None,
                        help=f"comma-separated: {', '.join(eval_datasets.BUILTIN)} or paths of "
                             f"Spec-Bench style .jsonl files (default: all three builtins, or "
                             f"only the --data files when given)")
    parser.add_argument("--data", action="append", default=[], metavar="FILE",
                        help="a Spec-Bench style question file (question_id, category, turns); "
                             "repeatable")
    parser.add_argument("--data-dir", default=os.environ.get("SPECDEC_DATA_DIR"),
                        help="offline data folder (mt_bench/, gsm8k/, humaneval/); default "
                             "$SPECDEC_DATA_DIR, else the Hugging Face hub")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated method specs, e.g. "
                             "'baseline,hf-pld,pld,trie:node_budget=8,max_depth=4+exact'")
    parser.add_argument("--limit", type=int, default=10, help="prompts per dataset (first N)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    parser.add_argument("--model", default="embedded",
                        help="HF model id or path; default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--draft-model", default=None,
                        help="draft model of small-lm and hf-assisted (default: a second copy "
                             "of the target)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default=None, help="default: this process's accelerate device")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unrecorded warm-up generations per method before timing")
    parser.add_argument("--no-execute", action="store_true",
                        help="do not run HumanEval programs (pass@1 is then not reported)")
    parser.add_argument("--exec-timeout", type=float, default=10.0,
                        help="seconds per HumanEval program")


def _dataset_names(args) -> list[str]:
    names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else []
    if not names and not args.data:
        names = list(eval_datasets.BUILTIN)
    return names + list(args.data)


def check_settings(args: argparse.Namespace) -> None:
    """The settings' ranges and the device, before anything is loaded (`UsageError` names the
    flag)."""
    options.require([
        ("--limit", args.limit, args.limit >= 1, "an integer >= 1"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
        ("--exec-timeout", args.exec_timeout,
         options.finite(args.exec_timeout) and args.exec_timeout > 0, "a number of seconds > 0"),
        ("--warmup", args.warmup, args.warmup >= 0, "an integer >= 0"),
        ("--temperature", args.temperature,
         options.finite(args.temperature) and args.temperature >= 0, "a finite number >= 0"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "an integer >= 1"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
    ])
    options.check_device(args.device)


def load_examples(args: argparse.Namespace) -> list:
    """The first ``--limit`` prompts of every dataset; question files named apart by folder."""
    names = _dataset_names(args)
    files = [name for name in names if name not in eval_datasets.BUILTIN]
    shown = eval_datasets.display_names(files)
    sources = [name if name in eval_datasets.BUILTIN else str(Path(name).resolve())
               for name in names]
    if len(set(sources)) != len(sources):
        twice = next(name for name, key in zip(names, sources) if sources.count(key) > 1)
        raise UsageError(f"dataset {twice!r} is listed twice; list each dataset once")
    try:
        return [example for name in names
                for example in eval_datasets.load(name, args.data_dir, args.limit,
                                                  display=shown.get(name))]
    except eval_datasets.DatasetError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """``specdec eval``: bad input prints one line on stderr and exits with status 2."""
    try:
        return _run(args)
    except UsageError as error:
        print(f"specdec eval: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"specdec eval: interrupted; rerun the same command to resume from the records "
              f"in {args.out}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from evals.methods import SamplingSettings, build_methods, parse_methods
    from evals.report import PLOTS_SKIPPED, markdown, plot_if_available, write_reports
    from evals.runner import process_state, run_config, run_eval
    from specdec.cli import load_model

    check_settings(args)
    try:
        specs = parse_methods(args.methods)
    except ValueError as error:
        raise UsageError(str(error)) from None
    examples = load_examples(args)
    state = process_state(args.device)
    device = args.device or str(state.device)
    model, tokenizer = load_model(args.model, args.dtype, device)
    sampling = SamplingSettings(args.temperature, args.top_k, args.top_p, args.seed)

    def load_draft_model():
        # a separate object even when it is the same checkpoint: hf-assisted's target forwards
        # are counted with a hook on the target, which must not see the draft's calls
        return load_model(args.draft_model or args.model, args.dtype, device)[0]

    methods = build_methods(specs, model, tokenizer, sampling, load_draft_model=load_draft_model)
    config = run_config(args, sampling)

    bar = None
    if state.is_main_process:
        bar = tqdm(desc="generations (main process)", unit="gen")

    def on_start(pending: int) -> None:
        if bar is not None:
            bar.reset(total=pending)

    def progress(record: dict) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{record['dataset']} {record['method']}", refresh=False)
            bar.update()

    try:
        records = run_eval(model, tokenizer, examples, methods, args.out,
                           max_new_tokens=args.max_new_tokens, config=config,
                           warmup=args.warmup, execute=not args.no_execute,
                           exec_timeout=args.exec_timeout, progress=progress,
                           on_start=on_start, state=state)
    finally:
        if bar is not None:
            bar.close()
    if not state.is_main_process:
        return 0
    title = (f"{args.model}, max_new_tokens {args.max_new_tokens}, temperature "
             f"{args.temperature}, {args.limit} prompts per dataset")
    rows = write_reports(records, args.out, args.temperature, title, plots=False)
    plotted = plot_if_available(rows, args.out)
    print(markdown(rows, title))
    if plotted is None:
        print(PLOTS_SKIPPED)
    print(f"records, summary.json, summary.md{' and plots' if plotted else ''} in {args.out}")
    return 0
