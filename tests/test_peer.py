"""Per-item agreement with lm-evaluation-harness on the tiny zoo, through the bench's own two
sides (``bench/evaluate.py``), each in its own process. Skipped where the peer's virtualenv is
absent (``MERGEFLOW_PEER_VENV``, default ``bench/.peer-venv``; the bench makes it)."""

import importlib.util
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = Path(os.environ.get("MERGEFLOW_PEER_VENV", REPO / "bench" / ".peer-venv")) / "bin" / "python"

# fresh Python processes (the bench's two sides): slow; skipped without the peer's virtualenv
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"the peer (lm-eval) is not installed: no {PEER_PYTHON}")]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_evaluate", REPO / "bench" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_item_agrees_with_lm_eval(tiny_zoo, tmp_path):
    bench = _bench()
    splits = {}
    for task in bench.TASKS:
        frame = pd.read_parquet(tiny_zoo / "tasks" / f"{task}.parquet").head(48)
        if bench.TASKS[task] == "exact_match":
            frame = frame.assign(choices=[[] for _ in range(len(frame))], answer=-1)
        splits[task] = str(tmp_path / f"{task}.parquet")
        frame.assign(prompt=frame["question"])[["item_id", "prompt", "choices", "answer", "target"]].to_parquet(
            splits[task])
    model = tiny_zoo / "math"
    ours = bench.run_side(Path(sys.executable), "mergeflow", model, splits, 16, 4, agreement=True)
    peer = bench.run_side(PEER_PYTHON, "lm-eval", model, splits, 16, 4, agreement=True)
    for task in bench.TASKS:
        agree = bench.agreement(task, ours["tasks"][task]["items"], peer["tasks"][task]["items"], splits[task])
        assert agree["correct differ"] == 0, (task, agree)
        assert agree.get("acc_norm differ", 0) == 0, (task, agree)
        assert agree.get("generations differ", 0) == 0, (task, agree)
        assert agree.get("max |d loglik|", 0.0) < 1e-4, (task, agree)
