"""Derive the calculator steps of GSM8K's worked solutions (the `<<48/2=24>>` annotations) as data
for config/examples/smollm2-math.yaml (its calculator expert trains on `train_add.parquet`; the
spoken form and the target come from these files by gsm8k_forms.py):

    python config/examples/data/gsm8k_steps.py ../shared/data/gsm8k config/examples/data/gsm8k_steps

Kept: the distinct steps of the train and test solutions that apply one operation to two whole
numbers of at most 100 with a whole, non-negative result (`40+60`, `100/20`, `12*7`). Longer
chains (`750+430+400+700`) and larger numbers (`1250*12`) stay below 10% for a 135M model after the
few minutes of fine-tuning 2 cores allow (bench/results/smollm2_math.txt), and an expert that learns
little leaves a merge nothing to combine. Of these, 450 that add or subtract and 450 that multiply
or divide (drawn with a fixed seed) are the target, `test.parquet`; the rest are the two experts'
data, `train_add.parquet` and `train_mul.parquet`; no expression is in both. Columns: `expr`,
`result`, `kind` (add or mul), `split` (the GSM8K file) and `problem` (its row).
GSM8K is MIT-licensed (openai/grade-school-math); these files are derived from it unchanged.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pandas as pd

STEP = re.compile(r"<<([^>]*)>>")
EXPRESSION = re.compile(r"[\d+\-*/. ()]+")
NUMBER = re.compile(r"-?\d+(\.\d+)?")


LARGEST = 100  # operand bound
TARGET = 450  # target steps of each kind


def steps(path: Path) -> pd.DataFrame:
    rows = []
    for problem, line in enumerate(path.read_text().splitlines()):
        for step in STEP.findall(json.loads(line)["answer"]):
            if step.count("=") != 1:
                continue
            expr, result = (x.strip() for x in step.split("="))
            if not EXPRESSION.fullmatch(expr) or not NUMBER.fullmatch(result) or not re.search(r"\d[+\-*/]", expr):
                continue  # a bare number, a unit or a typo: not an arithmetic step
            ops = re.findall(r"(?<=[\d)\s])[+\-*/]", expr)
            if len(ops) != 1:
                continue
            numbers = re.findall(r"[\d.]+", expr)
            if any(not n.isdigit() or int(n) > LARGEST for n in numbers) or not result.isdigit():
                continue
            kind = "add" if ops[0] in "+-" else "mul"
            rows.append({"expr": expr, "result": result, "kind": kind, "split": path.stem, "problem": problem})
    return pd.DataFrame(rows)


def main(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pool = pd.concat([steps(source / "train.jsonl"), steps(source / "test.jsonl")])
    pool = pool.drop_duplicates("expr", ignore_index=True)
    target = pd.concat([pool[pool["kind"] == kind].sample(TARGET, random_state=0) for kind in ("add", "mul")])
    target.sort_index().reset_index(drop=True).to_parquet(out / "test.parquet", index=False)
    rest = pool.drop(target.index)
    for kind in ("add", "mul"):
        rest[rest["kind"] == kind].reset_index(drop=True).to_parquet(out / f"train_{kind}.parquet", index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
