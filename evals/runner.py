"""Run methods over prompts, one JSON line per (dataset, method, prompt), resumable and sharded.

Timing follows Spec-Bench: each generation is timed as a whole (prefill included) with the clock
read after ``torch.cuda.synchronize()`` on GPU; every method first runs warm-up generations that
are not recorded; methods are interleaved per prompt, so slow drift of the machine (thermal state,
other load) affects every method alike and ratios to the baseline compare like with like.

Records are appended to ``OUT/records.rank{R}.jsonl`` (one file per process) and flushed as each
generation finishes. A rerun with the same output directory skips every (dataset, method, prompt)
already recorded in any shard, so an interrupted run resumes where it stopped and recomputes
nothing; a line cut short by a kill is dropped. ``OUT/config.json`` holds what the records depend
on (model, max_new_tokens, sampling, seed): resuming with different values is refused.

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

from evals.datasets import Example, chat_input_ids
from evals.methods import Method
from evals.metrics import score

CONFIG = "config.json"
MERGED = "records.jsonl"
SHARD_GLOB = "records.rank*.jsonl"
TIMING_FIELDS = ("wall_time", "tokens_per_s", "rank")  # differ between otherwise equal runs


def shard_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"records.rank{rank}.jsonl"


def record_key(record: dict) -> tuple[str, str, str]:
    return record["dataset"], record["id"], record["method"]


def read_records(path: Path) -> list[dict]:
    """Records of one JSONL file; a last line cut short by a kill is ignored."""
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was interrupted
                break
            raise ValueError(f"{path}:{number}: not a JSON record; remove the line or the file")
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


def check_config(out_dir: Path, config: dict) -> None:
    """Write ``config.json``, or check that the one already there matches ``config``."""
    path = out_dir / CONFIG
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{out_dir} holds records made with other settings ({details}); use a new "
                f"--out directory or the same settings"
            )
        return
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _acceptance(attempts: list[int] | None, accepts: list[int] | None) -> list[float] | None:
    if attempts is None:
        return None
    accepts = accepts + [0] * (len(attempts) - len(accepts))
    return [a / n if n else 0.0 for a, n in zip(accepts, attempts)]


def make_record(example: Example, index: int, method: Method, generation, text: str,
                correct: bool | None, prompt_tokens: int, rank: int) -> dict:
    return {
        "dataset": example.dataset,
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
        "rank": rank,
    }


def order_records(records: list[dict], examples: Sequence[Example],
                  methods: Sequence[str]) -> list[dict]:
    """The records of ``examples`` x ``methods``, one per key, by dataset, prompt, method."""
    position = {(ex.dataset, ex.id): i for i, ex in enumerate(examples)}
    method_rank = {label: i for i, label in enumerate(methods)}
    chosen: dict[tuple, dict] = {}
    for record in records:
        key = record_key(record)
        if (key[0], key[1]) in position and key[2] in method_rank:
            chosen.setdefault(key, record)
    return sorted(chosen.values(), key=lambda r: (position[(r["dataset"], r["id"])],
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
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_config(out_dir, config)
    state.wait_for_everyone()

    done = {record_key(r) for r in read_shards(out_dir)}
    indexed = list(enumerate(examples))
    with state.split_between_processes(indexed) as shard:
        shard = list(shard)
    pending = [(index, example, method) for index, example in shard for method in methods
               if (example.dataset, example.id, method.label) not in done]
    if on_start is not None:
        on_start(len(pending))

    if pending:
        warmup_ids = chat_input_ids(tokenizer, pending[0][1].prompt)
        for _ in range(warmup):
            for method in methods:
                method(warmup_ids, min(max_new_tokens, warmup_tokens))
        path = shard_path(out_dir, state.process_index)
        _drop_partial_line(path)
        scores: dict[tuple[str, str, str], bool | None] = {}
        with open(path, "a", encoding="utf-8") as shard_file:
            for index, example, method in pending:
                input_ids = chat_input_ids(tokenizer, example.prompt)
                generation = method(input_ids, max_new_tokens)
                text = tokenizer.decode(generation.output_ids, skip_special_tokens=True)
                score_key = (example.dataset, example.id, text)
                if score_key not in scores:
                    scores[score_key] = (None if example.dataset == "humaneval" and not execute
                                         else score(example, text, exec_timeout))
                record = make_record(example, index, method, generation, text,
                                     scores[score_key], int(input_ids.shape[1]),
                                     state.process_index)
                shard_file.write(json.dumps(record) + "\n")
                shard_file.flush()
                if progress is not None:
                    progress(record)

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
