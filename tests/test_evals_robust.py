"""``specdec eval`` under bad input and interruptions: every refusal is one line (exit 2) before
anything is written, question files with the same name stay apart, a run killed by SIGINT or
SIGKILL resumes to exactly the records of an uninterrupted run, plots are optional."""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from evals.report import PLOTS_SKIPPED, markdown, summarize
from evals.runner import MERGED, TIMING_FIELDS, read_records, record_key, shard_path
from specdec.cli import main
from test_evals_datasets import write_jsonl
from test_evals_tiny import save_tiny

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
METHODS = "baseline,none,pld"


def questions(folder: Path, count: int, words: str) -> Path:
    """A Spec-Bench question file ``folder/q.jsonl`` with ids 0..count-1."""
    return write_jsonl(folder / "q.jsonl", [
        {"question_id": i, "category": "writing", "turns": [f"{words} {i}: {words} {words}"]}
        for i in range(count)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, two question files named q.jsonl in folders a/ and b/ (same ids)."""
    root = tmp_path_factory.mktemp("robust")
    model = save_tiny(root / "tiny")
    return {"root": root, "model": model, "a": questions(root / "a", 8, "ab ab cd"),
            "b": questions(root / "b", 8, "xy zz xy")}


def eval_args(world, out, *extra, limit=2, max_new_tokens=6, methods=METHODS):
    return ["eval", "--model", str(world["model"]), "--data", str(world["a"]),
            "--data", str(world["b"]), "--methods", methods, "--limit", str(limit),
            "--max-new-tokens", str(max_new_tokens), "--warmup", "0", "--out", str(out), *extra]


def stable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def finished(world):
    """A completed run's output folder (copied by the tests that corrupt it)."""
    out = world["root"] / "finished"
    assert main(eval_args(world, out)) == 0
    return out


# ---- the documented bad inputs -------------------------------------------------------------

def _corrupt(line: str):
    def make(world, finished, out):
        shutil.copytree(finished, out)
        with open(shard_path(out, 0), "a", encoding="utf-8") as handle:
            handle.write(line + "\n" + json.dumps(read_records(shard_path(out, 0))[0]) + "\n")
        return eval_args(world, out)
    return make


def _flag(*extra, **settings):
    return lambda world, finished, out: eval_args(world, out, *extra, **settings)


def _other_settings(world, finished, out):
    shutil.copytree(finished, out)
    return eval_args(world, out, max_new_tokens=5)


def _data(*paths):
    def make(world, finished, out):
        folder = world["root"]
        files = [arg for path in paths for arg in ("--data", str(folder / path))]
        return ["eval", "--model", str(world["model"]), *files, "--out", str(out)]
    return make


CASES = {  # the "bad input" cell of docs/errors.md -> the command line it stands for
    "`--limit 0` (any value below 1)": _flag(limit=0),
    "`--max-new-tokens 0`": _flag(max_new_tokens=0),
    "`--max-new-tokens 100000` (some prompt plus the new tokens is longer than the model's "
    "context)": _flag(max_new_tokens=100000),
    "`--exec-timeout 0`": _flag("--exec-timeout", "0"),
    "`--warmup -1`": _flag("--warmup", "-1"),
    "`--temperature -1`": _flag("--temperature", "-1"),
    "`--temperature nan`": _flag("--temperature", "nan"),
    "`--exec-timeout inf`": _flag("--exec-timeout", "inf"),
    "`--device nodevice`": _flag("--device", "nodevice"),
    "`--top-k 0`": _flag("--top-k", "0"),
    "`--top-p 0`": _flag("--top-p", "0"),
    "`--methods nonsense`": _flag(methods="nonsense"),
    "`--methods baseline,baseline`": _flag(methods="baseline,baseline"),
    "`--methods pld:bogus=1` (an option the drafter does not take)": _flag(methods="pld:bogus=1"),
    "`--methods hf-pld:bogus=1` (an option `generate` does not take)":
        _flag(methods="baseline,hf-pld:bogus=1"),
    "`--data missing.jsonl`": _data("missing.jsonl"),
    "`--data q.jsonl --data q.jsonl`": lambda world, finished, out: [
        "eval", "--model", str(world["model"]), "--out", str(out), "--data", "q.jsonl",
        "--data", str(world["root"] / "q.jsonl")],
    "`--datasets nonsense`": lambda world, finished, out: [
        "eval", "--model", str(world["model"]), "--datasets", "nonsense", "--out", str(out)],
    "`--out` holding records made with other settings": _other_settings,
    "a line `{}` in `--out`'s records": _corrupt("{}"),
    "a line `[1, 2]` in `--out`'s records": _corrupt("[1, 2]"),
    "a line that is not JSON in `--out`'s records (except a cut-short last line, which is "
    "dropped and recomputed)": _corrupt('{"dataset": "a/q", "id"'),
}


def documented_rows() -> list[tuple[str, str]]:
    text = DOCS.read_text(encoding="utf-8").split("<!-- rows: eval -->", 1)[1]
    text = text.split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] != "bad input":
            rows.append((cells[0], cells[1]))
    return rows


def message_pattern(cell: str) -> re.Pattern:
    """The documented message as a regex: ``<...>`` parts match any text."""
    assert cell.startswith("`") and cell.endswith("`"), cell
    pieces = re.split(r"<[^<>]+>", cell[1:-1])
    return re.compile(".+".join(re.escape(piece) for piece in pieces))


def test_every_documented_row_has_a_case():
    assert [bad for bad, _ in documented_rows()] == list(CASES)


@pytest.mark.parametrize("bad, message", documented_rows(), ids=lambda v: v[:40])
def test_documented_bad_input_gets_its_message_before_anything_is_written(
        bad, message, world, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(world["root"])
    (world["root"] / "q.jsonl").write_text((world["a"]).read_text())
    out = tmp_path / "out"
    argv = CASES[bad](world, finished, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # model loading may print progress
    ours = [line for line in err if line.startswith("specdec eval:")]
    assert ours == err[-1:] and message_pattern(message).fullmatch(ours[0]), err
    assert not any("Traceback" in line for line in err)
    after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    assert after == before  # a fresh folder is not even created; an old one is left as it was


def test_a_refused_start_does_not_block_the_corrected_rerun(world, tmp_path):
    out = tmp_path / "run"
    assert main(eval_args(world, out, max_new_tokens=100000)) == 2
    assert not out.exists()
    assert main(eval_args(world, out, max_new_tokens=5)) == 0
    assert len(read_records(out / MERGED)) == 2 * 2 * 3


def test_every_prompt_is_checked_against_the_context_before_the_first_record(world, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [
        {"question_id": 0, "category": "w", "turns": ["short"]},
        {"question_id": 1, "category": "w", "turns": ["long " * 800]}])  # 4000 tokens
    out = tmp_path / "run"
    args = ["eval", "--model", str(world["model"]), "--data", str(data), "--methods", METHODS,
            "--max-new-tokens", "200", "--warmup", "0", "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()
    args[args.index("200")] = "60"
    assert main(args) == 0


# ---- record identity and files ---------------------------------------------------------------

def test_question_files_with_the_same_name_are_kept_apart(world, finished):
    records = read_records(finished / MERGED)
    assert Counter(r["dataset"] for r in records) == {"a/q": 2 * 3, "b/q": 2 * 3}
    assert {r["source"] for r in records} == {str(world["a"]), str(world["b"])}
    rows = json.loads((finished / "summary.json").read_text())
    assert [(r["dataset"], r["method"]) for r in rows] == [
        (d, m) for d in ("a/q", "b/q") for m in METHODS.split(",")]
    a_text = {r["text"] for r in records if r["dataset"] == "a/q"}
    b_text = {r["text"] for r in records if r["dataset"] == "b/q"}
    assert a_text.isdisjoint(b_text)  # b's records are b's generations, not a's again


def test_a_complete_last_line_without_newline_is_recomputed_not_lost(world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shard = shard_path(out, 0)
    shard.write_bytes(shard.read_bytes()[:-1])  # a kill between the record and its newline
    assert main(eval_args(world, out)) == 0
    assert stable(read_records(out / MERGED)) == stable(read_records(finished / MERGED))
    keys = Counter(record_key(r) for r in read_records(shard))
    assert len(keys) == 2 * 2 * 3 and set(keys.values()) == {1}


def test_plots_are_skipped_with_a_note_without_matplotlib(world, finished, tmp_path, capsys,
                                                          monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    out = tmp_path / "run"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns("*.png"))
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    capsys.readouterr()
    assert main(eval_args(world, out)) == 0
    printed = capsys.readouterr().out
    assert "| a/q | pld | yes | 2 |" in printed and PLOTS_SKIPPED in printed
    assert (out / "summary.md").is_file() and not list(out.glob("*.png"))


# ---- speedup against the undrafted loop ------------------------------------------------------

def _record(method, rid, tokens_per_s):
    return {"dataset": "mt_bench", "id": rid, "method": method, "lossless": True,
            "output_ids": [1, 2], "new_tokens": 2, "wall_time": 2 / tokens_per_s,
            "tokens_per_s": tokens_per_s, "steps": 2, "depth_attempts": None,
            "depth_accepts": None, "correct": None}


def test_speedup_vs_none_is_reported_beside_the_speedup_vs_baseline():
    speeds = {"baseline": (10.0, 20.0), "none": (20.0, 25.0), "pld": (40.0, 30.0)}
    records = [_record(m, rid, s) for m, pair in speeds.items() for rid, s in zip("ab", pair)]
    rows = {r["method"]: r for r in summarize(records)}
    assert rows["pld"]["speedup"] == pytest.approx((4.0 + 1.5) / 2)
    assert rows["pld"]["speedup_vs_none"] == pytest.approx((2.0 + 1.2) / 2)
    assert rows["none"]["speedup_vs_none"] == 1.0
    table = markdown(list(rows.values()))
    assert "| speedup | speedup vs none |" in table
    assert "| mt_bench | pld | yes | 2 | 2.0 | 35.0 | 2.75x | 1.60x |" in table
    without = summarize([r for r in records if r["method"] != "none"])
    assert all(r["speedup_vs_none"] is None for r in without)
    assert "vs none" not in markdown(without)


# ---- interruptions ---------------------------------------------------------------------------

def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_records(world, tmp_path, signum):
    settings = dict(limit=8, max_new_tokens=48)
    clean = tmp_path / "clean"
    assert main(eval_args(world, clean, **settings)) == 0
    expected = read_records(clean / MERGED)
    total = len(expected)
    assert total == 2 * 8 * 3

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "specdec.cli", *eval_args(world, out,
                                                                                **settings)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = shard_path(out, 0)
    deadline = time.monotonic() + 300
    while _lines(shard) < 4 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signum)
    stderr = child.communicate(timeout=120)[1].decode()
    written = _lines(shard)
    assert 4 <= written < total, stderr[-2000:]  # stopped part way through
    assert child.returncode == (130 if signum == signal.SIGINT else -signal.SIGKILL)
    if signum == signal.SIGINT:
        assert "rerun the same command to resume" in stderr

    assert main(eval_args(world, out, **settings)) == 0
    shard_keys = Counter(record_key(r) for r in read_records(shard))
    merged = read_records(out / MERGED)
    assert set(shard_keys.values()) == {1} and len(shard_keys) == total
    assert Counter(record_key(r) for r in merged) == Counter(record_key(r) for r in expected)
    assert stable(merged) == stable(expected)

