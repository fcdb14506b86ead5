"""The evaluator against lm-evaluation-harness (the peer), run side by side on the same items.

For each model (the zoo's math model by default, and a random Llama of the zoo's shape with a
32,000-word vocabulary) and each of the zoo's three tasks (math_l2, read_l2: multiple choice;
math_l1: generation), both sides score the same rendered split, single-threaded, batch 64.
Each side runs as its own process, ``--repeats`` times; the best time of each kind is kept:

- load: the model and tokenizer (reported apart, not in the ratios);
- end to end: from the split on disk to per-item results (mergeflow: ``read_split`` and
  ``evaluate_items``; lm-eval: ``simple_evaluate`` on a task over the same parquet file);
- scoring call: from (prompt, answer) strings to log-likelihoods or generations (mergeflow:
  ``encode_requests`` and ``score_requests`` (which also generates); lm-eval: its model's
  ``loglikelihood`` and ``generate_until``).

It prints items/s and the ratios mergeflow / lm-eval (targets: >= 3 end to end, >= 2 scoring
call), and the per-item agreement: items whose correctness differs (acc, acc_norm, exact match),
generations that differ, and the largest |difference| of any choice's log-likelihood. Last, per
task, the time mergeflow's linear layers alone take in one more run (the matrix products any exact
float32 scorer computes for those tokens) against the time a 2x scoring call would allow: where
the products alone fill that time, the target needs fewer tokens, not a faster pass.

lm-eval is a bench-only peer, not a dependency: the script makes (or reuses) a virtualenv with
the same CPU torch and transformers as this one and lm-eval 0.4.13, and runs its side there.

    PYTHONPATH=workflow python bench/evaluate.py --zoo results/zoo --data results/data \\
        [--peer-venv bench/.peer-venv] [--models math] [--split test] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER = "lm-eval[hf]==0.4.13"
TASKS = {"math_l2": "mc_loglik", "read_l2": "mc_loglik", "math_l1": "exact_match"}
TARGETS = {"end to end": 3.0, "scoring call": 2.0}
# One thread everywhere: the BLAS pools read these before torch starts.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TRANSFORMERS_VERBOSITY": "error"}


# ---------------------------------------------------------------------------------------------
# The two sides. Each runs in a process of its own (``--side``) and writes a JSON report:
# {"load_s", "tasks": {task: {"end_to_end_s", "scoring_s", "items": {item_id: {...}}}}}.


class Stopwatch:
    """Wraps functions so that the time spent in them (outermost calls only) adds up."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - t0
        return timed


def run_mergeflow(model_dir: str, splits: dict[str, str], batch_size: int, max_new_tokens: int,
                  agreement: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401 (imported before the load is timed, as lm-eval's import does)

    from mergeflow import evaluate
    from mergeflow.data import read_split

    settings = evaluate.EvalSettings.from_config({"batch_size": batch_size, "max_new_tokens": max_new_tokens})
    t0 = time.perf_counter()
    model, tokenizer = evaluate.load_causal_lm(model_dir, settings)
    report: dict = {"load_s": time.perf_counter() - t0, "tasks": {}}
    watch = Stopwatch()
    timed = ("encode_requests", "_generation_contexts", "continuation_logliks", "score_requests", "generate_greedy")
    for name in timed:
        setattr(evaluate, name, watch.wrap(getattr(evaluate, name)))
    for task, path in splits.items():
        watch.seconds = 0.0
        t0 = time.perf_counter()
        items = read_split(path)
        out = evaluate.evaluate_items(model, tokenizer, items, TASKS[task], settings)
        total, scoring = time.perf_counter() - t0, watch.seconds
        rows = {}
        for i, row in enumerate(out.itertuples(index=False)):
            rows[row.item_id] = {"correct": int(row.correct), "gold_loglik": row.loglik}
            if TASKS[task] == "exact_match":
                rows[row.item_id]["generation"] = row.generation
            else:
                rows[row.item_id]["logliks"] = list(row.choice_logliks)
        if agreement and TASKS[task] == "mc_loglik":  # untimed: the length-normalised scorer too
            norm = evaluate.evaluate_items(model, tokenizer, items, "mc_loglik_norm", settings)
            for item, correct in zip(norm["item_id"], norm["correct"]):
                rows[item]["acc_norm"] = int(correct)
        report["tasks"][task] = {"end_to_end_s": total, "scoring_s": scoring, "items": rows,
                                 "products_s": products_seconds(model, tokenizer, items, TASKS[task], settings)}
    return report


def products_seconds(model, tokenizer, items, scorer: str, settings) -> float:
    """The time one more (untimed) run spends in the model's linear layers alone: the matrix
    products that float32 scoring of these tokens cannot avoid, whoever computes them."""
    import torch

    from mergeflow import evaluate

    watch = Stopwatch()
    plain = torch.nn.Linear.forward
    torch.nn.Linear.forward = watch.wrap(plain)
    try:
        evaluate.evaluate_items(model, tokenizer, items, scorer, settings)
    finally:
        torch.nn.Linear.forward = plain
    return watch.seconds


def peer_task_yaml(task: str, path: str, max_new_tokens: int) -> str:
    """An lm-eval task over the same rendered split: the prompt as it is, the same delimiter."""
    lines = [f"task: bench_{task}", "dataset_path: parquet", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(path)}", "test_split: test", "doc_to_text: prompt", 'target_delimiter: " "']
    if TASKS[task] == "exact_match":
        lines += ["output_type: generate_until", "doc_to_target: target", "generation_kwargs:",
                  '  until: ["\\n"]', "  do_sample: false", f"  max_gen_toks: {max_new_tokens}",
                  "metric_list:", "  - metric: exact_match"]
    else:
        lines += ["output_type: multiple_choice", "doc_to_choice: choices", "doc_to_target: answer",
                  "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    return "\n".join(lines) + "\n"


def run_peer(model_dir: str, splits: dict[str, str], batch_size: int, max_new_tokens: int,
             agreement: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    lm = HFLM(pretrained=model_dir, batch_size=batch_size, device="cpu", dtype="float32")
    report: dict = {"load_s": time.perf_counter() - t0, "tasks": {}}
    watch = Stopwatch()
    lm.loglikelihood = watch.wrap(lm.loglikelihood)
    lm.generate_until = watch.wrap(lm.generate_until)
    with tempfile.TemporaryDirectory() as tmp:
        for task, path in splits.items():
            Path(tmp, f"{task}.yaml").write_text(peer_task_yaml(task, path, max_new_tokens))
        manager = TaskManager(include_path=tmp)  # indexing lm-eval's own task library: setup, untimed
        for task in splits:
            watch.seconds = 0.0
            t0 = time.perf_counter()
            result = lm_eval.simple_evaluate(model=lm, tasks=[f"bench_{task}"], task_manager=manager,
                                             batch_size=batch_size, log_samples=True)
            total = time.perf_counter() - t0
            rows = {}
            for sample in result["samples"][f"bench_{task}"]:
                doc = sample["doc"]
                if TASKS[task] == "exact_match":
                    rows[doc["item_id"]] = {"generation": sample["filtered_resps"][0]}
                else:
                    rows[doc["item_id"]] = {"logliks": [float(r[0][0]) for r in sample["resps"]],
                                            "correct": int(sample["acc"]), "acc_norm": int(sample["acc_norm"])}
            report["tasks"][task] = {"end_to_end_s": total, "scoring_s": watch.seconds, "items": rows}
    return report


# ---------------------------------------------------------------------------------------------
# The driver: the peer's virtualenv, the models, the runs, the figures.


def peer_python(venv: Path) -> Path:
    """The peer virtualenv's interpreter, made first where the venv lacks lm-eval: the same torch
    (its CPU wheel) and transformers as this interpreter, and the pinned lm-eval."""
    import torch
    import transformers

    python = venv / "bin" / "python"
    found = python.exists() and subprocess.run([python, "-c", "import lm_eval.models.huggingface"],
                                               capture_output=True).returncode == 0
    if found:
        return python
    print(f"making the peer's virtualenv {venv} ({PEER}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}", PEER], check=True)
    return python


def vocab32k_model(zoo_model: Path, out: Path) -> Path:
    """A random Llama of the zoo model's shape and tokenizer with a 32,000-word vocabulary (the
    tokenizer's ids are its first rows): the size of output layer where logits dominate."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from mergeflow.evaluate import load_tokenizer
    from mergeflow.outputs import save_model

    if (out / "config.json").exists():
        return out
    config = AutoConfig.from_pretrained(zoo_model)
    config.vocab_size = 32000
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(config), load_tokenizer(zoo_model), out)
    return out


def run_side(python: Path, side: str, model: Path, splits: dict[str, str], batch_size: int, max_new_tokens: int,
             agreement: bool) -> dict:
    """One side's report from a process of its own (this script with ``--side``), single-threaded."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, **SINGLE_THREAD, "PYTHONPATH": os.pathsep.join(
            [str(REPO / "workflow"), os.environ.get("PYTHONPATH", "")])}
        cmd = [python, __file__, "--side", side, "--model", model, "--splits", json.dumps(splits),
               "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens), "--out", out.name]
        done = subprocess.run([str(c) for c in cmd + (["--agreement"] if agreement else [])], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{side} on {model} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def best(reports: list[dict]) -> dict:
    """The first report's items with each time the best over the repeats."""
    out = {"load_s": min(r["load_s"] for r in reports), "tasks": {}}
    for task, first in reports[0]["tasks"].items():
        out["tasks"][task] = {**first, **{key: min(r["tasks"][task][key] for r in reports)
                                          for key in ("end_to_end_s", "scoring_s", "products_s")}}
    return out


def agreement(task: str, ours: dict, peer: dict, split: str) -> dict:
    """Items whose correctness differs (a generation is judged by mergeflow's rule on both
    sides), generations that differ, and the largest |difference| of a choice's log-likelihood."""
    import pandas as pd

    from mergeflow.data import extract_number

    assert ours.keys() == peer.keys(), f"{task}: the two sides scored different items"
    if TASKS[task] == "exact_match":
        targets = pd.read_parquet(split).set_index("item_id")["target"]

        def right(item: str) -> int:
            got, want = extract_number(peer[item]["generation"]), extract_number(str(targets[item]))
            return int(got is not None and want is not None and float(got) == float(want))
        return {"correct differ": sum(ours[i]["correct"] != right(i) for i in ours),
                "generations differ": sum(ours[i]["generation"] != peer[i]["generation"] for i in ours)}
    delta = max(abs(a - b) for i in ours for a, b in zip(ours[i]["logliks"], peer[i]["logliks"], strict=True))
    return {"correct differ": sum(ours[i]["correct"] != peer[i]["correct"] for i in ours),
            "acc_norm differ": sum(ours[i]["acc_norm"] != peer[i]["acc_norm"] for i in ours),
            "max |d loglik|": delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=REPO / "results" / "zoo", help="the built zoo")
    parser.add_argument("--data", type=Path, default=REPO / "results" / "data", help="the rendered task splits")
    parser.add_argument("--models", default="math", help="zoo models, comma-separated")
    parser.add_argument("--no-vocab32k", action="store_true", help="skip the 32,000-word model")
    parser.add_argument("--split", default="test")
    parser.add_argument("--peer-venv", type=Path, default=REPO / "bench" / ".peer-venv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    # one side's run, in its own process
    parser.add_argument("--side", choices=["mergeflow", "lm-eval"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--splits", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--agreement", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        run = run_mergeflow if args.side == "mergeflow" else run_peer
        report = run(args.model, json.loads(args.splits), args.batch_size, args.max_new_tokens, args.agreement)
        Path(args.out).write_text(json.dumps(report))
        return

    splits = {task: str((args.data / task / f"{args.split}.parquet").resolve()) for task in TASKS}
    missing = [p for p in splits.values() if not Path(p).exists()]
    models = {name: (args.zoo / name).resolve() for name in args.models.split(",")}
    missing += [str(p) for p in models.values() if not p.is_dir()]
    if missing:
        sys.exit(f"missing {missing}: build the zoo and render the tasks first "
                 "(snakemake --cores 1 results/data/math_l2/test.parquet ...), or pass --zoo and --data")
    peer = peer_python(args.peer_venv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_vocab32k:
            models["vocab32k"] = vocab32k_model(next(iter(models.values())), Path(tmp) / "vocab32k")
        results = {}
        for name, model in models.items():
            runs: dict[str, list[dict]] = {"mergeflow": [], "lm-eval": []}
            for r in range(args.repeats):  # the sides alternate, so that a change of load hits both
                for side, python in (("mergeflow", Path(sys.executable)), ("lm-eval", peer)):
                    runs[side].append(run_side(python, side, model, splits, args.batch_size, args.max_new_tokens,
                                               agreement=r == 0))
            results[name] = {side: best(reports) for side, reports in runs.items()}
    load_after = os.getloadavg()

    print(f"mergeflow against {PEER} (simple_evaluate, HF backend), {args.split} split, batch {args.batch_size}, "
          f"1 thread, best of {args.repeats} processes per side")
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} before, {load_after[0]:.2f} after")
    worst = {kind: float("inf") for kind in TARGETS}
    for name, sides in results.items():
        ours, theirs = sides["mergeflow"], sides["lm-eval"]
        print(f"\nmodel {name}: load {ours['load_s']:.2f} s mergeflow, {theirs['load_s']:.2f} s lm-eval")
        print(f"{'task':8} {'items':>5}  {'end to end items/s':>27} {'ratio':>6}  {'scoring call items/s':>27} "
              f"{'ratio':>6}  agreement")
        for task in TASKS:
            a, b = ours["tasks"][task], theirs["tasks"][task]
            n = len(a["items"])
            e2e = (n / a["end_to_end_s"], n / b["end_to_end_s"])
            score = (n / a["scoring_s"], n / b["scoring_s"])
            worst["end to end"] = min(worst["end to end"], e2e[0] / e2e[1])
            worst["scoring call"] = min(worst["scoring call"], score[0] / score[1])
            agree = agreement(task, a["items"], b["items"], splits[task])
            agree_text = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}/{n}" for k, v in agree.items())
            print(f"{task:8} {n:5d}  {e2e[0]:9.0f} mf {e2e[1]:9.0f} lm-eval {e2e[0] / e2e[1]:6.2f}  "
                  f"{score[0]:9.0f} mf {score[1]:9.0f} lm-eval {score[0] / score[1]:6.2f}  {agree_text}")
    print("\nthe matrix products alone (mergeflow's linear layers, gold answers' tokens included), against the "
          f"time a {TARGETS['scoring call']:g}x scoring call would allow:")
    for name, sides in results.items():
        ours, theirs = sides["mergeflow"]["tasks"], sides["lm-eval"]["tasks"]
        print("  " + ", ".join(f"{name} {task} {ours[task]['products_s']:.2f} s of "
                               f"{theirs[task]['scoring_s'] / TARGETS['scoring call']:.2f} s" for task in TASKS))
    print()
    for kind, target in TARGETS.items():
        print(f"lowest ratio {kind}: {worst[kind]:.2f} (target >= {target:g}): "
              f"{'met' if worst[kind] >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
