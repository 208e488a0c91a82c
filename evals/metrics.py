"""Quality of one output: GSM8K exact match of the final number, HumanEval pass@1.

GSM8K: the prediction is the number after the last ``####`` if the model wrote one, else the last
number in the answer (commas and a trailing period dropped); it is correct iff it equals the
reference's final answer as a number (so ``18`` matches ``18.00``).

HumanEval: chat models answer with a fenced code block. The completion is the first fenced block
(or the whole answer when there is none); when it defines the entry point it is appended after
the prompt (which defines the stub with its imports and docstring, so later definitions win),
otherwise it is read as the body that continues the prompt. The program runs with
`evals.execution.run_program`; one greedy sample per problem gives pass@1.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from evals.datasets import Example
from evals.execution import humaneval_program, run_program

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def _as_number(text: str) -> Decimal | None:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def gsm8k_prediction(output: str) -> str | None:
    """The final number of a model's GSM8K answer, or None if it wrote no number."""
    tail = output.split("####")[-1] if "####" in output else output
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    return numbers[0 if "####" in output else -1].replace(",", "").replace("$", "")


def gsm8k_correct(output: str, reference: str) -> bool:
    predicted = gsm8k_prediction(output)
    if predicted is None:
        return False
    expected = _as_number(reference)
    return expected is not None and _as_number(predicted) == expected


def humaneval_completion(output: str, entry_point: str) -> str:
    """The code to place after the prompt (see the module docstring)."""
    fenced = _FENCE.search(output)
    code = fenced.group(1) if fenced else output
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return "\n\n" + code
    return code


def humaneval_passed(output: str, problem: dict, timeout: float = 10.0) -> bool:
    completion = humaneval_completion(output, problem["entry_point"])
    return run_program(humaneval_program(problem, completion), timeout=timeout).passed


def score(example: Example, output: str, timeout: float = 10.0) -> bool | None:
    """Whether ``output`` answers ``example`` correctly; None where the dataset has no metric."""
    if example.dataset == "gsm8k":
        return gsm8k_correct(output, example.reference)
    if example.dataset == "humaneval":
        return humaneval_passed(output, example.reference, timeout)
    return None
