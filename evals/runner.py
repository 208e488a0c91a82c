"""Run methods over prompts, one JSON line per (dataset, method, prompt), resumable and sharded.

Timing follows Spec-Bench: each generation is timed as a whole (prefill included) with the clock
read after ``torch.cuda.synchronize()`` on GPU; every method first runs warm-up generations that
are not recorded; methods are interleaved per prompt, so slow drift of the machine (thermal state,
other load) affects every method alike and ratios to the baseline compare like with like.

Records are appended to ``OUT/records.rank{R}.jsonl`` (one file per process), each line with one
``write`` as its generation finishes. A rerun with the same output directory skips every
(dataset, method, prompt) already recorded in any shard, so an interrupted run (Ctrl-C, a kill)
resumes where it stopped, recomputes nothing and loses nothing; a last line cut short by a kill is
dropped and recomputed, any other line that is not a record is an error naming file and line. A
question file's dataset is identified by its resolved path (``source``), so two files with the
same name in different folders never share records. ``OUT/config.json`` holds what the records
depend on (model, max_new_tokens, sampling, seed): adding records made with different values is
refused.

Beside the step counts every record has, a record of the project's loop keeps ``loop``: the
draft, target and prefill seconds, the tree size per step and the tree budget's choices of its
`evals.methods.Generation.stats` (`loop_fields`; None for the Hugging Face methods).

Every check (prompt lengths against the model's context, existing records and settings, one
short warm-up call of each method) runs before the run writes anything, so a run refused for bad
input leaves nothing in the way of the corrected rerun.

Under ``accelerate launch`` (GPUs) or ``torchrun`` (CPU processes; `process_state`) the prompts
are split between processes with
`accelerate.PartialState.split_between_processes`; each process writes its own shard and the main
process merges them into ``OUT/records.jsonl`` (sorted by dataset, prompt, method, so the merged
file does not depend on the number of processes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from evals.datasets import Example, chat_input_ids, dataset_key
from evals.methods import Method
from evals.metrics import score
from specdec.errors import UsageError
from specdec.target import context_length

CONFIG = "config.json"
MERGED = "records.jsonl"
SHARD_GLOB = "records.rank*.jsonl"
# differ between otherwise equal runs ("loop": the loop's draft and target seconds)
TIMING_FIELDS = ("wall_time", "tokens_per_s", "loop", "rank")


def shard_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"records.rank{rank}.jsonl"


def record_key(record: dict) -> tuple[str, str, str]:
    """(dataset identity, prompt id, method): a question file is identified by its path."""
    return dataset_key(record["dataset"], record.get("source")), record["id"], record["method"]


# fields every record has (and their types), checked as records are read back
RECORD_FIELDS = {"dataset": str, "id": str, "method": str, "lossless": bool,
                 "output_ids": list, "new_tokens": int, "wall_time": (int, float),
                 "tokens_per_s": (int, float), "steps": int,
                 "depth_attempts": (list, type(None)), "depth_accepts": (list, type(None)),
                 "correct": (bool, type(None))}


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: not an eval record (a JSON {type(record).__name__}, not an "
                         f"object); remove the line or the file")
    for name, types in RECORD_FIELDS.items():
        if name not in record or not isinstance(record[name], types):
            problem = "missing" if name not in record else "ill-typed"
            raise UsageError(f"{where}: not an eval record ({problem} field {name!r}); remove "
                             f"the line or the file")
    return record


def read_records(path: Path) -> list[dict]:
    """Records of one JSONL file; a last line cut short by a kill (no newline) is ignored.

    Any other line that is not a record raises `UsageError` naming the file and line.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1] follows the last newline
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number}: not a JSON record ({error.msg}); remove the "
                             f"line or the file") from None
        records.append(_check_record(record, f"{path}:{number}"))
    return records


def read_shards(out_dir: Path) -> list[dict]:
    records = []
    for path in sorted(out_dir.glob(SHARD_GLOB)):
        records.extend(read_records(path))
    return records


def _drop_partial_line(path: Path) -> None:
    """Cut an interrupted last line so the next record starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _append_line(fd: int, text: str) -> None:
    """Append one line with ``os.write`` on an ``O_APPEND`` descriptor: no buffer holds part of
    it, so an interrupted run leaves whole lines plus at most one cut-short last line."""
    data = (text + "\n").encode("utf-8")
    while data:
        data = data[os.write(fd, data):]


def run_config(args, sampling) -> dict:
    """What the records of a run depend on beyond prompts and methods (``config.json``): the
    ``--model``, ``--draft-model`` and ``--dtype`` of ``args``, ``--max-new-tokens``, and the
    `evals.methods.SamplingSettings`."""
    return {"model": args.model, "draft_model": args.draft_model or args.model,
            "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
            "temperature": sampling.temperature, "top_k": sampling.top_k,
            "top_p": sampling.top_p, "seed": sampling.seed}


def check_config(out_dir: Path, config: dict, has_records: bool) -> None:
    """Refuse to add to records made with settings other than ``config``.

    ``config.json`` only binds the directory once it holds records: a run that stopped before
    its first record leaves nothing in the way of a rerun with other settings.
    """
    path = out_dir / CONFIG
    if not (has_records and path.exists()):
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise UsageError(
            f"{out_dir} holds records made with other settings ({details}); use a new "
            f"--out directory or the same settings"
        )


def check_lengths(model, examples: Sequence[Example], input_ids: Sequence, max_new_tokens: int,
                  margin: int = 1) -> None:
    """Every prompt plus ``max_new_tokens`` fits the model's context (the bound of
    `specdec.loop.speculative_generate`: the last new token is never fed back)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    context = context_length(model.config)
    if context is None or not examples:
        return
    longest = max(range(len(examples)), key=lambda i: input_ids[i].shape[1])
    length = int(input_ids[longest].shape[1])
    if length + max_new_tokens - margin > context:
        example = examples[longest]
        raise UsageError(
            f"prompt {example.id!r} of {example.dataset} has {length} tokens; with "
            f"--max-new-tokens {max_new_tokens} it exceeds the model's context of {context}: "
            + (f"lower --max-new-tokens to at most {context - length + margin}"
               if length < context + margin - 1 else "use a shorter prompt or --limit")
        )


def _probe(methods: Sequence[Method], input_ids, tokens: int, rounds: int) -> None:
    """The warm-up generations (unrecorded; one of one token per method when ``rounds`` is 0): a
    method that cannot run (an unknown ``generate`` option, say) fails here, before any write."""
    rounds, tokens = (rounds, tokens) if rounds > 0 else (1, 1)
    for _ in range(rounds):
        for method in methods:
            try:
                method(input_ids, tokens)
            except (ValueError, TypeError) as error:
                first = (str(error).splitlines() or [type(error).__name__])[0]
                raise UsageError(f"method {method.label!r} cannot run: {first}") from error


def _acceptance(attempts: list[int] | None, accepts: list[int] | None) -> list[float] | None:
    if attempts is None:
        return None
    accepts = accepts + [0] * (len(attempts) - len(accepts))
    return [a / n if n else 0.0 for a, n in zip(accepts, attempts)]


def loop_fields(stats) -> dict | None:
    """What a record keeps of the loop's `specdec.state.GenerationStats` beyond its step counts:
    draft, target and prefill seconds, the tree size per step, the tree budget's choices."""
    if stats is None:
        return None
    return {"draft_time": stats.draft_time, "target_time": stats.target_time,
            "prefill_time": stats.prefill_time, "tree_sizes": list(stats.tree_sizes),
            "tree_budget": stats.extra.get("tree_budget")}


def make_record(example: Example, index: int, method: Method, generation, text: str,
                correct: bool | None, prompt_tokens: int, rank: int) -> dict:
    return {
        "dataset": example.dataset,
        "source": example.source,
        "id": example.id,
        "index": index,
        "category": example.category,
        "method": method.label,
        "lossless": method.lossless,
        "prompt_tokens": prompt_tokens,
        "output_ids": generation.output_ids,
        "text": text,
        "new_tokens": len(generation.output_ids),
        "wall_time": generation.wall_time,
        "tokens_per_s": len(generation.output_ids) / generation.wall_time,
        "steps": generation.steps,
        "accepted_lengths": generation.accepted_lengths,
        "depth_attempts": generation.depth_attempts,
        "depth_accepts": generation.depth_accepts,
        "acceptance_per_depth": _acceptance(generation.depth_attempts, generation.depth_accepts),
        "correct": correct,
        "loop": loop_fields(generation.stats),
        "rank": rank,
    }


def order_records(records: list[dict], examples: Sequence[Example],
                  methods: Sequence[str]) -> list[dict]:
    """The records of ``examples`` x ``methods``, one per key, by dataset, prompt, method."""
    position = {(ex.key, ex.id): i for i, ex in enumerate(examples)}
    method_rank = {label: i for i, label in enumerate(methods)}
    chosen: dict[tuple, dict] = {}
    for record in records:
        key = record_key(record)
        if (key[0], key[1]) in position and key[2] in method_rank:
            chosen.setdefault(key, record)
    return sorted(chosen.values(), key=lambda r: (position[record_key(r)[:2]],
                                                  method_rank[r["method"]]))


def process_state(device: str | None = None):
    """This process's `accelerate.PartialState`.

    CPU runs ask accelerate for its multi-CPU mode (gloo), which it only enters when told; so
    ``torchrun --nproc_per_node N`` shards over CPU processes as ``accelerate launch`` does over
    GPUs. ``accelerate launch --cpu`` and ``--device cpu`` force the CPU.
    """
    import torch
    from accelerate import PartialState

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cpu = forced or device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _generate(tokenizer, pending, all_ids, out_dir: Path, max_new_tokens: int, rank: int,
              scoring: tuple[bool, float], progress) -> None:
    """Run the pending (index, example, method) generations, one shard line each."""
    execute, exec_timeout = scoring
    path = shard_path(out_dir, rank)
    _drop_partial_line(path)
    scores: dict[tuple[str, str, str], bool | None] = {}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for index, example, method in pending:
            generation = method(all_ids[index], max_new_tokens)
            text = tokenizer.decode(generation.output_ids, skip_special_tokens=True)
            score_key = (example.key, example.id, text)
            if score_key not in scores:
                scores[score_key] = (None if example.dataset == "humaneval" and not execute
                                     else score(example, text, exec_timeout))
            record = make_record(example, index, method, generation, text, scores[score_key],
                                 int(all_ids[index].shape[1]), rank)
            _append_line(fd, json.dumps(record))
            if progress is not None:
                progress(record)
    finally:
        os.close(fd)


def run_eval(model, tokenizer, examples: Sequence[Example], methods: Sequence[Method],
             out_dir: str | Path, *, max_new_tokens: int, config: dict, warmup: int = 1,
             warmup_tokens: int = 32, execute: bool = True, exec_timeout: float = 10.0,
             progress: Callable[[dict], None] | None = None,
             on_start: Callable[[int], None] | None = None, state=None) -> list[dict]:
    """Generate every missing (example, method) record; return all of them (main process).

    ``config`` is what the records depend on beyond the prompts and methods (see `check_config`).
    ``execute=False`` skips running HumanEval programs (``correct`` stays None there).
    ``on_start(pending)`` is told how many generations this process will run, ``progress(record)``
    is called after each one. Other processes return an empty list.
    """
    state = state or process_state()
    out_dir = Path(out_dir)
    all_ids = [chat_input_ids(tokenizer, example.prompt) for example in examples]
    check_lengths(model, examples, all_ids, max_new_tokens)
    done = {record_key(r) for r in read_shards(out_dir)} if out_dir.is_dir() else set()
    if state.is_main_process:
        check_config(out_dir, config, bool(done))
    indexed = list(enumerate(examples))
    with state.split_between_processes(indexed) as shard:
        shard = list(shard)
    pending = [(index, example, method) for index, example in shard for method in methods
               if (example.key, example.id, method.label) not in done]
    if on_start is not None:
        on_start(len(pending))
    if pending:
        _probe(methods, all_ids[pending[0][0]], min(max_new_tokens, warmup_tokens), warmup)
    # only now, every check passed, does the run leave anything behind
    if state.is_main_process and not (done and (out_dir / CONFIG).exists()):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state.wait_for_everyone()
    if pending:
        _generate(tokenizer, pending, all_ids, out_dir, max_new_tokens, state.process_index,
                  (execute, exec_timeout), progress)

    state.wait_for_everyone()
    if not state.is_main_process:
        return []
    records = read_shards(out_dir)
    labels = [method.label for method in methods]
    merged = order_records(records, examples, labels)
    # records of prompts or methods not asked for this time stay in the merged file, after
    others: dict[tuple, dict] = {}
    for record in records:
        others.setdefault(record_key(record), record)
    for record in merged:
        del others[record_key(record)]
    tmp = out_dir / (MERGED + ".tmp")
    lines = [json.dumps(r) + "\n" for r in merged + list(others.values())]
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, out_dir / MERGED)
    return merged
