"""Derive a second form of GSM8K's add/subtract calculator steps, spoken (`48 plus 24 is`), from the
files of config/examples/data/gsm8k_steps.py, for a pair of experts that know one skill in two forms
(config/examples/smollm2-math.yaml):

    python config/examples/data/gsm8k_forms.py config/examples/data/gsm8k_steps

Writes beside them `train_add_spoken.parquet` (every add/subtract train step of two whole numbers,
spoken: column `spoken`) and `test_forms.parquet` (the target's 450 add/subtract steps, every other one
in calculator form `48+24 =` and the rest spoken; column `prompt`, the form in `form`). GSM8K is
MIT-licensed (openai/grade-school-math); these files are derived from it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

WORD = {"+": "plus", "-": "minus"}
TWO_NUMBERS = re.compile(r"\s*\(?(\d+)\s*([-+])\s*(\d+)\)?\s*")


def spoken(expr: str) -> str | None:
    """`48+24` -> `48 plus 24 is`; None for a step that is not one operation on two whole numbers."""
    match = TWO_NUMBERS.fullmatch(expr)
    if match is None:
        return None
    a, op, b = match.groups()
    return f"{a} {WORD[op]} {b} is"


def main(steps: Path) -> None:
    train = pd.read_parquet(steps / "train_add.parquet")
    train = train.assign(spoken=train["expr"].map(spoken)).dropna(subset=["spoken"])
    train.reset_index(drop=True).to_parquet(steps / "train_add_spoken.parquet", index=False)
    test = pd.read_parquet(steps / "test.parquet")
    test = test[(test["kind"] == "add") & test["expr"].map(spoken).notna()].reset_index(drop=True)
    # every other step in each form: a seeded draw here would repeat the data stage's own
    # permutation (seed 0) and put one form in the test split and the other in the search split
    calculator = np.arange(len(test)) % 2 == 0
    test["form"] = np.where(calculator, "calculator", "spoken")
    test["prompt"] = [f"{e} =" if c else spoken(e) for e, c in zip(test["expr"], calculator)]
    test.to_parquet(steps / "test_forms.parquet", index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
