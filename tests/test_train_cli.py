"""``specdec train`` on a tiny target: every documented bad input (docs/errors.md) is one line with
exit status 2, refused before the target loads where it can be; ``--max-tokens N`` extracts and
trains on exactly N tokens; the extraction announces its size and a time estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drafters.train import FeatureSet
from specdec.cli import main
from test_cli import assert_refused, checkpoint, documented_rows, loads, row_id  # noqa: F401


def conversation(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"question {i}: ab ab cd?"},
                              {"from": "gpt", "value": f"answer {i}: " + "ab cd " * (4 + i % 5)}]}


def write_data(folder: Path) -> None:
    """The files the documented rows name, in ``folder``."""
    (folder / "chat.json").write_text(json.dumps([conversation(i) for i in range(30)]))
    (folder / "empty.json").write_text("")
    (folder / "notes.json").write_text(json.dumps([{"text": "no turns here"}]))
    (folder / "notes.txt").write_text("some notes\n")
    (folder / "broken.jsonl").write_text("{'conversations': []}\n")
    only_answers = [{"conversations": [{"from": "gpt", "value": "an answer with no question"}]}]
    (folder / "answers.json").write_text(json.dumps(only_answers * 3))
    other = folder / "other-features"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(
        {"target": "another model", "data": "other data", "seq_len": 16, "teacher_top_k": 2,
         "aux_layers": [], "shards": [], "next_conversation": 0, "tokens": 0}))


def train(checkpoint, *words, kind="medusa"):
    return main(["train", kind, "--target", checkpoint, "--data", "chat.json", "--out", "out",
                 "--features", "features", "--max-tokens", "64", *words])


@pytest.fixture
def folder(tmp_path, monkeypatch):
    write_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("row", documented_rows("train"), ids=row_id)
def test_documented_train_refusals(row, checkpoint, loads, capsys, folder):  # noqa: F811
    words, message, after_load = row
    if not after_load:
        loads.forbid()
    code = train(checkpoint, *words[1:], kind=words[0])
    assert_refused(capsys, code, message, after_load)
    assert loads.count == (1 if after_load else 0)


def test_every_train_check_is_documented():
    rows = {" ".join(words[1:]) for words, _, _ in documented_rows("train")}
    for flag in ("--epochs", "--heads", "--batch-size", "--lr", "--max-tokens", "--data", "--init"):
        assert any(row.startswith(flag) for row in rows), flag


def test_max_tokens_is_exact_and_the_extraction_is_announced(checkpoint, folder,  # noqa: F811
                                                             capsys):
    assert train(checkpoint, "--max-tokens", "150", "--extract-only") == 0
    out = capsys.readouterr().out
    manifest = json.loads((folder / "features" / "manifest.json").read_text())
    assert manifest["tokens"] == 150
    assert sum(shard["tokens"] for shard in manifest["shards"]) == 150
    assert FeatureSet.load(folder / "features").num_tokens == 150
    assert "extracting 150 tokens of target features" in out
    assert "first batch:" in out and "tokens/s, so about" in out and "for 150 tokens" in out

    # a larger cache trains on the first N tokens only
    assert train(checkpoint, "--max-tokens", "100", "--batch-size", "2") == 0
    trained = json.loads((folder / "out" / "config.json").read_text())["training"]
    assert trained["tokens"] == 100
    assert FeatureSet.load(folder / "features", max_tokens=100).num_tokens == 100

    # asking for more extends the cache to exactly that many
    assert train(checkpoint, "--max-tokens", "260", "--extract-only") == 0
    assert "extracting 110 tokens of target features" in capsys.readouterr().out
    manifest = json.loads((folder / "features" / "manifest.json").read_text())
    assert manifest["tokens"] == 260

