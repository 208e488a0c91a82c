"""Train a judge head for a target model with automatically built labels (simplified AutoJudge).

AutoJudge labels a draft/target mismatch as acceptable when swapping the draft token into the
target's answer leaves the task's answer unchanged. Our simplified version, on GSM8K:

1. the target answers a question greedily; its final answer is the last number of a *finished*
   answer (one that ends with EOS within ``--max-new-tokens``; the last number of a truncated
   answer is an intermediate result, and labels compared with it would be noise);
2. at up to ``--swaps`` positions where the target's second choice is plausible (probability >=
   ``--min-alternative``) the second choice plays the mismatched draft token, and at up to
   ``--low-swaps`` random positions a token of rank 3 to 50 does (the implausible drafts an n-gram
   drafter proposes; without them the head never sees one);
3. the target continues greedily after the swapped token, with room for the rest of the original
   answer plus a quarter and 16 tokens; the label is 1 when the continuation finishes with the
   same final number, 0 when it finishes with another; a continuation that does not finish is
   dropped (its label is unknown);
4. the feature is the target's last hidden state at the swapped token's position, exactly what
   the loop passes to the judge as ``context["children_hidden"]``.

Cost (profiled on the embedded model, 2 CPU cores): a decoding step costs about as much for 16
rows as for 4, and re-feeding the ~250-token prefix of every swap cost more than continuing it.
So answers are generated for ``--batch`` questions at once, and every swap continues from a slice
of its answer's KV cache (no prefix is fed twice) in batches of ``--rows`` left-padded rows,
sorted by length so a batch's rows finish together. Labels are cached per question in
``--examples`` after every batch of questions; an interrupted run resumes where it stopped, and
``--fit-only`` fits on whatever questions the file holds (to cut a long labelling run short).

A linear `JudgeHead` is fitted on the questions of a random 80% (class-balanced logistic loss,
the weight decay picked by 5-fold cross-validation over questions) and scored on the other 20%;
the report is written beside the head as ``training.json``. Questions are taken from the end of
the GSM8K file, so evaluate on the others.

    python -m verifiers.judge_train --questions 160 --examples runs/judge_examples.pt

References: see `verifiers.judge`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from verifiers.judge import DEFAULT_HEAD, WEIGHTS_DIR, JudgeHead, train_head

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
LOW_RANKS = (2, 50)  # 0-based ranks of the implausible alternatives
SECOND_CHOICE, LOW_RANK = 0, 1  # kinds of swap


def final_number(text: str) -> str | None:
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _left_pad(rows: list[torch.Tensor], value) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, W] rows right-aligned, [B, W] mask of the real entries); rows are [n_i, ...]."""
    width = max(len(row) for row in rows)
    batch = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return batch, mask


@torch.no_grad()
def greedy_batch(model, inputs: list[torch.Tensor], budgets: list[int], eos: int, *,
                 prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                 ranks: int = 0):
    """Greedy continuations of several rows in one left-padded batch.

    ``inputs[i]  # [n_i]`` are fed after ``prefixes[i]`` (per layer (keys, values)
    ``[heads, p_i, head_dim]``, already cached; None: no prefix) and row i then decodes at most
    ``budgets[i]`` tokens. Returns a dict of per-row lists: ``tokens`` (new tokens, through EOS),
    ``finished`` (EOS within the budget), ``hidden`` (last hidden state at the last input [H]),
    ``cache`` (per layer (keys, values) of the input and new tokens but the last one; what a
    continuation from any point of this row needs), and with ``ranks`` > 0 ``top_probs`` /
    ``top_ids`` ``[T_i, ranks]``: the target's likeliest tokens before each new token.
    """
    rows = len(inputs)
    layers = model.config.num_hidden_layers
    prefix_len = [0] * rows if prefixes is None else [int(p[0][0].shape[1]) for p in prefixes]
    cache = DynamicCache(config=model.config)
    cache_mask = torch.zeros(rows, 0, dtype=torch.long)
    if prefixes is not None:
        for layer in range(layers):
            keys, cache_mask = _left_pad([p[layer][0].transpose(0, 1) for p in prefixes], 0.0)
            values, _ = _left_pad([p[layer][1].transpose(0, 1) for p in prefixes], 0.0)
            cache.update(keys.transpose(1, 2), values.transpose(1, 2), layer)
    fed, fed_mask = _left_pad(inputs, eos)  # [B, W]
    mask = torch.cat([cache_mask, fed_mask], dim=1)  # [B, S]
    positions = (torch.tensor(prefix_len)[:, None] + fed_mask.cumsum(1) - 1).clamp_min(0)
    new_tokens = torch.full((rows, max(budgets)), eos, dtype=torch.long)
    top_probs, top_ids = [], []
    done = torch.zeros(rows, dtype=torch.bool)
    length = torch.zeros(rows, dtype=torch.long)
    budget = torch.tensor(budgets)
    hidden = None
    base = mask.shape[1]  # cached columns once the inputs are fed
    for step in range(max(budgets)):
        out = model(input_ids=fed, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, output_hidden_states=step == 0,
                    logits_to_keep=1)
        if step == 0:
            hidden = out.hidden_states[-1][:, -1].float()  # [B, H]
        logits = out.logits[:, -1].float()  # [B, V]
        token = logits.argmax(-1)
        if ranks:
            top = torch.softmax(logits, -1).topk(ranks, -1)
            top_probs.append(top.values)
            top_ids.append(top.indices)
        token[done] = eos
        new_tokens[:, step] = token
        length += (~done).long()
        done |= (token == eos) | (length >= budget)
        if bool(done.all()):
            break
        fed = token[:, None]
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    result = {"tokens": [], "finished": [], "hidden": list(hidden), "cache": [],
              "top_probs": [], "top_ids": []}
    if ranks:
        top_probs, top_ids = torch.stack(top_probs, 1), torch.stack(top_ids, 1)  # [B, T, ranks]
    for i in range(rows):
        tokens = new_tokens[i, : int(length[i])]
        result["tokens"].append(tokens)
        result["finished"].append(bool(tokens.numel()) and int(tokens[-1]) == eos)
        # this row's real cached entries: its inputs (after its prefix) and its new tokens but
        # the last one (never fed back)
        real = mask[i].bool().clone()
        real[base + int(length[i]) - 1:] = False
        result["cache"].append([(layer.keys[i][:, real], layer.values[i][:, real])
                                for layer in cache.layers])
        if ranks:
            result["top_probs"].append(top_probs[i, : int(length[i])])
            result["top_ids"].append(top_ids[i, : int(length[i])])
    return result


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    return prompt[0]


def swaps_for_answer(top_probs, top_ids, swaps: int, low_swaps: int, min_alternative: float,
                     generator: torch.Generator) -> list[tuple[int, int, int]]:
    """[(offset in the answer, swapped-in token, kind)] for one answer's ``top_* [T, ranks]``."""
    plausible = torch.nonzero(top_probs[:, 1] >= min_alternative).flatten()
    chosen = []
    if plausible.numel():
        picks = torch.linspace(0, plausible.numel() - 1, min(swaps, plausible.numel()))
        for offset in plausible[picks.round().long()].unique().tolist():
            chosen.append((offset, int(top_ids[offset, 1]), SECOND_CHOICE))
    low, high = LOW_RANKS
    for offset in torch.randperm(len(top_ids), generator=generator)[:low_swaps].tolist():
        rank = int(torch.randint(low, high, (1,), generator=generator))
        chosen.append((offset, int(top_ids[offset, rank]), LOW_RANK))
    return chosen


def label_questions(model, tokenizer, questions: list[str], *, swaps: int, low_swaps: int,
                    min_alternative: float, max_new_tokens: int, rows: int,
                    generator: torch.Generator) -> list[list[tuple[torch.Tensor, int, int]]]:
    """Per question: [(hidden state [H], label, kind)] of its labelled swaps."""
    eos = tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, question) for question in questions]
    answers = greedy_batch(model, prompts, [max_new_tokens] * len(prompts), eos,
                           ranks=LOW_RANKS[1])
    jobs = []  # (question, offset, token, kind, reference number, budget)
    for q, (prompt, tokens, finished) in enumerate(zip(prompts, answers["tokens"],
                                                       answers["finished"])):
        reference = final_number(tokenizer.decode(tokens, skip_special_tokens=True))
        if not finished or reference is None:
            continue
        for offset, token, kind in swaps_for_answer(answers["top_probs"][q], answers["top_ids"][q],
                                                    swaps, low_swaps, min_alternative, generator):
            remaining = len(tokens) - offset - 1
            # a swapped-in EOS ends the answer there: one step gives its hidden state
            budget = 1 if token == eos else remaining + remaining // 4 + 16
            jobs.append((q, offset, token, kind, reference, budget))
    jobs.sort(key=lambda job: job[5])
    examples = [[] for _ in questions]
    for start in range(0, len(jobs), rows):
        batch = jobs[start: start + rows]
        prefixes = []
        for q, offset, *_ in batch:  # prompt + answer[:offset], sliced from the answer's cache
            keep = len(prompts[q]) + offset
            prefixes.append([(keys[:, :keep], values[:, :keep])
                             for keys, values in answers["cache"][q]])
        continued = greedy_batch(model, [torch.tensor([job[2]]) for job in batch],
                                 [job[5] for job in batch], eos, prefixes=prefixes)
        for row, (q, offset, token, kind, reference, _) in enumerate(batch):
            tail = continued["tokens"][row]
            if token == eos:
                tail = tail[:0]
            elif not continued["finished"][row]:
                continue
            text = tokenizer.decode(torch.cat([answers["tokens"][q][:offset], torch.tensor([token]),
                                               tail]), skip_special_tokens=True)
            examples[q].append((continued["hidden"][row],
                                int(final_number(text) == reference), kind))
    return examples


class LabelCache:
    """Labelled swaps per question on disk, so an interrupted labelling run resumes.

    The file records the settings it was built with; resuming with other settings is refused.
    """

    def __init__(self, path: str | Path, settings: dict):
        self.path, self.settings = Path(path), settings
        self.done: dict[int, list[tuple[torch.Tensor, int, int]]] = {}
        self.target = None
        self.seconds = 0.0  # labelling time of every run that added to the file
        if self.path.exists():
            saved = torch.load(self.path)
            if saved["settings"] != settings:
                raise SystemExit(
                    f"{self.path} holds labels made with {saved['settings']}, not {settings}: "
                    f"give another --examples file or the same settings")
            self.target = saved["target"]
            self.seconds = saved.get("seconds", 0.0)
            for q, feature, label, kind in zip(saved["question"].tolist(), saved["features"],
                                               saved["labels"].tolist(), saved["kind"].tolist()):
                self.done.setdefault(q, []).append((feature, label, kind))
            for q in saved["empty"]:
                self.done.setdefault(q, [])

    def add(self, question: int, examples) -> None:
        self.done[question] = examples

    def tensors(self, questions=None) -> dict:
        questions = sorted(self.done if questions is None else questions)
        rows = [(q, *example) for q in questions for example in self.done[q]]
        if not rows:
            raise SystemExit("no labelled swaps yet: raise --questions")
        return {"question": torch.tensor([r[0] for r in rows]),
                "features": torch.stack([r[1] for r in rows]),
                "labels": torch.tensor([r[2] for r in rows], dtype=torch.float32),
                "kind": torch.tensor([r[3] for r in rows])}

    def save(self) -> None:
        data = self.tensors() if any(self.done.values()) else {}
        data.update(settings=self.settings, target=self.target, seconds=self.seconds,
                    empty=[q for q, examples in self.done.items() if not examples])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(data, tmp)
        tmp.replace(self.path)  # never a half-written cache


def _standardised_fit(features, labels, weight_decay, seed, epochs=300):
    torch.manual_seed(seed)
    head = JudgeHead(features.shape[1])
    # hidden states have a large scale; standardising keeps one learning rate right for every
    # direction, and is folded back into the linear map afterwards
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    train_head(head, (features - mean) / std, labels, epochs=epochs, lr=1e-2,
               weight_decay=weight_decay)
    with torch.no_grad():
        head.net.weight /= std
        head.net.bias -= (head.net.weight * mean).sum()
    return head


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    if not positive.numel() or not negative.numel():
        return float("nan")
    wins = (positive[:, None] > negative[None, :]).float() + 0.5 * (
        positive[:, None] == negative[None, :]).float()
    return float(wins.mean())


def _balanced_accuracy(predicted, labels) -> float:
    return float(0.5 * ((predicted[labels == 1] == 1).float().mean()
                        + (predicted[labels == 0] == 0).float().mean()))


def fit_head(data: dict, weight_decays, seed: int = 0) -> tuple[JudgeHead, dict]:
    """A linear head on 80% of the questions, weight decay by 5-fold CV over questions; report."""
    questions = data["question"].unique()
    order = questions[torch.randperm(len(questions), generator=torch.Generator().manual_seed(seed))]
    split = int(0.8 * len(order))
    train_q, held_q = order[:split], order[split:]
    is_train = torch.isin(data["question"], train_q)
    features, labels = data["features"], data["labels"]
    cv_auc = {}
    folds = [train_q[i::5] for i in range(5)]
    for weight_decay in weight_decays:
        scores = torch.zeros(len(labels))  # a fold left out (too few questions) scores 0
        for fold in folds:
            valid = torch.isin(data["question"], fold)
            fit = is_train & ~valid
            if not bool(valid.any()) or not bool(fit.any()):
                continue
            head = _standardised_fit(features[fit], labels[fit], weight_decay, seed)
            with torch.no_grad():
                scores[valid] = head(features[valid])
        cv_auc[weight_decay] = _auc(scores[is_train], labels[is_train])
    best = max(cv_auc, key=lambda wd: (cv_auc[wd], wd))
    head = _standardised_fit(features[is_train], labels[is_train], best, seed)
    with torch.no_grad():
        scores = head(features)
    predicted = (scores > 0).float()
    held = ~is_train

    def precision(accepted):  # the acceptable fraction of the swaps the judge accepts
        return float(labels[accepted].mean()) if bool(accepted.any()) else float("nan")

    report = {
        "examples": len(labels), "questions_with_examples": len(questions),
        "acceptable_fraction": float(labels.mean()),
        "acceptable_fraction_by_kind": {
            name: float(labels[data["kind"] == kind].mean())
            for name, kind in (("second_choice", SECOND_CHOICE), ("low_rank", LOW_RANK))
            if bool((data["kind"] == kind).any())},
        "weight_decay": best, "cv_auc_by_weight_decay": cv_auc,
        "train_accuracy": float((predicted[is_train] == labels[is_train]).float().mean()),
        "held_out_examples": int(held.sum()),
        "held_out_accuracy": float((predicted[held] == labels[held]).float().mean()),
        "held_out_balanced_accuracy": _balanced_accuracy(predicted[held], labels[held]),
        "held_out_majority_baseline": float(max(labels[held].mean(), 1 - labels[held].mean())),
        "held_out_auc": _auc(scores[held], labels[held]),
        "held_out_precision_at_0.5": precision(held & (predicted == 1)),
        "held_out_rescued_fraction_at_0.5": float(predicted[held].mean()),
        # the class-balanced loss puts 0.5 where both classes are equally costly; a judge that
        # should rarely accept a wrong token wants a higher `threshold` of the rule
        "held_out_by_threshold": {
            str(threshold): {"rescued_fraction": float((scores[held] > logit).float().mean()),
                             "precision": precision(held & (scores > logit))}
            for threshold in (0.5, 0.6, 0.7, 0.8, 0.9)
            for logit in [math.log(threshold / (1 - threshold))]},
    }
    return head, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS_DIR / DEFAULT_HEAD),
                        help="directory for config.json + model.safetensors + training.json")
    parser.add_argument("--questions", type=int, default=160,
                        help="GSM8K questions to label, from the end of the file")
    parser.add_argument("--swaps", type=int, default=8, help="second-choice swaps per answer")
    parser.add_argument("--low-swaps", type=int, default=2, help="rank 3-50 swaps per answer")
    parser.add_argument("--min-alternative", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="questions answered at once")
    parser.add_argument("--rows", type=int, default=16, help="swaps continued at once")
    parser.add_argument("--weight-decays", default="0.01,0.1,1,10,30",
                        help="AdamW weight decays tried by cross-validation")
    parser.add_argument("--examples", default="runs/judge_examples.pt",
                        help="cache of labelled swaps (.pt), written after every batch of "
                             "questions; labelling resumes from it")
    parser.add_argument("--fit-only", action="store_true",
                        help="label nothing: fit on every question already in --examples (to "
                             "stop a long labelling run early and keep what it labelled)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="embedded", help="the target (default: embedded)")
    args = parser.parse_args(argv)
    weight_decays = [float(w) for w in args.weight_decays.split(",")]
    if max(weight_decays) * 1e-2 >= 1:  # AdamW scales the weights by 1 - lr * wd every step
        parser.error("--weight-decays must stay below 100 (1 / the learning rate 1e-2)")

    settings = {"swaps": args.swaps, "low_swaps": args.low_swaps,
                "min_alternative": args.min_alternative, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "model": args.model}
    cache = LabelCache(args.examples, settings)
    lines = GSM8K.read_text().splitlines()
    # from the end of the file backwards: a run with more or fewer questions reuses the labels
    wanted = list(range(len(lines) - 1, len(lines) - 1 - args.questions, -1))
    if args.fit_only:
        wanted = sorted(cache.done, reverse=True)
    todo = [q for q in wanted if q not in cache.done]
    start = time.perf_counter()
    if todo:
        from specdec.target import target_fingerprint
        from specdec.cli import load_model

        model, tokenizer = load_model(args.model, "float32", "cpu")
        cache.target = target_fingerprint(model)
        progress = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc="labelling")
        for first in range(0, len(todo), args.batch):
            batch = todo[first: first + args.batch]
            batch_start = time.perf_counter()
            # seeded by the batch's first question, so a resumed run picks the same swaps
            generator = torch.Generator().manual_seed(args.seed * 100003 + batch[0])
            labelled = label_questions(
                model, tokenizer, [json.loads(lines[q])["question"] for q in batch],
                swaps=args.swaps, low_swaps=args.low_swaps, min_alternative=args.min_alternative,
                max_new_tokens=args.max_new_tokens, rows=args.rows, generator=generator)
            for q, examples in zip(batch, labelled):
                cache.add(q, examples)
            cache.seconds += time.perf_counter() - batch_start
            cache.save()
            progress.update(len(batch))
        progress.close()
    data = cache.tensors(wanted)
    head, report = fit_head(data, weight_decays, args.seed)
    head.target = cache.target
    report.update(questions=len(wanted), labelling_seconds=round(cache.seconds),
                  labelling_seconds_this_run=round(time.perf_counter() - start),
                  data="GSM8K test, last questions of the file", **settings)
    head.save_pretrained(args.out)
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
