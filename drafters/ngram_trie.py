"""N-gram trie drafter: a multi-branch tree of the most frequent continuations of the context.

Every position of the committed text (prompt and generated tokens), and optionally of an external
token corpus (retrieval as in REST), is indexed by the n-grams ending there (n = 1..max_ngram).
Each step the longest tail n-gram of the text that occurred before selects its occurrences; their
continuations (up to ``max_depth`` tokens) are merged into a trie whose nodes count how many
occurrences share that prefix. The ``node_budget`` most frequent prefixes form the draft tree
(a child never counts more than its parent, so the selection is always a connected tree).
Children are ``"deterministic"``.

References:
    He et al. "REST: Retrieval-Based Speculative Decoding". NAACL 2024. arXiv:2311.08252.
    Fu et al. "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding".
    ICML 2024 (n-gram pools verified as a tree). arXiv:2402.02057.
    Saxena. "Prompt Lookup Decoding". 2023.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from drafters.base import DrafterBase
from specdec.state import DecodingState
from specdec.tree import DraftTree


class NgramIndex:
    """n-gram -> positions that follow it, over one growing token sequence."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], list[int]] = defaultdict(list)
        self._indexed = 0  # positions < _indexed have been entered

    def extend(self, tokens: Iterable[int]) -> None:
        self.tokens.extend(tokens)
        # position j is indexed once a token exists there to be drafted
        for j in range(max(self._indexed, 1), len(self.tokens)):
            for n in range(1, min(self.max_ngram, j) + 1):
                self.follows[tuple(self.tokens[j - n: j])].append(j)
        self._indexed = max(self._indexed, len(self.tokens))


def read_token_corpus(path) -> list[list[int]]:
    """Token-id documents from a JSON-lines file, one ``{"tokens": [ids...]}`` object per line
    (the ``*-answers.jsonl`` that ``specdec train --self-distill`` writes beside its features
    is one: the target's own greedy answers, a REST datastore in the target's own words)."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"corpus_file {file} does not exist: give a JSON-lines file with "
                                f'one {{"tokens": [...]}} object per line')
    documents = []
    with open(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tokens = json.loads(line)["tokens"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{file}:{number} is not a JSON object with a \"tokens\" list "
                                 f"({err})") from err
            if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0
                                                       for t in tokens):
                raise ValueError(f"{file}:{number}: \"tokens\" must be a list of token ids >= 0")
            documents.append(tokens)
    return documents


class NgramTrieDrafter(DrafterBase):
    def __init__(self, node_budget: int = 12, max_depth: int = 8, max_ngram: int = 4,
                 min_ngram: int = 2, max_occurrences: int = 32,
                 corpus: Sequence[Sequence[int]] | None = None, corpus_file: str | None = None):
        if node_budget < 1 or max_depth < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                "need node_budget >= 1, max_depth >= 1 and 1 <= min_ngram <= max_ngram"
            )
        if corpus_file is not None:
            corpus = list(corpus or ()) + read_token_corpus(corpus_file)
        self.node_budget = node_budget
        self.max_depth = max_depth
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_occurrences = max_occurrences
        self.corpus = NgramIndex(max_ngram)
        for document in corpus or ():
            self.corpus.extend(document)
            self.corpus.extend([-1])  # a separator no n-gram of real tokens can match across
        self.text = NgramIndex(max_ngram)

    def begin(self, state: DecodingState) -> None:
        self.text = NgramIndex(self.max_ngram)
        bad = [t for t in self.corpus.tokens if t >= state.vocab_size]
        if bad:
            raise ValueError(
                f"corpus token id {bad[0]} is outside the target vocabulary ({state.vocab_size}): "
                f"tokenize the corpus with the target's tokenizer"
            )

    def _occurrences(self, tokens: list[int]) -> list[tuple[list[int], int]]:
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            key = tuple(tokens[len(tokens) - n:])
            found = [(self.text.tokens, j) for j in self.text.follows.get(key, ())[-self.max_occurrences:]]
            found += [(self.corpus.tokens, j) for j in self.corpus.follows.get(key, ())[-self.max_occurrences:]]
            if found:
                return found
        return []

    def propose(self, state: DecodingState) -> DraftTree:
        self.text.extend(state.tokens[len(self.text.tokens):])
        depth = min(self.max_depth, state.remaining - 1)
        if depth < 1:
            return DraftTree.empty()
        # trie over continuations: (parent trie node, token) -> trie node; counts per node
        children: dict[tuple[int, int], int] = {}
        counts: list[int] = []
        node_info: list[tuple[int, int, int]] = []  # (parent, token, depth)
        for source, start in self._occurrences(state.tokens):
            parent = -1
            for d, token in enumerate(source[start: start + depth]):
                if token < 0:
                    break
                key = (parent, token)
                node = children.get(key)
                if node is None:
                    node = children[key] = len(counts)
                    counts.append(0)
                    node_info.append((parent, token, d + 1))
                counts[node] += 1
                parent = node
        if not counts:
            return DraftTree.empty()
        # most frequent first; on ties the shallower (a parent before its child), then first seen
        chosen = sorted(range(len(counts)), key=lambda i: (-counts[i], node_info[i][2], i))
        chosen = chosen[: self.node_budget]
        tree_index = {-1: -1}
        tokens, parents = [], []
        for trie_node in chosen:
            parent, token, _ = node_info[trie_node]
            tree_index[trie_node] = len(tokens)
            tokens.append(token)
            parents.append(tree_index[parent])
        return DraftTree(tokens, parents)
