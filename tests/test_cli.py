"""``specdec generate``: every documented bad input (docs/errors.md) is one line with exit status 2,
refused before the model loads where it can be; the verifier follows the temperature, lossy ones
are announced, LANTERN gets the target's embeddings, text is streamed as it is accepted."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specdec.cli
from specdec.cli import main
from specdec.errors import UsageError
from specdec.options import check_kwargs, parse_kwargs, parse_pair
from test_evals_tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "errors.md"
AFTER_LOAD = "*(after load)*"


def documented_rows(command: str) -> list[tuple[list[str], str, bool]]:
    """(arguments after ``specdec COMMAND``, message, refused only after the model loads) of
    every row of the command-line table in docs/errors.md for ``command``."""
    text = DOCS.read_text(encoding="utf-8").split("<!-- rows: command line -->", 1)[1]
    rows = []
    for line in text.split("\n## ", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if not line.startswith("| ") or len(cells) != 2 or cells[0] == "bad input":
            continue
        words = shlex.split(re.search(r"`([^`]*)`", cells[0]).group(1))
        assert words[0] == "specdec", cells[0]
        if words[1] == command:
            rows.append((words[2:], cells[1].strip("`"), AFTER_LOAD in cells[0]))
    return rows


def message_pattern(message: str) -> re.Pattern:
    """The documented message as a regex: ``<...>`` parts match any text."""
    return re.compile(re.sub(r"<[^>]+>", ".+", re.escape(message)))


def row_id(row) -> str:
    return " ".join(row[0]) or "''"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads; ``loads.forbid()`` makes loading fail the test."""
    real = specdec.cli.load_model

    class Loads:
        count = 0
        allowed = True

        def forbid(self):
            self.allowed = False

    loads = Loads()

    def counted(*args, **kwargs):
        assert loads.allowed, "the model loaded before the bad input was refused"
        loads.count += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(specdec.cli, "load_model", counted)
    return loads


def no_cuda(monkeypatch) -> None:
    """The same message on every machine: a PyTorch build without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


def assert_refused(capsys, code: int, message: str, after_load: bool) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if not after_load:  # nothing else ran: the message is all there is
        assert len(lines) == 1, err
    assert message_pattern(message).fullmatch(lines[-1]), (lines[-1], message)


@pytest.mark.parametrize("row", documented_rows("generate"), ids=row_id)
def test_documented_generate_refusals(row, checkpoint, loads, capsys, monkeypatch, tmp_path):
    words, message, after_load = row
    monkeypatch.chdir(tmp_path)
    no_cuda(monkeypatch)
    if not after_load:
        loads.forbid()
    code = main(["generate", "--prompt", "ab ab ab", "--model", checkpoint,
                 "--max-new-tokens", "4", *words])
    assert_refused(capsys, code, message, after_load)
    assert loads.count == (1 if after_load else 0)


def test_every_generate_check_is_documented():
    rows = {" ".join(words) for words, _, _ in documented_rows("generate")}
    for flag in ("--temperature", "--top-p", "--top-k", "--max-new-tokens", "--device",
                 "--drafter", "--verifier", "--drafter-arg", "--verifier-arg", "--prompt"):
        assert any(row.startswith(flag) for row in rows), flag


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "hi", "--dtype", "float33"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("specdec generate: error: argument --dtype: invalid choice: 'float33'")


def test_a_refusal_in_a_fresh_process_has_no_traceback(tmp_path):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "specdec.cli", "generate", "--prompt", "hi",
                           "--temperature", "nan"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "specdec generate: --temperature must be a finite number >= 0, got nan\n"
    assert done.stdout == ""


def test_help_shows_defaults_and_the_valid_names(capsys):
    import drafters
    import verifiers

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    # argparse wraps lines, also after a hyphen
    out = " ".join(re.sub(r"-\s*\n\s*", "-", capsys.readouterr().out).split())
    assert "(default: 128)" in out and "(default: pld)" in out and "(default: auto)" in out
    for name in drafters.available() + verifiers.available():
        assert name in out, name


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every `speculative_generate` call (which still runs)."""
    import specdec.loop

    real, seen = specdec.loop.speculative_generate, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        out = real(*args, **kwargs)
        kwargs["output"] = out
        return out

    monkeypatch.setattr(specdec.loop, "speculative_generate", spy)
    return seen


def generate(checkpoint, *words):
    return main(["generate", "--prompt", "ab ab ab ab", "--model", checkpoint,
                 "--max-new-tokens", "12", *words])


def test_auto_verifier_follows_the_temperature(checkpoint, calls, capsys):
    cases = [("0", "greedy", "GreedyRule"), ("0.8", "exact", "ExactRule")]
    for temperature, verifier, rule in cases:
        assert generate(checkpoint, "--temperature", temperature) == 0
        captured = capsys.readouterr()
        assert f"verifier {verifier}, temperature {float(temperature)}" in captured.out
        assert type(calls[-1]["verifier"]).__name__ == rule
        assert "lossy" not in captured.err


def test_a_lossy_verifier_is_announced_on_stderr(checkpoint, capsys):
    assert generate(checkpoint, "--verifier", "typical", "--temperature", "0.8") == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == ["specdec generate: note: verifier 'typical' is lossy, so the output is not "
                     "distributed as the target's own sampling"]


def test_lantern_gets_the_targets_input_embeddings(checkpoint, calls, capsys):
    assert generate(checkpoint, "--verifier", "lantern", "--verifier-arg", "delta=0.2",
                    "--verifier-arg", "k=3", "--temperature", "0.7") == 0
    rule = calls[0]["verifier"]
    assert calls[0]["output"].stats.new_tokens >= 1
    model = specdec.cli.load_model(checkpoint)[0]
    expected = torch.nn.functional.normalize(model.get_input_embeddings().weight.float(), dim=-1)
    torch.testing.assert_close(rule.unit_embeddings, expected)
    assert (rule.k, rule.delta) == (3, 0.2)


def test_text_is_streamed_as_tokens_are_accepted(checkpoint, calls, capsys):
    assert generate(checkpoint, "--no-chat") == 0
    out = capsys.readouterr().out
    streamer = calls[0]["streamer"]
    assert callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))
    tokenizer = streamer.tokenizer
    text = tokenizer.decode(calls[0]["output"].new_token_ids, skip_special_tokens=True)
    assert out.startswith(text + "\n")  # printed by the streamer, then the statistics
    assert out.count(text) == 1


def test_zero_top_k_and_unit_top_p_mean_no_truncation(checkpoint, calls, capsys):
    assert generate(checkpoint, "--temperature", "0.8", "--top-k", "0", "--top-p", "1") == 0
    assert (calls[0]["top_k"], calls[0]["top_p"]) == (None, None)
    assert generate(checkpoint, "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9") == 0
    assert (calls[1]["top_k"], calls[1]["top_p"]) == (5, 0.9)


def test_small_lm_needs_and_uses_a_draft_model(checkpoint, calls, loads, capsys):
    assert generate(checkpoint, "--drafter", "small-lm") == 2
    assert capsys.readouterr().err == ("specdec generate: drafter 'small-lm' needs --drafter-arg "
                                       "model=VALUE\n")
    assert loads.count == 0
    assert generate(checkpoint, "--drafter", "small-lm", "--drafter-arg", f"model={checkpoint}",
                    "--drafter-arg", "depth=2") == 0
    assert loads.count == 2  # the target and the draft model
    assert calls[0]["drafter"].depth == 2


def test_an_interrupted_generation_is_one_line(checkpoint, monkeypatch, capsys):
    import specdec.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(specdec.loop, "speculative_generate", interrupted)
    assert generate(checkpoint) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "specdec generate: interrupted"


# ---------------------------------------------------------------------------------- options
def test_key_value_pairs_parse_as_literals_or_strings():
    assert parse_kwargs(["depth=3", "branching=[2, 1]", "mode=iid", "max-frontier=None",
                         "name=a=b", "depth=4"], "--drafter-arg") == {
        "depth": 4, "branching": [2, 1], "mode": "iid", "max_frontier": None, "name": "a=b"}
    assert parse_pair(" k = 2 ", "--x") == ("k", 2)
    for bad in ("depth", "=3", ""):
        with pytest.raises(UsageError, match=f"--drafter-arg {re.escape(repr(bad))} must look "
                                             f"like key=value"):
            parse_kwargs([bad], "--drafter-arg")


def test_keyword_checks_read_the_constructor_signature():
    class Rule:
        def __init__(self, embeddings, k: int = 8):
            pass

    check_kwargs(Rule, {"k": 2}, "--verifier-arg", "verifier 'r'", supplied=["embeddings"])
    with pytest.raises(UsageError, match="verifier 'r' needs --verifier-arg embeddings=VALUE"):
        check_kwargs(Rule, {"k": 2}, "--verifier-arg", "verifier 'r'")
    with pytest.raises(UsageError, match="has no option 'q'; its options: embeddings, k"):
        check_kwargs(Rule, {"q": 1}, "--verifier-arg", "verifier 'r'", supplied=["embeddings"])


# ---------------------------------------------------------------------------------- embedded
@pytest.mark.slow
def test_embedded_model_streams_its_greedy_text_and_runs_lantern(embedded, calls, monkeypatch,
                                                                 capsys):
    model, tokenizer = embedded
    monkeypatch.setattr(specdec.cli, "load_model", lambda *args, **kwargs: (model, tokenizer))
    prompt = "List three colours of the rainbow."
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    input_ids = specdec.cli.encode_prompt(tokenizer, prompt, chat=True)
    reference = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                               do_sample=False, max_new_tokens=24,
                               eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.eos_token_id)[0, input_ids.shape[1]:]
    assert calls[0]["output"].new_token_ids == reference.tolist()
    assert out.startswith(tokenizer.decode(reference, skip_special_tokens=True) + "\n")

    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "16", "--verifier",
                 "lantern", "--temperature", "0.7"]) == 0
    assert calls[1]["verifier"].unit_embeddings.shape == model.get_input_embeddings().weight.shape
    assert "verifier lantern" in capsys.readouterr().out

