"""Greedy losslessness: every drafter x {greedy, exact} at temperature 0 reproduces
``model.generate(do_sample=False)`` token for token, on tiny architectures and on the embedded
model; and ``specdec.wrap`` keeps ``model.generate`` working."""

import pytest
import torch

import drafters
import specdec
from conftest import ARCHS, humaneval_prompts, mt_bench_prompts, perturbed_copy, tiny_model
from specdec import speculative_generate


def hf_greedy(model, input_ids, max_new_tokens, eos_token_id=None):
    with torch.no_grad():
        return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos_token_id, pad_token_id=0,
                              attention_mask=torch.ones_like(input_ids))


def make_drafter(name, target):
    if name == "small-lm":
        return drafters.get("small-lm", model=perturbed_copy(target, 0.02), depth=3)
    if name == "small-lm-tree":
        return drafters.get("small-lm", model=perturbed_copy(target, 0.02), depth=3,
                            branching=[3, 2, 1], max_frontier=4)
    # short random-model outputs repeat only short n-grams, so allow unigram lookups here
    return drafters.get(name, min_ngram=1)


DRAFTERS = ["pld", "trie", "small-lm", "small-lm-tree"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drafter", DRAFTERS)
@pytest.mark.parametrize("verifier", ["greedy", "exact"])
def test_tiny_models_match_generate(arch, drafter, verifier):
    target = tiny_model(arch, scale=4.0)
    prompt = torch.tensor([[2, 7, 1, 8, 2, 8, 1, 8, 2, 8]])
    reference = hf_greedy(target, prompt, 60)
    out = speculative_generate(target, prompt, drafter=make_drafter(drafter, target),
                               verifier=verifier, max_new_tokens=60, eos_token_id=None)
    assert out.sequences.tolist() == reference.tolist()
    assert out.stats.new_tokens == 60 == sum(out.stats.accepted_lengths)
    assert out.stats.tau > 1.0  # drafts were accepted, so the comparison means something


def test_eos_stops_exactly_like_generate():
    target = tiny_model("llama", scale=4.0)
    prompt = torch.tensor([[5, 6, 7]])
    free = hf_greedy(target, prompt, 40)[0, 3:].tolist()
    eos = free[12]  # a token the greedy continuation emits
    reference = hf_greedy(target, prompt, 40, eos_token_id=eos)
    out = speculative_generate(target, prompt, drafter="pld", verifier="greedy",
                               max_new_tokens=40, eos_token_id=eos)
    assert out.sequences.tolist() == reference.tolist()
    assert out.new_token_ids[-1] == eos and eos not in out.new_token_ids[:-1]


def test_max_new_tokens_is_never_exceeded():
    target = tiny_model("llama", scale=4.0)
    drafter = make_drafter("small-lm", target)
    for n in (1, 2, 3, 7):
        out = speculative_generate(target, [[1, 2, 3]], drafter=drafter, verifier="greedy",
                                   max_new_tokens=n)
        assert len(out.new_token_ids) == n == out.stats.new_tokens


class Collect:
    """A minimal streamer: transformers streamers receive the prompt, then new tokens."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_wrap_keeps_generate_and_honours_generation_config():
    target = tiny_model("llama", scale=4.0)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    target.generation_config.eos_token_id = None  # the config's default (2) would stop early
    reference = hf_greedy(target, prompt, 30)
    specdec.wrap(target, drafter="trie", verifier="exact")
    streamer = Collect()
    out = target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                          max_new_tokens=30, do_sample=False, streamer=streamer)
    assert out.tolist() == reference.tolist()
    assert streamer.chunks[0] == prompt[0].tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == reference[0, 8:].tolist()
    stats = specdec.last_stats(target)
    assert stats.new_tokens == 30 and stats.steps <= 30
    # sampling arguments reach the loop: same seed, same sample; top_k=1 is greedy again
    seeded = [target.generate(prompt, max_new_tokens=12, do_sample=True, temperature=0.9,
                              generator=torch.Generator().manual_seed(3)).tolist()
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    top1 = target.generate(prompt, max_new_tokens=30, do_sample=True, top_k=1)
    assert top1.tolist() == reference.tolist()
    with pytest.raises(ValueError, match="num_beams=2 is not supported"):
        target.generate(prompt, max_new_tokens=5, num_beams=2)
    specdec.unwrap(target)
    assert hf_greedy(target, prompt, 30).tolist() == reference.tolist()


# ---------------------------------------------------------------- the embedded model

def chat_ids(tokenizer, text):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids


@pytest.mark.slow
@pytest.mark.parametrize("source,index", [("mt_bench", 0), ("mt_bench", 1), ("humaneval", 0),
                                          ("humaneval", 1)])
def test_embedded_model_matches_generate(embedded, source, index):
    model, tokenizer = embedded
    if source == "mt_bench":
        ids = chat_ids(tokenizer, mt_bench_prompts(index + 1)[index])
    else:
        ids = tokenizer(humaneval_prompts(index + 1)[index], return_tensors="pt").input_ids
    reference = hf_greedy(model, ids, 128, eos_token_id=tokenizer.eos_token_id)
    for drafter in ("pld", "trie"):
        for verifier in ("greedy", "exact"):
            out = speculative_generate(model, ids, drafter=drafter, verifier=verifier,
                                       max_new_tokens=128, eos_token_id=tokenizer.eos_token_id)
            assert out.sequences.tolist() == reference.tolist(), (drafter, verifier)


@pytest.mark.slow
def test_embedded_model_with_a_small_lm_tree_drafter(embedded):
    """The small-LM drafter on the real model (drafting with the target itself, as a tree)."""
    model, tokenizer = embedded
    ids = chat_ids(tokenizer, mt_bench_prompts(3)[2])
    reference = hf_greedy(model, ids, 48, eos_token_id=tokenizer.eos_token_id)
    drafter = drafters.get("small-lm", model=model, depth=2, branching=[2, 1])
    for verifier in ("greedy", "exact"):
        out = speculative_generate(model, ids, drafter=drafter, verifier=verifier,
                                   max_new_tokens=48, eos_token_id=tokenizer.eos_token_id)
        assert out.sequences.tolist() == reference.tolist()
        assert out.stats.tau > 2.5
