"""The GPU path, checked against this script's own CPU run: the evaluator on CUDA in float32 and
bfloat16 (accuracy, per-item agreement with the CPU in float32, items/s, peak GPU memory), and
the in-memory merger on CUDA (its tensors against the CPU merger's, the merged model scored).

    PYTHONPATH=workflow python bench/gpu_check.py [--zoo results/zoo] [--data results/data]

Needs a finished default's zoo and data (results/zoo, results/data); prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mergeflow.data import read_split
from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm, load_tokenizer
from mergeflow.merge import InMemoryMerger, recipe_from_dict

TASKS = {"math_l2": "mc_loglik", "math_l1": "exact_match"}


def settings(device: str, dtype: str) -> EvalSettings:
    return EvalSettings(batch_size=128, device=device, dtype=dtype, max_length="model", max_new_tokens=6,
                        add_bos="auto")


def score(model, tok, items, scorer: str, device: str):
    """Responses and items/s (best of 3, after one warm-up batch)."""
    evaluate_items(model, tok, items.head(128), scorer, settings(device, "float32"))
    best, out = float("inf"), None
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = evaluate_items(model, tok, items, scorer, settings(device, "float32"))
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, len(items) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=Path("results/zoo"))
    parser.add_argument("--data", type=Path, default=Path("results/data"))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dev = args.device
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; CPU baseline on 1 thread")
    items = {t: read_split(args.data / t / "test.parquet") for t in TASKS}
    print("| model | task | device, dtype | accuracy | items/s | vs CPU float32 | correct differ | max abs d loglik | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name in ["math", "lang"]:
        for task, scorer in TASKS.items():
            reference, reference_speed = None, None
            for device, dtype in [("cpu", "float32"), (dev, "float32"), (dev, "bfloat16")]:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                model, tok = load_causal_lm(args.zoo / model_name, settings(device, dtype))
                out, speed = score(model, tok, items[task], scorer, device)
                peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
                if reference is None:
                    reference, reference_speed = out, speed
                differ = int((out["correct"] != reference["correct"]).sum())
                dl = float(np.abs(out["loglik"] - reference["loglik"]).max())
                print(f"| {model_name} | {task} | {device}, {dtype} | {out['correct'].mean():.3f} | {speed:.0f} | "
                      f"{speed / reference_speed:.2f}x | {differ}/{len(out)} | {dl:.2e} | {peak:.0f} |", flush=True)
                del model
    # the in-memory merger on the GPU: the halving search's kind of recipe
    recipe = recipe_from_dict({"merge_method": "task_arithmetic", "base_model": str(args.zoo / "base"), "models": [
        {"model": str(args.zoo / "math"), "parameters": {"weight": [1.04, 0.89, 0.25, 0.90]}},
        {"model": str(args.zoo / "lang"), "parameters": {"weight": [0.29, 1.01, 0.44, 0.11]}}]})
    paths = [str(args.zoo / m) for m in ("base", "math", "lang")]
    merged = {}
    for device, dtype in [("cpu", "float32"), (dev, "float32"), (dev, "bfloat16")]:
        merger = InMemoryMerger(paths, device=device, dtype=dtype)
        merger.merge(recipe)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            model = merger.merge(recipe)
        if device == "cuda":
            torch.cuda.synchronize()
        per = (time.perf_counter() - t0) / 10
        merged[device, dtype] = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        acc = evaluate_items(model, load_tokenizer(paths[0]), items["math_l2"], "mc_loglik",
                             settings(device, dtype))["correct"].mean()
        diff = max(float((merged["cpu", "float32"][k] - merged[device, dtype][k]).abs().max()) for k in merged[device, dtype])
        print(f"in-memory merge on {device}, {dtype}: {per * 1000:.1f} ms per candidate; merged model math_l2 test "
              f"{acc:.3f}; tensors against the CPU's float32 merge: max abs diff {diff:.2e}", flush=True)

if __name__ == "__main__":
    main()
