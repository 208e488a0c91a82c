"""Replay greedy outputs to compare model-free drafters' settings without timing noise.

Greedy verification accepts a draft path exactly when it matches the target's greedy
continuation, so once the greedy outputs are known (computed here by the lossless loop, equal to
``model.generate``), any model-free drafter (PLD, n-gram trie) can be replayed without the model:
each step's accepted length and tree size follow from the drafter alone. Wall time is then
estimated with a linear cost model of one target forward over n tokens, ``c0 + c1 * n``, fitted
here from timed forwards of 1 and 16 tokens on this machine.

    python benchmarks/replay_ngram.py --limit 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import drafters
from bench_core import DATA, prompts  # this folder is on sys.path when run as a script
from specdec.cli import load_model
from specdec.loop import speculative_generate
from specdec.sampling import SamplingConfig
from specdec.state import DecodingState
from specdec.target import TreeForward
from specdec.tree import DraftTree

VARIANTS = {
    "pld first n<=3 min2 (default)": dict(name="pld"),
    "pld first n<=2 min1 (as HF)": dict(name="pld", max_ngram=2, min_ngram=1),
    "pld last n<=3 min1": dict(name="pld", match="last", min_ngram=1),
    "trie 12 nodes depth 8 min2 (default)": dict(name="trie"),
    "trie 12 nodes depth 8 min1": dict(name="trie", min_ngram=1),
    "trie 24 nodes depth 12 min2": dict(name="trie", node_budget=24, max_depth=12),
}


def replay(drafter, full: list[int], prompt_len: int, vocab: int) -> tuple[int, list[int]]:
    """(steps, tree size + 1 per step) when ``drafter`` drafts against the known output."""
    state = DecodingState(tokens=full[:prompt_len], prompt_length=prompt_len, vocab_size=vocab,
                          sampling=SamplingConfig(), generator=None,
                          max_new_tokens=len(full) - prompt_len, device=torch.device("cpu"))
    if hasattr(drafter, "begin"):
        drafter.begin(state)
    fed = []
    while len(state.tokens) < len(full):
        tree = drafter.propose(state).truncate_depth(max(state.remaining - 1, 0))
        pos, node, accepted = len(state.tokens), -1, 0
        while pos + accepted < len(full):
            match = [c for c in tree.children(node) if tree.tokens[c] == full[pos + accepted]]
            if not match:
                break
            node, accepted = match[0], accepted + 1
        state.tokens.extend(full[pos: pos + accepted + 1])
        fed.append(len(tree) + 1)
    return len(fed), fed


def forward_cost(model, n: int, repeats: int = 5) -> float:
    fwd = TreeForward(model)
    fwd.prefill(torch.arange(200) % 1000)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fwd.verify(1, DraftTree.chain(list(range(2, n + 1))) if n > 1 else DraftTree.empty())
        times.append(time.perf_counter() - start)
        fwd.rollback()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    model, tokenizer = load_model("embedded")
    vocab = model.get_output_embeddings().weight.shape[0]
    t1, t16 = forward_cost(model, 1), forward_cost(model, 16)
    c1 = (t16 - t1) / 15
    c0 = t1 - c1
    print(f"cost model: {1000 * c0:.1f} ms + {1000 * c1:.2f} ms per token")
    outputs = {}
    for dataset in ("mt_bench", "humaneval"):
        outputs[dataset] = []
        for ids in prompts(tokenizer, dataset, args.limit, args.data_dir):
            out = speculative_generate(model, ids, drafter="trie", verifier="greedy",
                                       max_new_tokens=args.max_new_tokens,
                                       eos_token_id=tokenizer.eos_token_id)
            outputs[dataset].append((out.sequences[0].tolist(), ids.shape[1]))
    print("| drafter | MT-Bench tau | MT-Bench est. speedup | HumanEval tau | HumanEval est. speedup |")
    print("|---|---|---|---|---|")
    for label, spec in VARIANTS.items():
        spec = dict(spec)
        cells = []
        for dataset in ("mt_bench", "humaneval"):
            steps = new = 0
            spec_time = base_time = 0.0
            for full, prompt_len in outputs[dataset]:
                n_steps, fed = replay(drafters.get(spec["name"], **{k: v for k, v in spec.items()
                                                                     if k != "name"}),
                                      full, prompt_len, vocab)
                steps += n_steps
                new += len(full) - prompt_len
                spec_time += sum(c0 + c1 * n for n in fed)
                base_time += (len(full) - prompt_len) * (c0 + c1)
            cells += [f"{new / steps:.2f}", f"{base_time / spec_time:.2f}x"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
