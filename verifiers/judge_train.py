"""Train a judge head for a target model with automatically built labels (simplified AutoJudge).

AutoJudge labels a draft/target mismatch as acceptable when swapping the draft token into the
target's answer leaves the task's answer unchanged. Our simplified version, on GSM8K:

1. the target answers a question greedily; its final answer is the last number in the text;
2. at up to ``--swaps`` positions of that answer where the target's second choice is plausible
   (probability >= ``--min-alternative``), the second choice plays the mismatched draft token;
3. the target continues greedily after the swapped token; the label is 1 when the final number is
   unchanged, else 0;
4. the feature is the target's last hidden state at the swapped token's position, exactly what
   the loop passes to the judge as ``context["children_hidden"]``.

A linear `JudgeHead` is fitted on 80% of the examples (class-balanced logistic loss) and its
accuracy on the other 20% is written with the head. Questions are taken from the end of the GSM8K
file, so evaluate on the others.

    python -m verifiers.judge_train --out verifiers/weights/judge-smollm2 --questions 40 \
        --examples runs/judge_examples.pt

References: see `verifiers.judge`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

import specdec
from verifiers.judge import JudgeHead, train_head

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


@torch.no_grad()
def greedy(model, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    if max_new_tokens <= 0:
        return ids
    return model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens,
                          pad_token_id=eos, eos_token_id=eos)


@torch.no_grad()
def examples_for_question(model, tokenizer, question: str, swaps: int, min_alternative: float,
                          max_new_tokens: int):
    """[(hidden state [H], label)] for the swapped positions of one question."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if not torch.is_tensor(prompt) else prompt
    eos = tokenizer.eos_token_id
    answer = greedy(model, prompt, max_new_tokens, eos)
    start = prompt.shape[1]
    reference = final_number(tokenizer.decode(answer[0, start:], skip_special_tokens=True))
    if reference is None:
        return []
    probs = torch.softmax(model(answer).logits[0, start - 1: -1].float(), -1)  # [T, V]
    top2 = probs.topk(2, dim=-1)
    plausible = torch.nonzero(top2.values[:, 1] >= min_alternative).flatten()
    if plausible.numel() == 0:
        return []
    chosen = plausible[torch.linspace(0, plausible.numel() - 1, min(swaps, plausible.numel()))
                       .round().long()].tolist()
    swapped, hidden = [], []
    for offset in chosen:
        alternative = top2.indices[offset, 1].view(1, 1)
        sequence = torch.cat([answer[:, : start + offset], alternative], dim=1)  # [1, L]
        hidden.append(model(sequence, output_hidden_states=True).hidden_states[-1][0, -1].float())
        swapped.append(sequence[0])
    # continue every swap in one left-padded batch; generate() derives positions from the mask
    width = max(len(sequence) for sequence in swapped)
    pad = eos if eos is not None else 0
    batch = torch.full((len(swapped), width), pad, dtype=torch.long)
    mask = torch.zeros((len(swapped), width), dtype=torch.long)
    for row, sequence in enumerate(swapped):
        batch[row, width - len(sequence):] = sequence
        mask[row, width - len(sequence):] = 1
    continued = model.generate(batch, attention_mask=mask, do_sample=False,
                               max_new_tokens=max(1, max_new_tokens - min(chosen) - 1),
                               pad_token_id=pad, eos_token_id=eos)
    examples = []
    for row, (offset, sequence) in enumerate(zip(chosen, swapped)):
        # the answer so far plus at most the continuation the unswapped answer had room for
        tail = continued[row, width: width + max_new_tokens - offset - 1]
        text = tokenizer.decode(torch.cat([sequence[start:], tail]), skip_special_tokens=True)
        examples.append((hidden[row], float(final_number(text) == reference)))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for config.json + model.safetensors")
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--min-alternative", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="L2 penalty: hidden states are wide and labelled swaps few")
    parser.add_argument("--examples", help="cache of labelled swaps (.pt), written after every "
                        "question and reused (without labelling) when present")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.examples and Path(args.examples).exists():
        features, labels = torch.load(args.examples).values()
    else:
        model, tokenizer = specdec.load_embedded()
        lines = GSM8K.read_text().splitlines()[-args.questions:]
        rows, targets = [], []
        for line in tqdm(lines, desc="labelling swaps"):
            question = json.loads(line)["question"]
            for hidden, label in examples_for_question(model, tokenizer, question, args.swaps,
                                                       args.min_alternative, args.max_new_tokens):
                rows.append(hidden)
                targets.append(label)
            if args.examples and rows:  # saved as it goes: labelling is slow on a CPU
                torch.save({"features": torch.stack(rows), "labels": torch.tensor(targets)},
                           args.examples)
        if len(targets) < 10:
            raise SystemExit(f"only {len(targets)} labelled swaps: raise --questions")
        features, labels = torch.stack(rows), torch.tensor(targets)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    split = int(0.8 * len(labels))
    train, held_out = order[:split], order[split:]
    torch.manual_seed(args.seed)
    head = JudgeHead(features.shape[1])
    # hidden states have a large scale; standardising inside the head keeps it a plain linear map
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    train_head(head, (features[train] - mean) / std, labels[train], epochs=300, lr=1e-2,
               weight_decay=args.weight_decay)
    with torch.no_grad():
        head.net.weight /= std
        head.net.bias -= (head.net.weight * mean).sum()
        predicted = (head(features) > 0).float()
    report = {
        "examples": len(labels), "acceptable_fraction": float(labels.mean()),
        "train_accuracy": float((predicted[train] == labels[train]).float().mean()),
        "held_out_accuracy": float((predicted[held_out] == labels[held_out]).float().mean()),
        "held_out_majority_baseline": float(max(labels[held_out].mean(), 1 - labels[held_out].mean())),
        "questions": args.questions, "swaps": args.swaps, "max_new_tokens": args.max_new_tokens,
        "weight_decay": args.weight_decay,
        "data": "GSM8K test, last questions of the file",
    }
    from drafters.trained import target_fingerprint
    head.target = target_fingerprint(specdec.load_embedded()[0])
    head.save_pretrained(args.out)
    (Path(args.out) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
