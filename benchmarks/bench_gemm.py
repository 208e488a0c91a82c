"""Verify-forward latency on the embedded model with the stock nn.Linear path and with the
transposed-weight layout (specdec/gemm.py), interleaved.

For each size n (root + n - 1 chain nodes, after a ``--context``-token prefill) and each layout,
``--repeats`` timed `TreeForward.verify` calls after ``--warmup`` rounds, the layouts and sizes
interleaved so drift in machine load hits both alike; prints the median milliseconds, the ratio
stock / transposed, and each layout's cost relative to its own 1-token step (what the tree
budget weighs a tree against). Also checks that the two layouts pick the same argmax per row.

    python benchmarks/bench_gemm.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.embedded import load_embedded
from specdec.target import TreeForward
from specdec.tree import DraftTree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4,8,12,16,24,32,48,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, _ = load_embedded()
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.context,), generator=generator)
    forwards = {}
    for name, setting in (("stock", False), ("transposed", True)):
        forwards[name] = TreeForward(model, transposed_gemm=setting)
        forwards[name].prefill(prompt[:-1])
    times = {(name, n): [] for name in forwards for n in sizes}
    same = {n: True for n in sizes}
    for round_ in range(args.warmup + args.repeats):
        for n in sizes:
            tree = DraftTree.chain(torch.randint(0, vocab, (n - 1,), generator=generator))
            argmax = {}
            for name, fwd in forwards.items():
                start = time.perf_counter()
                out = fwd.verify(int(prompt[-1]), tree)
                elapsed = time.perf_counter() - start
                fwd.rollback()
                argmax[name] = out.logits.argmax(-1)
                if round_ >= args.warmup:
                    times[name, n].append(elapsed)
            same[n] &= bool(torch.equal(argmax["stock"], argmax["transposed"]))
    ms = {key: 1000 * statistics.median(v) for key, v in times.items()}
    print(f"threads {torch.get_num_threads()}, context {args.context}, "
          f"medians of {args.repeats} interleaved rounds")
    print("| n | stock ms | transposed ms | stock / transposed | stock vs 1 token "
          "| transposed vs 1 token | same argmax |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        s, t = ms["stock", n], ms["transposed", n]
        print(f"| {n} | {s:.1f} | {t:.1f} | {s / t:.2f}x | {s / ms['stock', sizes[0]]:.2f} "
              f"| {t / ms['transposed', sizes[0]]:.2f} | {'yes' if same[n] else 'NO'} |")


if __name__ == "__main__":
    main()
