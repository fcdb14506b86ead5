"""Derive small local copies of three lm-evaluation-harness tasks' data, in the schema of each
task's hub dataset, for config/examples/lm-eval-tasks.yaml, the tests and bench/lm_eval_tasks.py:

    python config/examples/data/lm_eval_tasks.py ../shared/data config/examples/data/lm_eval

- `gsm8k_{train,test}.jsonl` (openai/gsm8k `main`: `question`, `answer`): the first 200 problems of
  GSM8K's train and test files, unchanged (the task draws its 5 few-shot examples from train);
- `mgsm_{en,ja}_{train,test}.jsonl` (juletxara/mgsm: `question`, `answer`, `answer_number`,
  `equation_solution`): test, the first 100 problems of `mgsm_<lang>.tsv` with `answer` and
  `equation_solution` null as on the hub (numbers without thousands separators); train, the 8
  translated exemplars (`question` and `answer` with their "Question:" / "Step-by-Step Answer:"
  prefixes, as on the hub);
- `arc_numbers_{train,test}.jsonl` (allenai/ai2_arc: `id`, `question`, `choices` {`text`, `label`},
  `answerKey`), a multiple-choice task in ARC's schema made from GSM8K problems: the question, and
  four numbers as choices (the answer, answer + 1, answer - 1 and 2 x answer + 3, in a seeded
  order); train from GSM8K's train problems 200-299, test from its test problems 200-399.

GSM8K is MIT-licensed (openai/grade-school-math); MGSM (google-research/url-nlp) is under CC BY 4.0;
these files are derived from them, values unchanged but for the separators and the choices above.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np


def jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def gold_number(answer: str) -> int:
    return int(re.sub(r"[^0-9-]", "", answer.split("####")[-1]))


def arc_rows(problems: list[dict], prefix: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, problem in enumerate(problems):
        gold = gold_number(problem["answer"])
        numbers = [gold, gold + 1, gold - 1, 2 * gold + 3]
        order = rng.permutation(4)
        labels = ["A", "B", "C", "D"]
        rows.append({"id": f"{prefix}-{i}", "question": problem["question"],
                     "choices": {"text": [str(numbers[j]) for j in order], "label": labels},
                     "answerKey": labels[int(np.argmax(order == 0))]})
    return rows


def main(shared: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gsm8k = {split: [json.loads(line) for line in (shared / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
             for split in ("train", "test")}
    jsonl(out / "gsm8k_train.jsonl", gsm8k["train"][:200])
    jsonl(out / "gsm8k_test.jsonl", gsm8k["test"][:200])
    exemplars = json.loads((shared / "mgsm" / "exemplars.json").read_text())
    for lang in ("en", "ja"):
        tests = [line.split("\t") for line in (shared / "mgsm" / f"mgsm_{lang}.tsv").read_text().splitlines()[:100]]
        jsonl(out / f"mgsm_{lang}_test.jsonl",
              [{"question": q, "answer": None, "answer_number": int(a.replace(",", "")), "equation_solution": None}
               for q, a in tests])
        shots = exemplars["exemplars"][lang]
        jsonl(out / f"mgsm_{lang}_train.jsonl",
              [{"question": shots[k]["q"], "answer": shots[k]["a"], "answer_number": exemplars["number_answers"][i],
                "equation_solution": exemplars["equation_solutions"][i]} for i, k in enumerate(sorted(shots, key=int))])
    jsonl(out / "arc_numbers_train.jsonl", arc_rows(gsm8k["train"][200:300], "train", 0))
    jsonl(out / "arc_numbers_test.jsonl", arc_rows(gsm8k["test"][200:400], "test", 1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
