"""Quality metrics: GSM8K answer matching, HumanEval completion extraction and execution."""

from __future__ import annotations

import socket
import time

import pytest

from evals.datasets import load
from evals.execution import humaneval_program, run_program
from evals.metrics import (gsm8k_correct, gsm8k_prediction, humaneval_completion,
                           humaneval_passed)
from test_evals_datasets import SHARED_DATA


@pytest.mark.parametrize("output, expected", [
    ("She has 3 + 4 = 7 apples.\nThe answer is 7.", "7"),
    ("Total: $1,250.50 in all", "1250.50"),
    ("#### 42\nchecking: 41 + 1", "42"),
    ("It loses -3 degrees", "-3"),
    ("no digits here", None),
])
def test_gsm8k_prediction_takes_the_final_number(output, expected):
    assert gsm8k_prediction(output) == expected


def test_gsm8k_correct_compares_numbers():
    assert gsm8k_correct("so the answer is 18.", "18")
    assert gsm8k_correct("she pays $2,000.00", "2000")
    assert not gsm8k_correct("the answer is 17", "18")
    assert not gsm8k_correct("I do not know", "18")


PROBLEM = {
    "task_id": "Toy/0",
    "prompt": "import math\n\n\ndef hyp(a, b):\n    \"\"\"Hypotenuse.\"\"\"\n",
    "canonical_solution": "    return math.sqrt(a * a + b * b)\n",
    "test": "def check(candidate):\n    assert candidate(3, 4) == 5\n",
    "entry_point": "hyp",
}


def test_completion_from_a_chat_answer_with_a_full_function():
    answer = ("Here you go:\n```python\nimport math\n\ndef hyp(a, b):\n"
              "    return math.hypot(a, b)\n```\nIt uses hypot.")
    completion = humaneval_completion(answer, "hyp")
    assert "return math.hypot(a, b)" in completion and "It uses" not in completion
    assert humaneval_passed(answer, PROBLEM)


def test_completion_that_continues_the_body():
    assert humaneval_passed(PROBLEM["canonical_solution"], PROBLEM)
    assert not humaneval_passed("    return a + b\n", PROBLEM)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    if SHARED_DATA.is_dir():
        problems = [e.reference for e in load("humaneval", SHARED_DATA)][::16]
    else:
        problems = [PROBLEM]
    for problem in problems:
        good = run_program(humaneval_program(problem, problem["canonical_solution"]))
        assert good.passed, (problem["task_id"], good.detail)
        wrong = run_program(humaneval_program(problem, "    return None\n"))
        assert not wrong.passed and wrong.status == "failed", problem["task_id"]


def test_a_hanging_program_is_killed_at_the_timeout():
    start = time.perf_counter()
    result = run_program("import time\nwhile True:\n    time.sleep(0.01)\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - start < 6


def test_network_is_blocked_in_the_child():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        # the parent can connect, so a failure in the child is the guard's doing
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for program in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n",
                        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
                        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1')\n"):
            result = run_program(program)
            assert not result.passed
            assert "network access is disabled" in result.detail, result.detail
    finally:
        listener.close()


def test_exiting_early_does_not_count_as_passing():
    assert not run_program("import sys\nsys.exit(0)\nassert False\n").passed
    assert not run_program("import os\nos._exit(0)\n").passed
    assert run_program("x = 1\nassert x == 1\n").passed


def test_programs_run_in_a_fresh_temporary_directory():
    program = ("import os\nassert os.path.basename(os.getcwd()).startswith('specdec-exec-')\n"
               "assert os.listdir('.') == ['program.py']\n")
    result = run_program(program)
    assert result.passed, result.detail
