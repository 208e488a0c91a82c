"""Multi-draft verifiers against the optimal-transport bound, on real next-token distributions.

Target: the embedded SmolLM2-135M-Instruct's next-token distributions along its own sampled
answers to the eval's prompts (MT-Bench first turns by default). Drafter: the same logits at a scaled temperature
(``--draft-temperature-scale``, default 0.6: a drafter that knows the target's ranking but is too
sharp). Both are warped identically otherwise (top-k).

For k = 1..4 drafts and each lossless multi-draft rule, the acceptance probability P(the node
emits one of the drafts) is computed exactly per distribution (closed forms or enumeration, no
sampling) and averaged; the ratio is mean acceptance / mean `verifiers.optimal_acceptance` for the
same sampling kind:

    exact-iid      recursive rejection, i.i.d. drafts (SpecInfer)    closed form
    exact-wor      recursive rejection, drafts without replacement   enumeration of rejected prefixes
    spectr-iid     SpecTr K-SEQ, i.i.d. drafts                       1 - (1 - alpha(rho))^k
    optimal-iid    coupling LP (class selection LP when large)       LP value (with classes: >=)
    optimal-wor    coupling LP (falls back to exact-wor when large)   LP optimum

The second part times the multi-draft rules end to end: each ``--methods`` spec (eval syntax; by
default the quantized self-drafter sampling two i.i.d. drafts at the first depth, verified by
recursive rejection, SpecTr and the optimal rule) runs at the same temperature and top-k beside
HF sampled ``generate`` (``baseline``) and the undrafted loop (``none``) through the eval runner
(`benchmarks/_harness.py`), on the first ``--timed-limit`` prompts of each data set. Prompts of
both parts are the eval's (``--datasets``, ``--data``, chat-templated as ``specdec eval`` does).

Usage: python benchmarks/bench_multidraft.py [--limit 80] [--positions 4] [--top-k 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

import _harness as harness  # this folder is on sys.path when run as a script
from specdec.sampling import SamplingConfig, residual
from verifiers.multidraft import OptimalRule, iid_rejection_acceptance, optimal_acceptance
from verifiers.spectr import kseq_acceptance

KS = (1, 2, 3, 4)
TIMED = ",".join(f"quantized:depth=3,branching=[2,1,1],mode=iid+{rule}"
                 for rule in ("exact", "spectr", "optimal"))


def exact_wor_acceptance(target_probs, draft_probs, k, prune=1e-9):
    """Recursive rejection without replacement, summed over every sequence of rejected drafts.

    The residual after a rejection does not depend on which token was rejected, but the next
    draft distribution does (that token is removed), hence the enumeration. Branches reached with
    probability below ``prune`` are dropped; the result is exact to within their total mass.
    """
    def accepted(residual_probs, child_probs, reach, depth):
        accept = float(torch.minimum(residual_probs, child_probs).sum())
        total = reach * accept
        if depth + 1 == k:
            return total
        next_residual = residual(residual_probs, child_probs)
        rejected_as = (child_probs - residual_probs).clamp(min=0)  # [V] P(x drawn and rejected)
        for token in torch.nonzero(rejected_as * reach > prune).flatten().tolist():
            rest = child_probs.clone()
            rest[token] = 0.0
            if rest.sum() <= 0:
                continue
            total += accepted(next_residual, rest / rest.sum(), reach * float(rejected_as[token]),
                              depth + 1)
        return total

    return accepted(target_probs, draft_probs, 1.0, 0)


def optimal_rule_acceptance(target_probs, draft_probs, k, sampling, rule):
    acceptance = rule.acceptance(target_probs, draft_probs, k, sampling)
    if acceptance is None:  # the rule falls back to recursive rejection
        return (iid_rejection_acceptance if sampling == "iid" else exact_wor_acceptance)(
            target_probs, draft_probs, k)
    return acceptance


def next_token_logits(model, tokenizer, examples, positions, seed):
    """[n, V] target logits at the first ``positions`` steps of the model's own sampled answers."""
    torch.manual_seed(seed)  # generate() samples from the global generator
    rows = []
    for example in tqdm(examples, desc="target distributions"):
        ids = harness.input_ids(tokenizer, example)
        with torch.no_grad():
            answer = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=positions, min_new_tokens=positions)
            logits = model(answer).logits[0].double()  # [T, V]
        rows.append(logits[ids.shape[1] - 1: ids.shape[1] - 1 + positions])
    return torch.cat(rows)


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_arguments(parser, methods=TIMED, datasets="mt_bench", limit=80, max_new_tokens=64)
    parser.set_defaults(temperature=1.0)
    parser.add_argument("--positions", type=int, default=4, help="answer steps per prompt")
    parser.add_argument("--draft-temperature-scale", type=float, default=0.6)
    parser.add_argument("--top-k", type=int, default=8, help="0: the full vocabulary")
    parser.add_argument("--timed-limit", type=int, default=5,
                        help="prompts per data set of the end-to-end timing")
    args = parser.parse_args(argv)
    if args.temperature <= 0 or args.positions < 1:
        raise harness.UsageError("--temperature must be above 0 and --positions at least 1 (the "
                                 "rules are compared on sampled distributions)")
    return args


def timed_args(args):
    """The options of the end-to-end timing: the first ``--timed-limit`` prompts of each set."""
    return argparse.Namespace(**{**vars(args), "limit": args.timed_limit})


def mean_acceptances(logits, args) -> dict[str, dict[int, float]]:
    """Per rule and k, the acceptance averaged over the distributions (``bound-*``: the optimum)."""
    top_k = args.top_k or None
    target_config = SamplingConfig(temperature=args.temperature, top_k=top_k)
    draft_config = SamplingConfig(temperature=args.temperature * args.draft_temperature_scale,
                                  top_k=top_k)

    rule = OptimalRule()
    rows = {name: {k: [] for k in KS} for name in
            ("exact-iid", "exact-wor", "spectr-iid", "optimal-iid", "optimal-wor",
             "bound-iid", "bound-wor")}
    for row in tqdm(logits, desc="acceptance"):
        target = target_config.probs(row).double()
        draft = draft_config.probs(row).double()
        # tokens outside both supports change no rule's behaviour: drop them for speed
        support = (target > 0) | (draft > 0)
        target, draft = target[support], draft[support]
        target, draft = target / target.sum(), draft / draft.sum()
        for k in KS:
            rows["bound-iid"][k].append(optimal_acceptance(target, draft, k, "iid"))
            rows["bound-wor"][k].append(optimal_acceptance(target, draft, k, "without_replacement"))
            rows["exact-iid"][k].append(iid_rejection_acceptance(target, draft, k))
            rows["exact-wor"][k].append(exact_wor_acceptance(target, draft, k))
            rows["spectr-iid"][k].append(kseq_acceptance(target, draft, k))
            rows["optimal-iid"][k].append(optimal_rule_acceptance(target, draft, k, "iid", rule))
            rows["optimal-wor"][k].append(
                optimal_rule_acceptance(target, draft, k, "without_replacement", rule))

    return {name: {k: float(np.mean(values[k])) for k in KS} for name, values in rows.items()}


def print_acceptances(mean, logits, args, prompts: int) -> None:
    print(f"\n{len(logits)} target distributions ({prompts} prompts x "
          f"{args.positions} answer steps), temperature {args.temperature}, drafter temperature "
          f"x{args.draft_temperature_scale}, top-k {args.top_k or 'none'}\n")
    print("| rule | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for name in ("bound-iid", "exact-iid", "spectr-iid", "optimal-iid",
                 "bound-wor", "exact-wor", "optimal-wor"):
        bound = mean["bound-iid" if name.endswith("iid") else "bound-wor"]
        cells = [f"{mean[name][k]:.4f}" + ("" if name.startswith("bound") else
                                          f" ({mean[name][k] / bound[k]:.1%})") for k in KS]
        print(f"| {name} | " + " | ".join(cells) + " |")

    vocab_target = SamplingConfig(temperature=args.temperature).probs(logits[0]).double()
    vocab_draft = SamplingConfig(temperature=args.temperature * args.draft_temperature_scale
                                 ).probs(logits[0]).double()
    print()
    for sampling in ("iid", "without_replacement"):
        start = time.perf_counter()
        value = optimal_acceptance(vocab_target, vocab_draft, 4, sampling)
        print(f"optimal_acceptance over the full vocabulary (V={vocab_target.numel()}, k=4, "
              f"{sampling}): {value:.4f} in {time.perf_counter() - start:.3f} s")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    _, examples = harness.check(args)
    timed = timed_args(args)
    specs, timed_examples = harness.check(timed)
    model, tokenizer = harness.load_model(args)
    logits = next_token_logits(model, tokenizer, examples, args.positions, args.seed)
    mean = mean_acceptances(logits, args)
    print_acceptances(mean, logits, args, len(examples))
    print("\nend to end:")
    methods = harness.build_methods(timed, specs, model, tokenizer)
    timing = harness.summary(harness.generate(timed, model, tokenizer, methods, timed_examples),
                             args.temperature)
    print(harness.caption(timed, timed_examples))
    print(harness.table(timing))
    harness.write_json(args.json, timing, acceptance=mean)
    return {"acceptance": mean, "rows": timing}


if __name__ == "__main__":
    harness.main(main)
