"""The runner and report: resume after a kill recomputes nothing, summaries equal the numbers
recomputed from the JSON lines, the CLI writes every output."""

from __future__ import annotations

import json
from statistics import median

import pytest

from evals import runner
from evals.datasets import load
from evals.methods import Method, SamplingSettings, parse_methods
from evals.report import summarize, write_reports
from evals.runner import MERGED, TIMING_FIELDS, read_records, run_eval
from test_evals_datasets import HUMANEVAL_ROW, write_jsonl
from test_evals_tiny import save_tiny, tiny_model, tiny_tokenizer

CONFIG = {"model": "tiny", "max_new_tokens": 10, "temperature": 0.0}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    write_jsonl(folder / "mt_bench/question.jsonl", [
        {"question_id": i, "category": "writing", "turns": [f"Say abc abc abc {i} times."]}
        for i in range(3)])
    write_jsonl(folder / "gsm8k/test.jsonl", [
        {"question": f"What is {i} + {i}?", "answer": f"{i}+{i}\n#### {2 * i}"}
        for i in range(3)])
    write_jsonl(folder / "humaneval/HumanEval.jsonl.gz", [HUMANEVAL_ROW], gz=True)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


def build(model, specs="baseline,pld,trie:node_budget=4+exact"):
    return [Method(spec, model, SamplingSettings(), eos_token_id=1, pad_token_id=1)
            for spec in parse_methods(specs)]


def examples_of(data_dir):
    return load("mt_bench", data_dir) + load("gsm8k", data_dir)


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


class CountingMethods:
    """The runner sees these wrappers as methods; ``calls`` logs every generation they run."""

    def __init__(self, methods):
        self.calls: list[tuple[str, int]] = []
        self.methods = [_Counted(method, self.calls) for method in methods]


class _Counted:
    def __init__(self, method, calls):
        self.method, self.calls = method, calls
        self.label, self.lossless = method.label, method.lossless

    def __call__(self, input_ids, max_new_tokens):
        self.calls.append((self.label, max_new_tokens))
        return self.method(input_ids, max_new_tokens)


class Killed(Exception):
    pass


def test_resume_after_a_kill_recomputes_nothing(tmp_path, data_dir, tiny):
    model, tokenizer = tiny
    examples = examples_of(data_dir)
    total = len(examples) * 3
    clean = run_eval(model, tokenizer, examples, build(model), tmp_path / "clean",
                     max_new_tokens=10, config=CONFIG, warmup=0)
    assert len(clean) == total

    out = tmp_path / "resumed"
    first = CountingMethods(build(model))
    seen = []

    def kill_after_five(record):
        seen.append(record)
        if len(seen) == 5:
            raise Killed

    with pytest.raises(Killed):
        run_eval(model, tokenizer, examples, first.methods, out, max_new_tokens=10,
                 config=CONFIG, warmup=0, progress=kill_after_five)
    shard = runner.shard_path(out, 0)
    assert len(read_records(shard)) == 5
    with open(shard, "a", encoding="utf-8") as handle:  # a write cut short by the kill
        handle.write('{"dataset": "gsm8k", "id": "2", "met')

    second = CountingMethods(build(model))
    resumed = run_eval(model, tokenizer, examples, second.methods, out, max_new_tokens=10,
                       config=CONFIG, warmup=1, warmup_tokens=3)
    warmups = [c for c in second.calls if c[1] == 3]
    generations = [c for c in second.calls if c[1] == 10]
    assert len(warmups) == 3  # one per method, not recorded
    assert len(generations) == total - 5
    assert without_timing(resumed) == without_timing(clean)
    merged = read_records(out / MERGED)
    assert without_timing(merged) == without_timing(clean)
    assert len(shard.read_text().splitlines()) == total  # the cut line is gone

    third = CountingMethods(build(model))
    again = run_eval(model, tokenizer, examples, third.methods, out, max_new_tokens=10,
                     config=CONFIG, warmup=1)
    assert third.calls == [] and without_timing(again) == without_timing(clean)


def test_resuming_with_other_settings_is_refused(tmp_path, data_dir, tiny):
    model, tokenizer = tiny
    examples = load("gsm8k", data_dir, limit=1)
    run_eval(model, tokenizer, examples, build(model, "baseline"), tmp_path, max_new_tokens=10,
             config=CONFIG, warmup=0)
    with pytest.raises(ValueError, match="max_new_tokens: 10 -> 20"):
        run_eval(model, tokenizer, examples, build(model, "baseline"), tmp_path,
                 max_new_tokens=20, config={**CONFIG, "max_new_tokens": 20}, warmup=0)


def recompute(records, dataset, method):
    """The summary row's numbers, computed here from the raw records."""
    mine = [r for r in records if r["dataset"] == dataset and r["method"] == method]
    base = {r["id"]: r for r in records if r["dataset"] == dataset and r["method"] == "baseline"}
    tps = [r["new_tokens"] / r["wall_time"] for r in mine]
    ratios = [(r["new_tokens"] / r["wall_time"])
              / (base[r["id"]]["new_tokens"] / base[r["id"]]["wall_time"]) for r in mine]
    attempts = [sum(r["depth_attempts"][d] for r in mine if len(r["depth_attempts"]) > d)
                for d in range(max(len(r["depth_attempts"] or []) for r in mine))]
    accepts = [sum(r["depth_accepts"][d] for r in mine if len(r["depth_accepts"]) > d)
               for d in range(len(attempts))]
    return {
        "n": len(mine),
        "new_tokens": sum(len(r["output_ids"]) for r in mine) / len(mine),
        "tokens_per_s": median(tps),
        "speedup": median(ratios),
        "tau": sum(len(r["output_ids"]) for r in mine) / sum(r["steps"] for r in mine),
        "identical": sum(r["output_ids"] == base[r["id"]]["output_ids"] for r in mine) / len(mine),
        "acceptance": [a / n for a, n in zip(accepts, attempts)] if attempts else None,
        "correct": sum(bool(r["correct"]) for r in mine) / len(mine),
    }


def test_cli_outputs_and_summary_equal_numbers_recomputed_from_the_records(tmp_path, data_dir):
    from specdec.cli import main

    model_dir = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["eval", "--model", str(model_dir), "--data-dir", str(data_dir),
                 "--methods", "baseline,hf-pld,pld,trie:node_budget=6,max_depth=3",
                 "--limit", "2", "--max-new-tokens", "12", "--out", str(out),
                 "--warmup", "0"]) == 0
    for name in ("summary.json", "summary.md", "speedup_tau.png", "acceptance_by_depth.png",
                 "config.json", MERGED):
        assert (out / name).is_file(), name
    records = read_records(out / MERGED)
    assert len(records) == (2 + 2 + 1) * 4
    rows = json.loads((out / "summary.json").read_text())
    assert {(r["dataset"], r["method"]) for r in rows} == {
        (d, m) for d in ("mt_bench", "gsm8k", "humaneval")
        for m in ("baseline", "hf-pld", "pld", "trie:node_budget=6,max_depth=3")}
    for row in rows:
        expected = recompute(records, row["dataset"], row["method"])
        assert row["n"] == expected["n"]
        for field in ("new_tokens", "tokens_per_s", "speedup", "tau", "identical"):
            assert row[field] == pytest.approx(expected[field]), (row["method"], field)
        if row["acceptance_per_depth"] is None:
            assert row["method"] in ("baseline", "hf-pld")
        else:
            assert row["acceptance_per_depth"] == pytest.approx(expected["acceptance"])
        quality = {"gsm8k": row["accuracy"], "humaneval": row["pass_at_1"]}.get(row["dataset"])
        if row["dataset"] == "mt_bench":
            assert row["accuracy"] is None and row["pass_at_1"] is None
        else:
            assert quality == pytest.approx(expected["correct"])
        assert row["identical"] == 1.0  # all lossless at temperature 0
    table = (out / "summary.md").read_text()
    assert "| gsm8k | pld | yes | 2 |" in table and "pass@1" in table


def test_summary_marks_differences_from_the_baseline():
    def record(method, rid, ids, wall, steps, correct=None):
        return {"dataset": "gsm8k", "id": rid, "method": method, "lossless": True,
                "output_ids": ids, "new_tokens": len(ids), "wall_time": wall,
                "tokens_per_s": len(ids) / wall, "steps": steps, "depth_attempts": None,
                "depth_accepts": None, "correct": correct}

    records = [record("baseline", "a", [1, 2, 3, 4], 2.0, 4, True),
               record("baseline", "b", [5, 6], 1.0, 2, False),
               record("fast", "a", [1, 2, 3, 4], 1.0, 2, True),
               record("fast", "b", [5, 7], 2.0, 1, True)]
    rows = {r["method"]: r for r in summarize(records)}
    assert rows["fast"]["identical"] == 0.5
    assert rows["fast"]["speedup"] == pytest.approx(median([2.0, 0.5]))
    assert rows["fast"]["tau"] == pytest.approx(6 / 3)
    assert rows["fast"]["accuracy"] == 1.0 and rows["baseline"]["accuracy"] == 0.5
    assert summarize(records, temperature=0.7)[0]["identical"] is None


def test_write_reports_from_records_only(tmp_path, data_dir, tiny):
    model, tokenizer = tiny
    records = run_eval(model, tokenizer, load("mt_bench", data_dir, limit=2), build(model),
                       tmp_path, max_new_tokens=8, config=CONFIG, warmup=0)
    rows = write_reports(read_records(tmp_path / MERGED), tmp_path)
    assert rows == summarize(records)
    assert json.loads((tmp_path / "summary.json").read_text()) == rows


def test_a_loop_generation_carries_its_stats_consistent_with_its_tokens(data_dir, tiny):
    model, tokenizer = tiny
    ids = runner.chat_input_ids(tokenizer, load("mt_bench", data_dir, limit=1)[0].prompt)
    baseline, *loops = build(model)
    assert baseline(ids, 10).stats is None  # Hugging Face generate: no loop
    for method in loops:
        generation = method(ids, 10)
        stats = generation.stats
        assert stats is not None, method.label
        assert stats.new_tokens == len(generation.output_ids) == sum(stats.accepted_lengths)
        assert stats.steps == generation.steps == len(stats.accepted_lengths)
        assert len(stats.tree_sizes) == stats.steps
        assert list(stats.accepted_lengths) == generation.accepted_lengths
        assert stats.draft_time >= 0 and stats.target_time > 0


def test_records_keep_the_loops_statistics(tmp_path, data_dir, tiny):
    model, tokenizer = tiny
    records = run_eval(model, tokenizer, load("gsm8k", data_dir, limit=2), build(model),
                       tmp_path, max_new_tokens=8, config=CONFIG, warmup=0)
    assert read_records(tmp_path / MERGED) == records
    for record in records:
        loop = record["loop"]
        if record["method"] == "baseline":
            assert loop is None
            continue
        assert len(loop["tree_sizes"]) == record["steps"] == len(record["accepted_lengths"])
        assert sum(record["accepted_lengths"]) == record["new_tokens"]
        assert 0 <= loop["draft_time"] and 0 < loop["target_time"] <= record["wall_time"]


def test_build_methods_loads_the_draft_model_once_and_only_when_needed(tiny):
    from evals.methods import build_methods
    from specdec.errors import UsageError

    model, tokenizer = tiny
    loads = []

    def load_draft_model():
        loads.append(1)
        return tiny_model()

    built = build_methods(parse_methods("pld,trie"), model, tokenizer, SamplingSettings(),
                          load_draft_model=load_draft_model)
    assert [m.label for m in built] == ["pld", "trie"] and loads == []
    built = build_methods(parse_methods("hf-assisted,small-lm:depth=2"), model, tokenizer,
                          SamplingSettings(), load_draft_model=load_draft_model)
    assert loads == [1] and built[0].generate_kwargs["assistant_model"] is built[1].drafter.model
    assert built[0].eos_token_id == model.generation_config.eos_token_id
    with pytest.raises(UsageError, match="method 'small-lm:depth=2': needs a draft model"):
        build_methods(parse_methods("small-lm:depth=2"), model, tokenizer, SamplingSettings())


def test_the_eval_cli_builds_its_methods_with_build_methods(monkeypatch, tmp_path, data_dir):
    import evals.methods
    from specdec.cli import main

    calls = []
    original = evals.methods.build_methods

    def spy(specs, *args, **kwargs):
        calls.append([spec.label for spec in specs])
        return original(specs, *args, **kwargs)

    monkeypatch.setattr(evals.methods, "build_methods", spy)
    assert main(["eval", "--model", str(save_tiny(tmp_path / "tiny")), "--data-dir",
                 str(data_dir), "--datasets", "gsm8k", "--methods", "baseline,pld", "--limit",
                 "1", "--max-new-tokens", "4", "--out", str(tmp_path / "run"),
                 "--warmup", "0"]) == 0
    assert calls == [["baseline", "pld"]]
