"""Data-parallel eval: two CPU processes (torchrun, gloo) give the records of one process."""

from __future__ import annotations

import os
import subprocess
import sys

from evals.runner import MERGED, TIMING_FIELDS, read_records
from test_evals_datasets import HUMANEVAL_ROW, write_jsonl
from test_evals_tiny import save_tiny


def test_two_processes_give_the_records_of_one(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "mt_bench/question.jsonl", [
        {"question_id": i, "category": "writing", "turns": [f"Repeat: ab ab ab {i}"]}
        for i in range(3)])
    write_jsonl(data / "gsm8k/test.jsonl", [
        {"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(2)])
    write_jsonl(data / "humaneval/HumanEval.jsonl.gz", [HUMANEVAL_ROW], gz=True)
    model = save_tiny(tmp_path / "tiny")
    eval_args = ["eval", "--model", str(model), "--data-dir", str(data), "--limit", "3",
                 "--methods", "baseline,pld,trie+exact", "--max-new-tokens", "10",
                 "--warmup", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "specdec.cli", *eval_args,
                             "--out", str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--standalone", "-m", "specdec.cli", *eval_args,
                             "--out", str(tmp_path / "two")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]

    shards = sorted(p.name for p in (tmp_path / "two").glob("records.rank*.jsonl"))
    assert shards == ["records.rank0.jsonl", "records.rank1.jsonl"]
    by_rank = [read_records(tmp_path / "two" / name) for name in shards]
    assert all(by_rank) and {r["rank"] for r in by_rank[1]} == {1}

    def stable(path):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
                for r in read_records(path / MERGED)]

    one, two = stable(tmp_path / "one"), stable(tmp_path / "two")
    assert len(one) == (3 + 2 + 1) * 3
    assert two == one
