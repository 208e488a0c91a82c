"""The benchmark scripts on tiny models: each one's main end to end, both speed ratios, the eval's
prompts, bad input refused before the model loads, and the long-prompt file."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals import datasets as eval_datasets
from evals.methods import Method
from test_evals_tiny import save_tiny, tiny_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their harness as a sibling module
harness = importlib.import_module("_harness")
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

PROMPTS = ["abcabcabc the cat sat on the mat, abcabcabc the cat sat",
           "def f(x):\n    return x + 1\n\ndef g(x):\n    return f(x) + f(x)"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "category": "test", "turns": [text]})
                            + "\n" for i, text in enumerate(PROMPTS)), encoding="utf-8")
    return str(path)


def script(name: str):
    return importlib.import_module(name)


def common(tiny: str, questions: str, tokens: int = 6) -> list[str]:
    return ["--model", tiny, "--data", questions, "--limit", "2", "--max-new-tokens", str(tokens)]


def assert_both_ratios(rows: list[dict], methods: list[str], output: str) -> None:
    """One row per method, the references first, each with both ratios to same-run references."""
    assert [row["method"] for row in rows] == ["baseline", "none"] + methods
    for row in rows:
        assert row["speedup_vs_baseline"] > 0 and row["speedup_vs_none"] > 0, row["method"]
    by_method = {row["method"]: row for row in rows}
    assert by_method["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert by_method["none"]["speedup_vs_none"] == pytest.approx(1.0)
    header = next(line for line in output.splitlines() if line.startswith("| dataset"))
    assert "speedup vs baseline" in header and "speedup vs none" in header
    for method in ["baseline", "none"] + methods:
        assert f"| {method} |" in output


def test_bench_core_reports_both_ratios(tiny, questions, capsys):
    rows = script("bench_core").main(common(tiny, questions) + ["--methods", "pld,trie"])
    assert_both_ratios(rows, ["pld", "trie"], capsys.readouterr().out)
    assert all(row["identical"] == 1.0 for row in rows)  # greedy and lossless: HF's output


def test_bench_trained_reports_both_ratios_and_loop_statistics(tiny, questions, capsys):
    rows = script("bench_trained").main(common(tiny, questions)
                                        + ["--methods", "trie:node_budget=4"])
    assert_both_ratios(rows, ["trie:node_budget=4"], capsys.readouterr().out)
    trie = rows[-1]
    assert all(r["loop"] is not None and len(r["loop"]["tree_sizes"]) == r["steps"]
               for r in trie["records"])
    assert all(r["loop"] is None for r in rows[0]["records"])  # HF generate has no loop stats
    assert 0 <= harness.median_of(trie, harness.draft_share) < 1


def test_bench_settings_compares_against_the_first_setting(tiny, questions, capsys, tmp_path):
    out = tmp_path / "rows.json"
    settings = ["trie:node_budget=2", "trie:node_budget=6"]
    rows = script("bench_settings").main(common(tiny, questions) + [
        "--methods", ",".join(settings), "--json", str(out)])
    assert_both_ratios(rows, settings, capsys.readouterr().out)
    by_method = {row["method"]: row for row in rows}
    assert by_method[settings[0]]["time_vs_first"] == pytest.approx(1.0)
    assert all(row["equal_to_first"] == 1.0 for row in rows)
    written = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["speedup_vs_none"]) for r in written] == [
        (r["method"], r["speedup_vs_none"]) for r in rows]


def test_bench_budget_reports_both_ratios_and_budget_choices(tiny, questions, capsys,
                                                            monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))  # the latency profile is measured here
    methods = ["trie", "trie:tree_budget=auto"]
    rows = script("bench_budget").main(common(tiny, questions) + ["--methods", ",".join(methods)])
    output = capsys.readouterr().out
    assert "latency profile" in output
    assert_both_ratios(rows, methods, output)
    budgeted = rows[-1]
    assert budgeted["expected_verify_ms"] > 0 and budgeted["drafted_nodes"] >= 0
    assert rows[2]["expected_verify_ms"] is None  # the trie without a budget


def test_replay_ngram_reports_both_ratios(tiny, questions, capsys):
    rows = script("replay_ngram").main(common(tiny, questions, tokens=12)
                                       + ["--methods", "pld,trie"])
    assert_both_ratios(rows, ["pld", "trie"], capsys.readouterr().out)
    assert [row["estimated"] for row in rows] == [False, False, True, True]


def test_replay_refuses_drafters_it_cannot_replay_before_loading(questions):
    with pytest.raises(harness.UsageError, match="cannot be replayed"):
        script("replay_ngram").main(["--model", "/no/such/model", "--data", questions,
                                     "--methods", "pld+exact"])


def test_bench_multidraft_reports_acceptance_and_both_ratios(tiny, questions, capsys):
    spec = "small-lm:depth=2,branching=[2,1],mode=iid+exact"
    result = script("bench_multidraft").main(common(tiny, questions) + [
        "--methods", spec, "--timed-limit", "1", "--positions", "1", "--top-k", "4"])
    output = capsys.readouterr().out
    assert_both_ratios(result["rows"], [spec], output)
    acceptance = result["acceptance"]
    for k in (1, 2, 3, 4):  # no lossless rule beats the optimal coupling
        assert acceptance["exact-iid"][k] <= acceptance["bound-iid"][k] + 1e-9
    assert all(row["n"] == 1 for row in result["rows"])  # --timed-limit prompts per set


def test_bench_gemm_takes_a_model(tiny, capsys):
    script("bench_gemm").main(["--model", tiny, "--sizes", "1,2", "--repeats", "1",
                               "--warmup", "0", "--context", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| 1 |") for line in lines)
    assert any(line.startswith("| 2 |") for line in lines)


@pytest.mark.parametrize("name, extra", [
    ("bench_core", ["--methods", "pld"]),
    ("bench_trained", ["--methods", "pld"]),
    ("replay_ngram", ["--methods", "pld"]),
])
def test_scripts_time_the_eval_runners_prompts(name, extra, tiny, monkeypatch):
    seen = set()
    call = Method.__call__

    def spy(self, input_ids, max_new_tokens):
        seen.add(tuple(input_ids[0].tolist()))
        return call(self, input_ids, max_new_tokens)

    monkeypatch.setattr(Method, "__call__", spy)
    sets = ["mt_bench", "gsm8k", "humaneval"]
    script(name).main(["--model", tiny, "--datasets", ",".join(sets), "--data-dir", str(DATA_DIR),
                       "--limit", "1", "--max-new-tokens", "2"] + extra)
    tokenizer = tiny_tokenizer()
    expected = {tuple(eval_datasets.chat_input_ids(tokenizer, example.prompt)[0].tolist())
                for dataset in sets for example in eval_datasets.load(dataset, DATA_DIR, 1)}
    assert seen == expected


def test_harness_examples_and_prompts_are_the_eval_runners(questions):
    import argparse

    parser = argparse.ArgumentParser()
    harness.add_arguments(parser, methods="pld", datasets="mt_bench,humaneval")
    tokenizer = tiny_tokenizer()
    args = parser.parse_args(["--data-dir", str(DATA_DIR), "--limit", "3"])
    examples = harness.load_examples(args)
    expected = [example for name in ("mt_bench", "humaneval")
                for example in eval_datasets.load(name, DATA_DIR, 3)]
    assert examples == expected
    for example in examples:
        assert harness.input_ids(tokenizer, example).tolist() == eval_datasets.chat_input_ids(
            tokenizer, example.prompt).tolist()
    # --data alone replaces the default sets, as in specdec eval
    only = harness.load_examples(parser.parse_args(["--data", questions]))
    assert [example.prompt for example in only] == PROMPTS
    both = harness.load_examples(parser.parse_args(["--datasets", "gsm8k", "--data", questions,
                                                    "--data-dir", str(DATA_DIR), "--limit", "1"]))
    assert [example.dataset for example in both] == ["gsm8k", "short"]


def test_both_references_run_once_whatever_the_methods():
    assert [s.label for s in harness.method_specs("trie")] == ["baseline", "none", "trie"]
    assert [s.label for s in harness.method_specs("none,pld,baseline")] == [
        "none", "pld", "baseline"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nonsense"], "unknown method 'nonsense'"),
    (["--datasets", "no_such_set"], "unknown dataset 'no_such_set'"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_input_is_refused_before_the_model_loads(argv, message, questions):
    with pytest.raises(harness.UsageError, match=message):
        script("bench_trained").main(["--model", "/no/such/model", "--data", questions] + argv)


def test_bad_input_on_the_command_line_exits_2_with_one_line():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_core.py"), "--methods", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "unknown method 'x'" in done.stderr and "Traceback" not in done.stderr


def test_long_prompt_file_has_20_prompts_in_range():
    examples = eval_datasets.load(str(harness.LONG_PROMPTS))
    rows = [json.loads(line) for line in harness.LONG_PROMPTS.read_text().splitlines()]
    assert len(examples) == len(rows) == 20
    assert {example.dataset for example in examples} == {"summarize"}
    assert all(600 <= row["prompt_tokens"] <= 1000 for row in rows)  # counted when built
    make = script("make_long_prompts")
    assert all(ex.prompt.startswith(make.INSTRUCTION.split("{text}")[0]) for ex in examples)


@pytest.mark.slow
def test_long_prompt_file_is_rebuilt_identically_with_the_stored_counts():
    from drafters.train import iter_conversations

    make = script("make_long_prompts")
    tokenizer = make.embedded_tokenizer()
    rows = [json.loads(line) for line in harness.LONG_PROMPTS.read_text().splitlines()]
    assert [make.prompt_tokens(tokenizer, row["turns"][0]) for row in rows] == [
        row["prompt_tokens"] for row in rows]
    assert make.build(tokenizer, iter_conversations("sharegpt")) == rows


def _swaps_speculative_generate(node) -> bool:
    """An assignment, deletion or patch call that replaces ``speculative_generate``."""
    def named(target) -> bool:
        if isinstance(target, (ast.Tuple, ast.List)):
            return any(map(named, target.elts))
        return (isinstance(target, ast.Name) and target.id == "speculative_generate"
                or isinstance(target, ast.Attribute) and target.attr == "speculative_generate")

    if isinstance(node, (ast.Assign, ast.Delete)):
        return any(map(named, node.targets))
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return named(node.target)
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        return name in ("setattr", "patch", "object") and any(
            isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            and arg.value.endswith("speculative_generate") for arg in node.args)
    return False


def test_no_benchmark_swaps_speculative_generate():
    swapped = [f"{path.name}:{node.lineno}" for path in sorted(BENCHMARKS.glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if _swaps_speculative_generate(node)]
    assert swapped == []


def test_the_swap_check_sees_assignments_and_patches():
    sources = ["loop.speculative_generate = keep", "speculative_generate, x = f, 1",
               "setattr(loop, 'speculative_generate', keep)",
               "monkeypatch.setattr('specdec.loop.speculative_generate', keep)",
               "mock.patch.object(loop, 'speculative_generate')"]
    for source in sources:
        assert any(map(_swaps_speculative_generate, ast.walk(ast.parse(source)))), source
    assert not any(map(_swaps_speculative_generate, ast.walk(ast.parse(
        "out = loop.speculative_generate(model, ids)"))))


def test_harness_methods_are_the_evals(tiny):
    import argparse

    from evals.methods import Generation

    parser = argparse.ArgumentParser()
    harness.add_arguments(parser, methods="pld", datasets="mt_bench")
    args = parser.parse_args(["--model", tiny])
    model, tokenizer = harness.load_model(args)
    specs = harness.method_specs("pld,trie:node_budget=4")
    methods = harness.build_methods(args, specs, model, tokenizer)
    assert [type(method) for method in methods] == [Method] * 4  # no subclass of its own
    generation = methods[-1](eval_datasets.chat_input_ids(tokenizer, PROMPTS[0]), 6)
    assert isinstance(generation, Generation)
    assert sum(generation.stats.accepted_lengths) == len(generation.output_ids)


def test_a_resumed_benchmark_keeps_the_loops_statistics(tiny, questions, tmp_path, monkeypatch):
    argv = common(tiny, questions) + ["--methods", "trie:node_budget=4", "--out", str(tmp_path)]
    first = script("bench_trained").main(argv)
    calls = []
    call = Method.__call__

    def spy(self, input_ids, max_new_tokens):
        calls.append(self.label)
        return call(self, input_ids, max_new_tokens)

    monkeypatch.setattr(Method, "__call__", spy)
    again = script("bench_trained").main(argv)
    assert calls == []  # every record was read back, none generated again
    loops = [[r["loop"] for r in row["records"]] for row in again]
    assert loops == [[r["loop"] for r in row["records"]] for row in first]
    assert all(loop is not None for loop in loops[-1]) and loops[0] == [None, None]
