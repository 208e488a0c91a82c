"""Prompt lookup and the n-gram trie propose what their definitions say."""

import pytest
import torch

import drafters
from specdec.sampling import SamplingConfig
from specdec.state import DecodingState


def state_of(tokens, vocab=100, max_new_tokens=50):
    return DecodingState(tokens=list(tokens), prompt_length=len(tokens), vocab_size=vocab,
                         sampling=SamplingConfig(), generator=None,
                         max_new_tokens=max_new_tokens, device=torch.device("cpu"))


def test_prompt_lookup_drafts_after_the_longest_match():
    text = [7, 8, 1, 2, 3, 9, 7, 8, 4, 5, 6, 0, 7, 8]  # the tail "7 8" occurred twice before
    first = drafters.get("pld", num_draft_tokens=3, max_ngram=2)
    tree = first.propose(state_of(text))
    assert tree.tokens == [1, 2, 3] and tree.parent_list == [-1, 0, 1]
    assert tree.sampling_of(-1) == "deterministic"
    last = drafters.get("pld", num_draft_tokens=3, max_ngram=2, match="last")
    assert last.propose(state_of(text)).tokens == [4, 5, 6]
    # no bigram match: a unigram "8" match counts only when min_ngram allows it
    assert len(first.propose(state_of([8, 3, 1, 5, 8]))) == 0
    unigram = drafters.get("pld", num_draft_tokens=3, max_ngram=2, min_ngram=1)
    assert unigram.propose(state_of([8, 3, 1, 5, 8])).tokens == [3, 1, 5]
    assert len(first.propose(state_of([1, 2, 3, 4]))) == 0  # nothing to look up
    # never drafts more than the remaining budget allows
    assert first.propose(state_of([7, 8, 4, 5, 6, 7, 8], max_new_tokens=2)).tokens == [4]


def test_trie_merges_continuations_by_frequency_within_budget():
    trie = drafters.get("trie", node_budget=4, max_depth=3, max_ngram=2, min_ngram=1)
    text = [1, 2, 5, 6, 9,  1, 2, 5, 6, 8,  1, 2, 7, 3, 3,  1, 2]
    state = state_of(text)
    trie.begin(state)
    tree = trie.propose(state)
    # occurrences of "1 2" continue with 5 6 9 / 5 6 8 / 7 3 3: prefix counts 5:2, 5-6:2, then
    # count-1 prefixes, shallowest first: 7, then 7-3 (depth 2) before 5-6-9 and 5-6-8 (depth 3)
    assert tree.tokens == [5, 6, 7, 3] and tree.parent_list == [-1, 0, -1, 2]
    for node, parent in enumerate(tree.parent_list):
        assert parent < node


def test_trie_uses_an_external_corpus_and_checks_its_vocabulary():
    trie = drafters.get("trie", corpus=[[40, 41, 42, 43, 44]], node_budget=8, max_depth=4)
    state = state_of([3, 40, 41])
    trie.begin(state)
    assert trie.propose(state).tokens == [42, 43, 44]
    bad = drafters.get("trie", corpus=[[1, 2, 300]])
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        bad.begin(state_of([1, 2]))


def test_trie_reads_a_token_corpus_file_and_rejects_bad_ones(tmp_path):
    good = tmp_path / "answers.jsonl"
    good.write_text('{"tokens": [40, 41, 42, 43, 44]}\n\n{"index": 1, "tokens": [7, 8]}\n')
    trie = drafters.get("trie", corpus_file=str(good), node_budget=8, max_depth=4)
    state = state_of([3, 40, 41])
    trie.begin(state)
    assert trie.propose(state).tokens == [42, 43, 44]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        drafters.get("trie", corpus_file=str(tmp_path / "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"tokens": [1, 2]}\n{"text": "no tokens here"}\n')
    with pytest.raises(ValueError, match="broken.jsonl:2 is not a JSON object"):
        drafters.get("trie", corpus_file=str(broken))
    negative = tmp_path / "negative.jsonl"
    negative.write_text('{"tokens": [1, -2]}\n')
    with pytest.raises(ValueError, match="list of token ids"):
        drafters.get("trie", corpus_file=str(negative))


def test_bad_drafter_settings():
    with pytest.raises(ValueError, match="num_draft_tokens >= 1"):
        drafters.get("pld", num_draft_tokens=0)
    with pytest.raises(ValueError, match="node_budget >= 1"):
        drafters.get("trie", node_budget=0)


def reference_continuation(tokens, max_ngram, min_ngram, length, match):
    """The obvious loop: longest tail n-gram first, then the first or latest occurrence."""
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        tail = tokens[-n:]
        starts = range(len(tokens) - n)
        for start in (starts if match == "first" else reversed(starts)):
            if tokens[start:start + n] == tail:
                return tokens[start + n: start + n + length]
    return []


def test_prompt_lookup_search_agrees_with_the_obvious_loop():
    import random

    import numpy as np

    from drafters.prompt_lookup import find_continuation

    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(6) for _ in range(rng.randint(1, 40))]
        max_ngram = rng.randint(1, 4)
        min_ngram = rng.randint(1, max_ngram)
        for match in ("first", "last"):
            fast = find_continuation(np.asarray(tokens), max_ngram, min_ngram, 5, match)
            assert fast == reference_continuation(tokens, max_ngram, min_ngram, 5, match)
