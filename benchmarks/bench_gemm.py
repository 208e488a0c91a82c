"""Verify-forward latency on the embedded model: the stock Hugging Face forward, the stock forward
with the transposed-weight layout (specdec/gemm.py), the lean forward (specdec/fastpath.py) with
MKL's packed GEMM ("fast-mkl") and with the skinny-GEMM kernel (specdec/kernels.py; "fast", the
default), interleaved.

For each size n (root + n - 1 chain nodes, after a ``--context``-token prefill) and each forward,
``--repeats`` timed `TreeForward.verify` calls after ``--warmup`` rounds, the forwards and sizes
interleaved so drift in machine load hits all alike; prints the median milliseconds, each one's
speedup over stock at the same n, each one's cost relative to the *stock* 1-token step (what a
step costs against one token of ``model.generate``), and whether all pick the same argmax per row.

``--panels`` adds the lean forward with bfloat16 and int8 kernel panels ("fast-bf16",
"fast-int8": the draft model of drafters/quantized.py); they compute a slightly different model,
so they are left out of the argmax check and their share of rows with stock's argmax is printed
instead (on random tokens, where the margins are smaller than on text).

    python benchmarks/bench_gemm.py --threads 2
    python benchmarks/bench_gemm.py --threads 2 --sizes 1,2,8 --panels
    python benchmarks/bench_gemm.py --model HuggingFaceTB/SmolLM2-360M-Instruct --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _harness as harness  # this folder is on sys.path when run as a script
from specdec.engine import kernels
from specdec.engine.fastpath import FastForward
from specdec.target import TreeForward
from specdec.tree import DraftTree


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,2,4,8,12,16,24,32,48,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    harness.add_model_arguments(parser)
    parser.add_argument("--panels", action="store_true",
                        help="also time bfloat16 and int8 kernel panels (the quantized drafter)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, _ = harness.load_model(args)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.context,), generator=generator)
    forwards = {"stock": TreeForward(model, transposed_gemm=False, fastpath=False),
                "transposed": TreeForward(model, transposed_gemm=True, fastpath=False),
                "fast-mkl": TreeForward(model, fastpath=True),
                "fast": TreeForward(model, fastpath=True)}
    # the lean forward with MKL's packed GEMM instead of the skinny kernel (specdec/kernels.py)
    forwards["fast-mkl"].fast = FastForward(model, kernel=False)
    if not forwards["fast"].fast.kernel:
        print(f"note: the skinny kernel is off here ({kernels.load_error() or kernels.ENV + '=0'})")
    low = {"fast-bf16": torch.bfloat16, "fast-int8": torch.int8} if args.panels else {}
    for name, dtype in low.items():
        forwards[name] = TreeForward(model, fastpath=FastForward(model, panel_dtype=dtype))
    agree = {(name, n): [0, 0] for name in low for n in sizes}
    for fwd in forwards.values():
        fwd.prefill(prompt[:-1])
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
            same[n] &= all(torch.equal(argmax["stock"], a) for k, a in argmax.items()
                           if k not in low)
            for name in low:
                agree[name, n][0] += int((argmax[name] == argmax["stock"]).sum())
                agree[name, n][1] += n
    ms = {key: 1000 * statistics.median(v) for key, v in times.items()}
    print(f"threads {torch.get_num_threads()}, context {args.context}, "
          f"medians of {args.repeats} interleaved rounds")
    names = list(forwards)
    one = ms["stock", sizes[0]]
    print("| n | " + " | ".join(f"{k} ms" for k in names) + " | "
          + " | ".join(f"stock / {k}" for k in names[1:]) + " | "
          + " | ".join(f"{k} vs stock 1 token" for k in names) + " | same argmax |"
          + "".join(f" {k} argmax = stock |" for k in low))
    print("|---" * (1 + 3 * len(names)) + "|---|" + "---|" * len(low))
    for n in sizes:
        cells = [f"{ms[k, n]:.1f}" for k in names]
        cells += [f"{ms['stock', n] / ms[k, n]:.2f}x" for k in names[1:]]
        cells += [f"{ms[k, n] / one:.2f}" for k in names]
        cells.append("yes" if same[n] else "NO")
        cells += [f"{agree[k, n][0] / agree[k, n][1]:.2f}" for k in low]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    harness.main(main)
