"""Tiny random models for the eval tests (imported by the other test_evals_* files), and the
method layer on them: spec parsing, and lossless methods reproducing the baseline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.methods import Method, SamplingSettings, parse_method, parse_methods

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_tokenizer(vocab_size: int = 128):
    """A character-level tokenizer over printable ASCII, padded to ``vocab_size`` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<s>", "</s>", "<unk>", "\n"] + [chr(i) for i in range(32, 127)]
    symbols += [f"<extra{i}>" for i in range(vocab_size - len(symbols))]
    core = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(vocab_size: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return LlamaForCausalLM(config).eval()


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """A tiny model + tokenizer checkpoint that ``specdec.cli.load_model(folder)`` loads."""
    tiny_model(seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_tokenizer_round_trips_text():
    tokenizer = tiny_tokenizer()
    text = "def f(x):\n    return x + 1  # ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_parse_methods_keeps_option_commas_with_their_method():
    specs = parse_methods("baseline,hf-pld,trie:node_budget=8,max_depth=4+exact,"
                          "small-lm:branching=[2,1],depth=2")
    assert [s.label for s in specs] == ["baseline", "hf-pld",
                                        "trie:node_budget=8,max_depth=4+exact",
                                        "small-lm:branching=[2,1],depth=2"]
    trie = specs[2]
    assert (trie.name, trie.kwargs, trie.verifier) == ("trie", {"node_budget": 8, "max_depth": 4},
                                                       "exact")
    assert specs[3].kwargs == {"branching": [2, 1], "depth": 2}
    assert specs[3].needs_draft_model


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "valid: baseline"),
    ("pld+nonsense", "unknown verifier 'nonsense'"),
    ("baseline+greedy", "takes no verifier"),
    ("trie:node_budget", "must look like key=value"),
])
def test_parse_method_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


def test_lossless_methods_reproduce_the_baseline_greedy():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    draft = tiny_model(seed=1)
    prompt = tokenizer("abcabcabc the cat sat on the mat", return_tensors="pt").input_ids
    sampling = SamplingSettings()
    outputs = {}
    for spec in parse_methods("baseline,hf-pld,hf-assisted,pld,trie:node_budget=4+exact,"
                              "small-lm:depth=2"):
        method = Method(spec, model, sampling, eos_token_id=1, pad_token_id=1, draft_model=draft)
        generation = method(prompt, 24)
        assert method.lossless
        assert generation.wall_time > 0 and generation.steps >= 1
        outputs[spec.label] = generation
    baseline = outputs["baseline"]
    assert baseline.steps == len(baseline.output_ids)  # one target forward per token
    assert 1 <= len(baseline.output_ids) <= 24
    for label, generation in outputs.items():
        assert generation.output_ids == baseline.output_ids, label
    assert outputs["pld"].accepted_lengths is not None
    assert sum(outputs["pld"].accepted_lengths) == len(baseline.output_ids)


def test_sampled_methods_are_reproducible_from_the_seed():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    prompt = tokenizer("abcabcabc the cat sat", return_tensors="pt").input_ids
    for spec in parse_methods("baseline,pld+exact"):
        runs = [Method(spec, model, SamplingSettings(temperature=1.0, seed=seed),
                       eos_token_id=1)(prompt, 16).output_ids for seed in (3, 3, 4)]
        assert runs[0] == runs[1], spec.label
        assert runs[0] != runs[2], spec.label  # 16 tokens over 128 ids: equal by chance ~never


def test_cli_dataset_selection():
    from types import SimpleNamespace

    from evals.cli import _dataset_names

    assert _dataset_names(SimpleNamespace(datasets=None, data=[])) == [
        "mt_bench", "gsm8k", "humaneval"]
    assert _dataset_names(SimpleNamespace(datasets=None, data=["q.jsonl"])) == ["q.jsonl"]
    assert _dataset_names(SimpleNamespace(datasets="gsm8k", data=["q.jsonl"])) == [
        "gsm8k", "q.jsonl"]


def test_drafter_names_ending_in_plus_keep_their_verifier_apart():
    import drafters

    assert "hydra++" in drafters.available()
    assert (parse_method("hydra++").name, parse_method("hydra++").verifier) == ("hydra++", None)
    spec = parse_method("hydra++:depth=3+exact")
    assert (spec.name, spec.kwargs, spec.verifier) == ("hydra++", {"depth": 3}, "exact")
