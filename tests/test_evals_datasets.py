"""Dataset loaders: every format reads, malformed files fail naming file, line and field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from evals import datasets
from evals.datasets import DatasetError, chat_input_ids, load

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


HUMANEVAL_ROW = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
                 "canonical_solution": "    return a + b\n",
                 "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
                 "entry_point": "add"}


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "mt_bench/question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]},
        {"question_id": 82, "category": "math", "turns": ["What is 2+2?"], "reference": ["4"]},
    ])
    write_jsonl(tmp_path / "gsm8k/test.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "Pay 1,000 twice?", "answer": "so\n#### 2,000"},
    ])
    write_jsonl(tmp_path / "humaneval/HumanEval.jsonl.gz", [HUMANEVAL_ROW], gz=True)
    return tmp_path


def test_builtin_formats_read(data_dir):
    mt_bench = load("mt_bench", data_dir)
    assert [(e.id, e.category, e.prompt) for e in mt_bench] == [
        ("81", "writing", "Write a poem."), ("82", "math", "What is 2+2?")]
    assert mt_bench[1].reference == ["4"]
    gsm8k = load("gsm8k", data_dir)
    assert [(e.id, e.reference) for e in gsm8k] == [("0", "7"), ("1", "2000")]
    assert gsm8k[0].prompt.startswith("Tom has 3 apples")
    (humaneval,) = load("humaneval", data_dir)
    assert humaneval.id == "HumanEval/0"
    assert humaneval.reference == HUMANEVAL_ROW
    assert HUMANEVAL_ROW["prompt"] in humaneval.prompt


def test_limit_takes_the_first_rows(data_dir):
    assert [e.id for e in load("mt_bench", data_dir, limit=1)] == ["81"]


def test_spec_bench_file_is_named_after_its_stem(tmp_path):
    path = write_jsonl(tmp_path / "spec_bench.jsonl", [
        {"question_id": "a1", "category": "translation", "turns": ["Translate: bonjour"]},
        {"question_id": "a2", "category": "rag", "turns": ["Summarise."]},
    ])
    examples = load(str(path))
    assert {e.dataset for e in examples} == {"spec_bench"}
    assert [e.category for e in examples] == ["translation", "rag"]


@pytest.mark.parametrize("name, relative, rows, message", [
    ("mt_bench", "mt_bench/question.jsonl",
     [{"question_id": 1, "category": "x", "turns": ["a"]}, {"question_id": 2, "category": "x"}],
     r"question\.jsonl:2: missing field 'turns'"),
    ("mt_bench", "mt_bench/question.jsonl",
     [{"question_id": 1, "category": "x", "turns": "not a list"}],
     r"question\.jsonl:1: field 'turns' should be list"),
    ("mt_bench", "mt_bench/question.jsonl",
     [{"question_id": 1, "category": "x", "turns": []}],
     r"question\.jsonl:1: field 'turns' should be a non-empty list of strings"),
    ("gsm8k", "gsm8k/test.jsonl",
     [{"question": "q", "answer": "a\n#### 1"}, "", {"answer": "#### 2"}],
     r"test\.jsonl:3: missing field 'question'"),
    ("gsm8k", "gsm8k/test.jsonl", [{"question": "q", "answer": "no final answer"}],
     r"test\.jsonl:1: field 'answer' has no '####'"),
    ("gsm8k", "gsm8k/test.jsonl", ['{"question": "q", "answer": '],
     r"test\.jsonl:1: invalid JSON"),
    ("gsm8k", "gsm8k/test.jsonl", [], r"test\.jsonl: the file has no rows"),
])
def test_malformed_files_name_file_line_and_field(tmp_path, name, relative, rows, message):
    write_jsonl(tmp_path / relative, rows)
    with pytest.raises(DatasetError, match=message):
        load(name, tmp_path)


def test_malformed_humaneval_gzip_names_the_field(tmp_path):
    broken = {k: v for k, v in HUMANEVAL_ROW.items() if k != "entry_point"}
    write_jsonl(tmp_path / "humaneval/HumanEval.jsonl.gz", [HUMANEVAL_ROW, broken], gz=True)
    with pytest.raises(DatasetError, match=r"HumanEval\.jsonl\.gz:2: missing field 'entry_point'"):
        load("humaneval", tmp_path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match=r"gsm8k/test\.jsonl: no such file"):
        load("gsm8k", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'squad'"):
        load("squad", tmp_path)


def test_duplicate_ids_are_refused(tmp_path):
    row = {"question_id": 7, "category": "x", "turns": ["a"]}
    write_jsonl(tmp_path / "mt_bench/question.jsonl", [row, row])
    with pytest.raises(DatasetError, match="id '7' appears more than once"):
        load("mt_bench", tmp_path)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no shared offline data on this machine")
def test_shared_offline_data_loads_completely():
    sizes = {name: len(load(name, SHARED_DATA)) for name in datasets.BUILTIN}
    assert sizes == {"mt_bench": 80, "gsm8k": 1319, "humaneval": 164}


def test_chat_template_is_applied_when_the_tokenizer_has_one():
    from test_evals_tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ids = chat_input_ids(tokenizer, "hi")
    assert tokenizer.decode(ids[0]) == "<user>hi\n<assistant>"
    tokenizer.chat_template = None
    assert tokenizer.decode(chat_input_ids(tokenizer, "hi")[0], skip_special_tokens=True) == "hi"
