"""Evaluation datasets: MT-Bench (and any Spec-Bench style question file), GSM8K, HumanEval.

Every loader returns a list of `Example`: one user prompt to answer, plus what the metrics need
(``reference``). Offline, files are read from a data directory laid out as the sources publish
them::

    DATA_DIR/mt_bench/question.jsonl          FastChat llm_judge format
    DATA_DIR/gsm8k/test.jsonl                 openai/grade-school-math
    DATA_DIR/humaneval/HumanEval.jsonl.gz     openai/human-eval

Without a data directory the same sets come from the Hugging Face hub through ``datasets``.
Rows are validated as they are read: a malformed file raises `DatasetError` naming the file, the
line and the missing or ill-typed field.

MT-Bench / Spec-Bench questions have several ``turns``; the eval answers the first one (the second
turn would be conditioned on each method's own first answer, which is the same text for lossless
methods and only adds cost).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

BUILTIN = ("mt_bench", "gsm8k", "humaneval")
FILES = {
    "mt_bench": "mt_bench/question.jsonl",
    "gsm8k": "gsm8k/test.jsonl",
    "humaneval": "humaneval/HumanEval.jsonl.gz",
}
HUB = {  # (path, config, split)
    "mt_bench": ("HuggingFaceH4/mt_bench_prompts", None, "train"),
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "humaneval": ("openai/openai_humaneval", None, "test"),
}

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one Python code "
    "block.\n\n```python\n{prompt}```"
)


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class Example:
    dataset: str
    id: str
    prompt: str  # the user message the model answers
    category: str | None = None
    reference: Any = None  # gsm8k: the final answer; humaneval: the problem dict; else optional
    source: str | None = None  # a question file's resolved path: what identifies its dataset

    @property
    def key(self) -> str:
        """What tells this example's dataset apart from every other: a file's path, else the name."""
        return dataset_key(self.dataset, self.source)


def dataset_key(dataset: str, source: str | None) -> str:
    return source or dataset


def _require(row: dict, fields: dict[str, type | tuple[type, ...]], where: str,
             kind: str) -> None:
    if not isinstance(row, dict):
        raise DatasetError(
            f"{where}: expected a JSON object ({kind} row), got {type(row).__name__}"
        )
    for name, types in fields.items():
        if name not in row:
            raise DatasetError(
                f"{where}: missing field {name!r} ({kind} rows need {', '.join(fields)})"
            )
        if not isinstance(row[name], types):
            raise DatasetError(
                f"{where}: field {name!r} should be {_type_names(types)}, "
                f"got {type(row[name]).__name__}"
            )


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line`` label, parsed row) for each non-blank line of a .jsonl or .jsonl.gz file."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{where}: invalid JSON ({error.msg})") from None
                count += 1
                yield where, row
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise DatasetError(f"{path}: cannot be read ({error})") from None
    if count == 0:
        raise DatasetError(f"{path}: the file has no rows")


def spec_bench_example(row: dict, where: str, dataset: str) -> Example:
    """A FastChat / Spec-Bench question: ``question_id``, ``category``, ``turns``, ``reference``."""
    _require(row, {"question_id": (int, str), "category": str, "turns": list}, where,
             "MT-Bench/Spec-Bench")
    turns = row["turns"]
    if not turns or not all(isinstance(turn, str) for turn in turns):
        raise DatasetError(f"{where}: field 'turns' should be a non-empty list of strings")
    return Example(dataset, str(row["question_id"]), turns[0], row["category"],
                   row.get("reference"))


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after ``####``, commas removed."""
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k_example(row: dict, where: str, dataset: str, index: int) -> Example:
    _require(row, {"question": str, "answer": str}, where, "GSM8K")
    if "####" not in row["answer"]:
        raise DatasetError(f"{where}: field 'answer' has no '####' before the final answer")
    return Example(dataset, str(index), row["question"], None, gsm8k_answer(row["answer"]))


def humaneval_example(row: dict, where: str, dataset: str) -> Example:
    fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    _require(row, {name: str for name in fields}, where, "HumanEval")
    problem = {name: row[name] for name in fields}
    return Example(dataset, row["task_id"], HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"]),
                   None, problem)


def _examples(name: str, rows: Iterable[tuple[str, dict]], kind: str) -> list[Example]:
    out = []
    for index, (where, row) in enumerate(rows):
        if kind == "gsm8k":
            out.append(gsm8k_example(row, where, name, index))
        elif kind == "humaneval":
            out.append(humaneval_example(row, where, name))
        else:
            out.append(spec_bench_example(row, where, name))
    ids = [example.id for example in out]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{name}: id {duplicate!r} appears more than once")
    return out


def _hub_rows(name: str) -> Iterator[tuple[str, dict]]:
    from datasets import load_dataset

    path, config, split = HUB[name]
    for index, row in enumerate(load_dataset(path, config, split=split)):
        if name == "mt_bench":  # the hub copy names FastChat's fields differently
            row = {"question_id": row["prompt_id"], "category": row["category"],
                   "turns": row["prompt"], "reference": row.get("reference")}
        yield f"hub:{path}[{index}]", row


def load(name: str, data_dir: str | Path | None = None, limit: int | None = None,
         display: str | None = None) -> list[Example]:
    """The first ``limit`` examples of a dataset.

    ``name`` is one of ``BUILTIN`` (read from ``data_dir``, or the hub when it is None) or the path
    of a Spec-Bench style ``.jsonl`` file. A file's examples carry its resolved path as
    ``source`` (their dataset's identity) and ``display`` as their dataset name (default: the
    file's stem; see `display_names`).
    """
    if name in BUILTIN:
        rows = _hub_rows(name) if data_dir is None else _json_lines(Path(data_dir) / FILES[name])
        examples = _examples(name, rows, name)
    elif Path(name).suffix in (".jsonl", ".gz") or Path(name).is_file():
        source = str(Path(name).resolve())
        examples = [replace(example, source=source) for example in
                    _examples(display or dataset_name(name), _json_lines(Path(name)),
                              "spec_bench")]
    else:
        raise DatasetError(
            f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or the path of a "
            f"Spec-Bench style .jsonl file"
        )
    return examples[:limit] if limit is not None else examples


def dataset_name(name: str) -> str:
    """The name records carry: a builtin's own, or a question file's stem."""
    if name in BUILTIN:
        return name
    stem = Path(name).name
    for suffix in (".gz", ".jsonl", ".json"):
        stem = stem.removesuffix(suffix)
    return stem


def display_names(paths: Sequence[str]) -> dict[str, str]:
    """A short name for each question file that no other file or builtin dataset shares.

    The file's stem, prefixed by as many parent folders as it takes: ``a/q.jsonl`` and
    ``b/q.jsonl`` are ``a/q`` and ``b/q``; a file ``x/gsm8k.jsonl`` is ``x/gsm8k``.
    """
    resolved = {path: Path(path).resolve() for path in paths}
    depth = dict.fromkeys(resolved.values(), 0)

    def name(file: Path) -> str:
        parents = file.parent.parts[1:]  # without the root
        if depth[file] > len(parents):
            return str(file)
        return "/".join(parents[len(parents) - depth[file]:] + (dataset_name(file.name),))

    while True:
        owners: dict[str, set[Path]] = {}
        for file in depth:
            owners.setdefault(name(file), set()).add(file)
        clashing = [file for label, files in owners.items()
                    if len(files) > 1 or label in BUILTIN for file in files]
        if not clashing:
            return {path: name(file) for path, file in resolved.items()}
        for file in clashing:
            depth[file] += 1


def chat_input_ids(tokenizer, prompt: str):
    """[1, L] input ids of one user turn, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids
