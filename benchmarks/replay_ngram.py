"""Replay greedy outputs to compare model-free drafters' settings without timing noise.

Greedy verification accepts a draft path exactly when it matches the target's greedy
continuation, so once the greedy outputs are known, any model-free drafter (PLD, n-gram trie) can
be replayed without the model: each step's accepted length and tree size follow from the drafter
alone. The greedy outputs come from one run of the eval runner (`benchmarks/_harness.py`: the
eval's prompts) with the two references, HF greedy ``generate`` (``baseline``) and the undrafted
loop (``none``, whose outputs are replayed), timed as every benchmark times them. A drafter's wall
time is then estimated with a linear cost model of one target forward over n tokens,
``c0 + c1 * n``, fitted here from timed forwards of 1 and 16 tokens on this machine: its speedup
over ``none`` (one 1-token forward per token) is estimated per prompt, and its speedup over
``baseline`` is that estimate times the measured speed of ``none`` over ``baseline`` on the same
prompt. Medians over prompts; tau pooled.

The drafters are eval method specs of ``pld`` and ``trie`` (greedy verification, no tree budget).

    python benchmarks/replay_ngram.py --limit 4
    python benchmarks/replay_ngram.py --methods 'pld,trie:node_budget=24,max_depth=12' --data benchmarks/data/summarize.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _harness as harness  # this folder is on sys.path when run as a script
import drafters
from specdec.sampling import SamplingConfig
from specdec.state import DecodingState
from specdec.target import TreeForward
from specdec.tree import DraftTree

VARIANTS = ("pld,pld:max_ngram=2,min_ngram=1,pld:match=last,min_ngram=1,"
            "trie,trie:min_ngram=1,trie:node_budget=24,max_depth=12")
MODEL_FREE = ("pld", "trie")


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


def forward_cost(model, n: int, vocab: int, repeats: int = 5) -> float:
    fwd = TreeForward(model)
    fwd.prefill(torch.arange(200) % vocab)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fwd.verify(1, DraftTree.chain(list(range(2, n + 1))) if n > 1 else DraftTree.empty())
        times.append(time.perf_counter() - start)
        fwd.rollback()
    return statistics.median(times)


def variants(text: str):
    """The replayable specs of ``text``; anything else is refused before the model loads."""
    specs = [spec for spec in harness.method_specs(text) if spec.label not in harness.REFERENCES]
    for spec in specs:
        if (spec.name not in MODEL_FREE or spec.verifier not in (None, "greedy")
                or "tree_budget" in spec.kwargs):
            raise harness.UsageError(
                f"method {spec.label!r} cannot be replayed: give {' or '.join(MODEL_FREE)} "
                f"specs without a verifier or tree_budget")
    if not specs:
        raise harness.UsageError(f"--methods names no drafter to replay ({', '.join(MODEL_FREE)})")
    return specs


def replayed_row(spec, pairs: list[tuple[dict, dict, list[int]]], vocab: int,
                 cost: tuple[float, float]) -> dict:
    """A summary row of one drafter replayed on (none record, baseline record, prompt) pairs."""
    c0, c1 = cost
    steps = new = 0
    vs_none, vs_baseline = [], []
    for undrafted, baseline, prompt in pairs:
        full = prompt + undrafted["output_ids"]
        n_steps, fed = replay(drafters.get(spec.name, **spec.kwargs), full, len(prompt), vocab)
        steps, new = steps + n_steps, new + len(undrafted["output_ids"])
        vs_none.append(len(undrafted["output_ids"]) * (c0 + c1) / sum(c0 + c1 * n for n in fed))
        vs_baseline.append(vs_none[-1] * undrafted["tokens_per_s"] / baseline["tokens_per_s"])
    return {"dataset": pairs[0][0]["dataset"], "method": spec.label, "n": len(pairs),
            "tokens_per_s": None, "tau": new / steps, "identical": None, "estimated": True,
            "speedup_vs_none": statistics.median(vs_none),
            "speedup_vs_baseline": statistics.median(vs_baseline)}


COLUMNS = [("timing", lambda r: "estimated" if r.get("estimated") else "measured")]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser, methods=VARIANTS, datasets="mt_bench,humaneval", limit=4)
    args = parser.parse_args(argv)
    if args.temperature != 0:
        raise harness.UsageError("replay needs greedy outputs: leave --temperature at 0")
    specs = variants(args.methods)
    args.methods = ",".join(harness.REFERENCES)
    references, examples = harness.check(args)
    model, tokenizer = harness.load_model(args)
    vocab = model.get_output_embeddings().weight.shape[0]
    t1, t16 = forward_cost(model, 1, vocab), forward_cost(model, 16, vocab)
    c1 = (t16 - t1) / 15
    cost = (t1 - c1, c1)
    print(f"cost model: {1000 * cost[0]:.2f} ms + {1000 * c1:.3f} ms per token")
    methods = harness.build_methods(args, references, model, tokenizer)
    records = harness.generate(args, model, tokenizer, methods, examples)
    prompts = {(ex.dataset, ex.id): harness.input_ids(tokenizer, ex)[0].tolist() for ex in examples}
    by_key = {(r["dataset"], r["id"], r["method"]): r for r in records}
    rows = []
    for row in harness.summary(records):
        rows.append({**row, "estimated": False})
        if row["method"] != "none":
            continue
        pairs = [(r, by_key[r["dataset"], r["id"], "baseline"], prompts[r["dataset"], r["id"]])
                 for r in row["records"]]
        rows += [replayed_row(spec, pairs, vocab, cost) for spec in specs]
    print(harness.caption(args, examples))
    print(harness.table(rows, COLUMNS))
    harness.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    harness.main(main)
