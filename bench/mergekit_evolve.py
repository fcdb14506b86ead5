"""mergekit-evolve (the peer search) on a finished default's zoo, at mergeflow's budget, N runs.

On the zoo of a finished workdir (its base, math and lang models) the bench runs mergekit 0.1.5's
``mergekit-evolve`` ``--runs`` times over the genome mergeflow's ``full`` run searches: per-layer
task arithmetic of the config's two endpoints on its base (``layer_groups`` groups of layers, one
weight per expert and group: 8 genes on the default), fitness = lm-eval's ``acc`` on the target
task's search split (1,000 items). Its budget is mergeflow's: ``--budget-items`` (default 48,000)
/ search items = 48 evaluations, CMA-ES population 8 (``--force-population-size``) x 6
generations, as ``full``'s. pycma stops once ``countevals - 1 >= maxfevals``, so the bench passes
``--max-fevals 47`` to stop after the 6th generation (48 would run a 7th); then ``fmin2`` scores
the final mean once more (its ``eval_final_mean``, kept: it is how mergekit-evolve runs), so a run
evaluates 49 candidates, 49,000 items, 2% above mergeflow's; the table counts them from the log. Each run's best merge (mergekit's ``final_model``) is
then scored on the test split twice, each side in its own process through bench/evaluate.py:
by mergeflow's evaluator and by lm-eval 0.4.13 (its own virtualenv, ``--lm-eval-venv``), with the
items whose correctness differs between the two. It prints per run: both test accuracies, the
items they disagree on, items evaluated, the search's own best fitness and the wall time of the
mergekit-evolve process (Ray start, merges, scoring, the final merge), then mean ± sd.

mergekit-evolve cannot be seeded: ``--random-seed`` seeds the merge, and CMA-ES (pycma's ``fmin2``,
called without a ``seed`` option) draws its seed from the clock. Its runs differ, so the bench
reports their spread, never one run. ``--append`` adds runs to those already in ``--out`` (as
bench/search_quality.py ``--peer-runs`` does, to bring each zoo to the same number of runs);
``summary.json`` then lists them all. Run one at a time on a machine: a second mergekit-evolve's Ray
cluster timed out at start beside a first.

    PYTHONPATH=workflow python bench/mergekit_evolve.py --workdir DIR [--configfile FILE] [--runs 4]
        [--budget-items 48000] [--search-run full]
        [--out DIR/results/bench/mergekit_evolve] [--evolve-venv ~/.cache/mergeflow/bench/mergekit-0.1.5-evolve]
        [--lm-eval-venv bench/.peer-venv] [--append]

mergekit is never a mergeflow dependency: the virtualenv is made by bench/merge.py's
``peer_python`` (this torch's CPU wheel and mergekit 0.1.5) in a directory of its own, and the
``evolve`` extra (Ray, pycma, lm-eval, wandb) added, with lm-eval pinned to the evaluator bench's
0.4.13. The workdir is only read.

How the peer is set up, and every workaround it needs on a CPU-only machine. The patches live in a
``sitecustomize.py`` the bench writes into the run's output directory and puts on the PYTHONPATH
of the mergekit-evolve process only, active where ``MERGEFLOW_MKE_PATCHES=1``; Ray's workers
inherit both, so the driver and the evaluating actor are patched alike. mergekit's installed files
are never edited.

1. vLLM import: mergekit.evo.actors names ``lm_eval.models.vllm_causallms.VLLM`` in a class
   annotation and ``monkeypatch_lmeval_vllm`` imports that module, which imports vllm at its top
   (a GPU-only package, not installed). Where vllm is missing, a stub module with a placeholder
   ``VLLM`` class stands in for ``lm_eval.models.vllm_causallms``; the vLLM path is never taken.
2. Ray asks for GPUs: every mergekit actor and task is declared ``num_gpus=1``, which never
   schedules on a machine without GPUs. The bench starts Ray itself with one CPU and one logical
   GPU (``ray.init(num_cpus=1, num_gpus=1)``: a resource count, no device behind it) before
   mergekit's main, and passes ``--num-gpus 1`` (a pool of one evaluating actor).
3. ``--in-memory`` is not used: issue 17 found it broken (not rerun here; in the code, its
   evaluator makes a bfloat16 model from a config and hands lm-eval's ``HFLM`` no tokenizer, so
   HFLM loads one from the model's empty ``name_or_path``). The bench runs mergekit-evolve's
   default on-disk pool strategy: each candidate is merged to disk, loaded and scored by lm-eval,
   then deleted. On this zoo (0.6M parameters) a candidate takes about 8 s on the 2-core machine
   of bench/results/mergekit_evolve.txt, of which lm-eval's 4,000 log-likelihood requests are
   about 2 s (the rest, not broken down: the merge to disk, the load, lm-eval's task set-up).
4. CUDA-only cache call: the on-disk evaluator calls the accelerator module's ``empty_cache``
   before each merge, which for the device "cpu" is ``torch.cpu.empty_cache``, absent from torch;
   the patch adds it as a no-op.
5. CUDA device calls: ``--merge-cuda`` is mergekit-evolve's default; the bench passes
   ``--no-merge-cuda`` (merges on the CPU) and has the evaluator's ``HFLM`` load on ``device=cpu``
   (lm-eval's default device is "cuda").

Settings that are choices, not fixes:

- float32: mergekit-evolve merges to bfloat16 (``genotype_merge_config`` writes ``dtype:
  bfloat16``) and scores in bfloat16; the patch makes both float32, as mergeflow's searches and
  the zoo are, so the two tools differ in their search and not in rounding.
- ``--no-reshard``: resharding would rewrite the inputs as bfloat16; the zoo's models are single
  float32 shards already.
- The genome: mergekit's ``task_arithmetic`` with ``layer_granularity`` = layers / layer_groups,
  the config's two endpoints and its base; no weight bounds exist in mergekit (it takes |w|),
  where mergeflow's space is [0, 1.5]. mergekit starts every weight at 1/2 (1/models) with σ0 =
  1/6, its defaults; mergeflow's ``full`` starts at math 1.0, lang 0.5 with its own σ.
- The lm-eval task (``bench_<task>``, from bench/evaluate.py's ``peer_task_yaml``) is the rendered
  search split as it is: the prompt, the choices, the gold index and mergeflow's " " delimiter,
  multiple choice by log-likelihood; ``apply_chat_template`` and ``fewshot_as_multiturn`` off
  (mergekit-evolve's config turns both on by default; the zoo's tokenizer has no chat template).
- lm-eval batch size 128, mergeflow's ``evaluation.batch_size``; one thread everywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
EVOLVE_VENV = Path.home() / ".cache" / "mergeflow" / "bench" / "mergekit-0.1.5-evolve"
EVOLVE_EXTRA = ["mergekit[evolve]==0.1.5", "lm-eval[hf]==0.4.13"]


def bench_module(name: str):
    """A sibling bench script as a module (by path: ``evaluate`` would otherwise be HF's package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PATCHES = '''\
"""mergekit-evolve on a CPU-only machine: written by bench/mergekit_evolve.py (see its docstring)."""
import os

if os.environ.get("MERGEFLOW_MKE_PATCHES") == "1":
    import importlib.util
    import sys
    import types

    import torch

    # 1. vLLM: lm_eval.models.vllm_causallms imports vllm at its top; mergekit names its VLLM class.
    if importlib.util.find_spec("vllm") is None:
        import lm_eval.models

        stub = types.ModuleType("lm_eval.models.vllm_causallms")
        stub.VLLM = type("VLLM", (), {"AUTO_MODEL_CLASS": None})
        sys.modules["lm_eval.models.vllm_causallms"] = stub
        lm_eval.models.vllm_causallms = stub

    # 4. the on-disk evaluator calls torch.<device>.empty_cache(); torch.cpu has none.
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None

    import mergekit.evo.actors
    import mergekit.evo.genome

    # float32 merges (mergekit-evolve writes bfloat16), as mergeflow's searches and the zoo.
    _merge_config = mergekit.evo.genome.ModelGenome.genotype_merge_config

    def genotype_merge_config(self, genotype):
        return _merge_config(self, genotype).model_copy(update={"dtype": "float32"})

    mergekit.evo.genome.ModelGenome.genotype_merge_config = genotype_merge_config

    # 5. and float32 scoring on the CPU (HFLM's default device is "cuda"; mergekit scores in bfloat16).
    _evaluate_model = mergekit.evo.actors.evaluate_model

    def evaluate_model(*args, model_kwargs=None, **kwargs):
        return _evaluate_model(*args, model_kwargs={"dtype": "float32", "device": "cpu", **(model_kwargs or {})},
                               **kwargs)

    mergekit.evo.actors.evaluate_model = evaluate_model
'''

# 2. Ray: one CPU and one logical GPU, so mergekit's num_gpus=1 actors schedule; then its main.
DRIVER = '''\
import sys
import ray

ray.init(num_cpus=1, num_gpus=1, include_dashboard=False)
from mergekit.scripts.evolve import main

main(sys.argv[1:], standalone_mode=True)
'''


def evolve_python(venv: Path) -> Path:
    """The evolve virtualenv's interpreter: bench/merge.py's peer venv (this torch, mergekit 0.1.5)
    plus the evolve extra, made where it is missing."""
    python = bench_module("merge").peer_python(venv)
    found = subprocess.run([str(python), "-c", "import ray, cma, lm_eval.models.huggingface"],
                           capture_output=True).returncode == 0
    if not found:
        print(f"adding {' '.join(EVOLVE_EXTRA)} to {venv} ...", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *EVOLVE_EXTRA], check=True)
    return python


def genome_config(workdir: Path, config: dict, run: str, task: str) -> dict:
    """mergekit-evolve's configuration for the config's search ``run``: its per-layer task
    arithmetic over the config's endpoints on its base (model paths relative to ``workdir``),
    fitness lm-eval's acc on the task ``bench_<task>`` (the search split)."""
    space = config["runs"][run]["evolve"]["search_space"]
    assert space["method"] == "task_arithmetic", f"run {run!r} searches {space['method']}, not task_arithmetic"
    model_path = {name: str((workdir / spec["path"]).resolve()) for name, spec in config["models"].items()
                  if "path" in spec}
    layers = json.loads(Path(model_path[config["base_model"]], "config.json").read_text())["num_hidden_layers"]
    assert layers % space["layer_groups"] == 0, "mergekit's layer groups are equal slices"
    return {
        "genome": {"models": [model_path[m] for m in config["endpoints"]], "merge_method": "task_arithmetic",
                   "base_model": model_path[config["base_model"]],
                   "layer_granularity": layers // space["layer_groups"], "normalize": False},
        "tasks": [{"name": f"bench_{task}", "metric": "acc,none"}],
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
    }


def run_evolve(python: Path, out: Path, config: dict, task_yaml: str, task: str, max_fevals: int,
               population: int, batch_size: int) -> dict:
    """One mergekit-evolve run in ``out``: its log, evaluations (counted from the log), best fitness
    and wall time."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "patches").mkdir(exist_ok=True)
    (out / "patches" / "sitecustomize.py").write_text(PATCHES)
    (out / "tasks").mkdir(exist_ok=True)
    (out / "tasks" / f"{task}.yaml").write_text(task_yaml)
    (out / "genome.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **bench_module("evaluate").SINGLE_THREAD, "MERGEFLOW_MKE_PATCHES": "1",
           "PYTHONPATH": str(out / "patches"), "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled"}
    cmd = [str(python), "-c", DRIVER, str(out / "genome.yaml"), "--storage-path", str(out / "storage"),
           "--task-search-path", str(out / "tasks"), "--max-fevals", str(max_fevals),
           "--force-population-size", str(population), "--num-gpus", "1", "--no-merge-cuda", "--no-reshard",
           "--batch-size", str(batch_size), "--strategy", "pool", "--no-in-memory"]
    t0 = time.perf_counter()
    with open(out / "evolve.log", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)
    wall = time.perf_counter() - t0
    text = (out / "evolve.log").read_text()
    if done.returncode or not (out / "storage" / "final_model" / "config.json").exists():
        raise RuntimeError(f"mergekit-evolve failed (rc {done.returncode}); the end of {out / 'evolve.log'}:\n"
                           + text[-4000:])
    evaluated = sum(int(n) for n in re.findall(r"Received (\d+) genotypes", text))
    best = re.findall(r"Best cost: (-?[\d.]+)", text)
    return {"evaluations": evaluated, "search_best": -float(best[-1]) if best else float("nan"), "wall_s": wall,
            "model": out / "storage" / "final_model"}


def score_test(evaluate, peer: Path, model: Path, task: str, test_split: Path, batch_size: int) -> dict:
    """The merge's test accuracy by mergeflow's evaluator and by lm-eval (bench/evaluate.py's two
    sides, each its own process), and the items whose correctness differs."""
    splits = {task: str(test_split)}
    ours = evaluate.run_side(Path(sys.executable), "mergeflow", model, splits, batch_size, 6, agreement=True)
    theirs = evaluate.run_side(peer, "lm-eval", model, splits, batch_size, 6, agreement=True)
    a, b = ours["tasks"][task]["items"], theirs["tasks"][task]["items"]
    agree = evaluate.agreement(task, a, b, str(test_split))
    return {"mergeflow": sum(r["correct"] for r in a.values()) / len(a),
            "lm-eval": sum(r["correct"] for r in b.values()) / len(b), "items": len(a),
            "differ": agree["correct differ"], "max_dloglik": agree["max |d loglik|"]}


def mean_sd(values: list[float], digits: int = 3) -> str:
    mean = f"{statistics.mean(values):.{digits}f}"
    return f"{mean} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO, help="a finished default run (only read)")
    parser.add_argument("--configfile", type=Path, default=None,
                        help="the workdir's config (default: WORKDIR/config/config.yaml)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--budget-items", type=int, default=48_000,
                        help="items the search may score: evaluations = this / search items")
    parser.add_argument("--search-run", default="full", help="the config's search whose genome is used")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the runs go (default: WORKDIR/results/bench/mergekit_evolve)")
    parser.add_argument("--evolve-venv", type=Path, default=EVOLVE_VENV)
    parser.add_argument("--lm-eval-venv", type=Path, default=REPO / "bench" / ".peer-venv")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--append", action="store_true",
                        help="add --runs more runs to those already in --out (numbered after them; summary.json "
                             "then holds them all)")
    args = parser.parse_args()

    evaluate = bench_module("evaluate")
    workdir = args.workdir.resolve()
    out = (args.out or workdir / "results" / "bench" / "mergekit_evolve").resolve()
    config = yaml.safe_load((args.configfile or workdir / "config" / "config.yaml").read_text())
    evolve_cfg = config["runs"][args.search_run]["evolve"]
    task = next(iter(evolve_cfg["objectives"]))
    search_split = (workdir / "results" / "data" / task / "search.parquet").resolve()
    test_split = (workdir / "results" / "data" / task / "test.parquet").resolve()
    import pandas as pd

    search_items = len(pd.read_parquet(search_split, columns=["item_id"]))
    # generations x population candidates within the budget (48 = 6 x 8 on the default), as ``full``
    population = min(int(evolve_cfg["population"]), max(2, round(args.budget_items / search_items)))
    generations = max(1, round(args.budget_items / search_items / population))
    evaluations = generations * population

    python = evolve_python(args.evolve_venv)
    peer = evaluate.peer_python(args.lm_eval_venv)
    genome = genome_config(workdir, config, args.search_run, task)
    task_yaml = evaluate.peer_task_yaml(task, str(search_split), 6)
    load = os.getloadavg()
    earlier = json.loads((out / "summary.json").read_text()) if args.append and (out / "summary.json").exists() \
        else {"test": [], "items": [], "wall_s": []}
    first = len(earlier["test"])
    rows = []
    for r in range(first, first + args.runs):
        run = run_evolve(python, out / f"run_{r}", genome, task_yaml, task, evaluations - 1, population,
                         args.batch_size)
        scores = score_test(evaluate, peer, run["model"], task, test_split, args.batch_size)
        rows.append({**run, **scores, "items_evaluated": run["evaluations"] * search_items})
        print(f"run {r}: mergeflow {scores['mergeflow']:.3f}, lm-eval {scores['lm-eval']:.3f} "
              f"({scores['differ']} items differ), {run['evaluations']} evaluations, {run['wall_s']:.0f} s",
              flush=True)
    load_after = os.getloadavg()

    print(f"\nmergekit-evolve 0.1.5 (CMA-ES, population {population} x {generations} generations, --max-fevals "
          f"{evaluations - 1}, then its evaluation of the final mean) on the zoo of "
          f"{workdir}: {len(genome['genome']['models'])} experts x "
          f"{config['runs'][args.search_run]['evolve']['search_space']['layer_groups']} layer groups, task "
          f"arithmetic; fitness lm-eval acc on {search_items} {task} search items; best merge scored on "
          f"{rows[0]['items']} test items. Not seeded: mergekit-evolve cannot be (CMA-ES draws its seed from the "
          f"clock), so its spread over {args.runs} runs is the figure.")
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| run | test (mergeflow) | test (lm-eval) | items differing | search best (lm-eval acc) "
          "| items evaluated | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r, row in enumerate(rows, start=first):
        print(f"| {r} | {row['mergeflow']:.3f} | {row['lm-eval']:.3f} | {row['differ']}/{row['items']} | "
              f"{row['search_best']:.3f} | {row['items_evaluated']:,} | {row['wall_s']:.0f} |")
    print(f"| mean ± sd | {mean_sd([r['mergeflow'] for r in rows])} | {mean_sd([r['lm-eval'] for r in rows])} | "
          f"{sum(r['differ'] for r in rows)}/{sum(r['items'] for r in rows)} | "
          f"{mean_sd([r['search_best'] for r in rows])} | {statistics.mean(r['items_evaluated'] for r in rows):,.0f} "
          f"| {mean_sd([r['wall_s'] for r in rows], 0)} |")
    print(f"\nlargest |difference| of a choice's log-likelihood between the two evaluators: "
          f"{max(r['max_dloglik'] for r in rows):.2e}")
    # what bench/search_quality.py --peer reads: this zoo's peer row beside mergeflow's searches
    summary = {"test": earlier["test"] + [r["mergeflow"] for r in rows],
               "items": earlier["items"] + [r["items_evaluated"] for r in rows],
               "wall_s": earlier["wall_s"] + [r["wall_s"] for r in rows]}
    summary = {"name": f"mergekit-evolve 0.1.5 ({len(summary['test'])} unseeded runs)", **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary for bench/search_quality.py --peer: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
