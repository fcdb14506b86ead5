"""Derive the calculator steps of GSM8K's worked solutions (the `<<48/2=24>>` annotations) as data
for config/examples/smollm2-math.yaml:

    python config/examples/data/gsm8k_steps.py ../shared/data/gsm8k config/examples/data/gsm8k_steps

writes `train_add.parquet` and `train_mul.parquet` (distinct steps of the train solutions that
add or subtract, or multiply or divide: the two experts' data) and `test.parquet` (distinct steps
of the test solutions, both kinds, none of them also a train step: the target). Only steps of one
operation on two numbers are kept (`400+60`, `1000/20`): chains of several (`750+430+400+700`)
stay near zero for a 135M model after the few minutes of fine-tuning 2 cores allow, and a target
nobody gets right cannot show what a merge adds. Columns: `expr`, `result`, `kind` (add or mul)
and `problem` (the row of the source file).
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
            kind = "add" if ops[0] in "+-" else "mul"
            rows.append({"expr": expr, "result": result, "kind": kind, "problem": problem})
    return pd.DataFrame(rows).drop_duplicates("expr", ignore_index=True)


def main(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, test = steps(source / "train.jsonl"), steps(source / "test.jsonl")
    for kind in ("add", "mul"):
        train[train["kind"] == kind].reset_index(drop=True).to_parquet(out / f"train_{kind}.parquet", index=False)
    test[~test["expr"].isin(train["expr"])].reset_index(drop=True).to_parquet(out / "test.parquet", index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
