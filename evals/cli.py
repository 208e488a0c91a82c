"""``specdec eval``: speed, acceptance and quality of decoding methods (MT-Bench, GSM8K, HumanEval).

    specdec eval --datasets mt_bench,gsm8k,humaneval --methods baseline,hf-pld,pld,trie \\
        --limit 5 --max-new-tokens 128 --data-dir ../shared/data --out runs/embedded

Data-parallel over GPUs with ``accelerate launch -m specdec.cli eval ...``, over CPU processes with
``torchrun --nproc_per_node N -m specdec.cli eval ...``.
Method specs: see `evals.methods`; outputs: see `evals.runner` and `evals.report`.
"""

from __future__ import annotations

import argparse
import os

from evals import datasets as eval_datasets

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
    parser.add_argument("--dtype", default="float32")
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


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from evals.methods import Method, SamplingSettings, parse_methods
    from evals.report import markdown, write_reports
    from evals.runner import process_state, run_eval
    from specdec.cli import load_model

    try:
        specs = parse_methods(args.methods)
        examples = [example for name in _dataset_names(args)
                    for example in eval_datasets.load(name, args.data_dir, args.limit)]
    except ValueError as error:
        raise SystemExit(f"specdec eval: {error}") from None
    state = process_state(args.device)
    device = args.device or str(state.device)
    model, tokenizer = load_model(args.model, args.dtype, device)
    draft_model = None
    if any(spec.needs_draft_model for spec in specs):
        # a separate object even when it is the same checkpoint: hf-assisted's target forwards
        # are counted with a hook on the target, which must not see the draft's calls
        draft_model = load_model(args.draft_model or args.model, args.dtype, device)[0]
    sampling = SamplingSettings(args.temperature, args.top_k, args.top_p, args.seed)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        methods = [Method(spec, model, sampling, eos_token_id=eos, pad_token_id=pad,
                          draft_model=draft_model) for spec in specs]
    except (ValueError, TypeError) as error:
        raise SystemExit(f"specdec eval: {error}") from None
    config = {"model": args.model, "draft_model": args.draft_model or args.model,
              "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
              "seed": args.seed}

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
    except ValueError as error:
        raise SystemExit(f"specdec eval: {error}") from None
    finally:
        if bar is not None:
            bar.close()
    if not state.is_main_process:
        return 0
    title = (f"{args.model}, max_new_tokens {args.max_new_tokens}, temperature "
             f"{args.temperature}, {args.limit} prompts per dataset")
    rows = write_reports(records, args.out, args.temperature, title)
    print(markdown(rows, title))
    print(f"records, summary.json, summary.md and plots in {args.out}")
    return 0
