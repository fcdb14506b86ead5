"""The DFS hybrid's gradient in a data-flow space's scale genes W, the path (indicator genes)
held (:func:`mergeflow.fitness.gradient.path_gradient`), against central differences of the loss
along each W gene the path uses, on a seeded random path of a finished default's zoo.

    python bench/dfs_scale_gradient.py --workdir DIR   # DIR: a finished default's results/ (its zoo and data)

Output and findings: bench/results/gradient_masks.txt (last section).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO)
    parser.add_argument("--seed", type=int, default=0, help="draws the path and W")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from mergeflow.config import validate_config
    from mergeflow.data import read_split
    from mergeflow.evaluate import EvalSettings, context_length
    from mergeflow.fitness.base import TaskFitness
    from mergeflow.fitness.gradient import path_gradient, task_loss
    from mergeflow.merge.assemble import PathAssembler
    from mergeflow.spaces.dfs import DfsSpace

    torch.set_num_threads(1)
    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    os.chdir(args.workdir)
    a, b = "results/zoo/math", "results/zoo/lang"
    space = DfsSpace.build({"kind": "dfs", "a": "math", "b": "lang", "repeats": 2, "scale": {"min": 0.5, "max": 1.5},
                            "base_model": a, "models": [a, b]})
    rng = np.random.default_rng(args.seed)
    x = np.concatenate([np.where(rng.random(space.slots) < 0.35, 0.6, 0.4), rng.uniform(0.3, 0.7, space.layers ** 2)])
    assembler, tokenizer = PathAssembler([a, b]), AutoTokenizer.from_pretrained(a)
    settings, tcfg = EvalSettings.from_config(config["evaluation"]), config["tasks"]["math_l2"]
    items = read_split(Path("results/data/math_l2/search.parquet")).iloc[:60].reset_index(drop=True)
    fit = TaskFitness("math_l2", items, tcfg["scorer"], tcfg["target_delimiter"])
    fitness_cfg = {"loss": "sigmoid", "temperature": 0.5}
    sequence, _ = space.decode(x)
    max_length = context_length(assembler.merge(space.to_recipe(x)), settings)
    start = time.perf_counter()
    gradients, losses = path_gradient(assembler, tokenizer, space, x, [fit], settings, fitness_cfg)
    wall, gradient, loss = time.perf_counter() - start, gradients["math_l2"], losses["math_l2"]

    def loss_at(genome: np.ndarray) -> float:
        with torch.no_grad():
            return task_loss(assembler.merge(space.to_recipe(genome)), tokenizer, fit, settings, max_length,
                             fitness_cfg, backward=False)

    print(f"path {[space.label(m) for m in sequence]}; loss {loss:.5f} on {len(items)} items, forward and "
          f"backward {wall:.2f} s; {np.count_nonzero(gradient)} of {space.layers ** 2} W genes on the path")
    h = 1e-3
    for gene in np.flatnonzero(gradient):
        step = np.eye(space.dim)[gene] * h
        numeric = (loss_at(x + step) - loss_at(x - step)) / (2 * h)
        i, j = divmod(gene - space.slots, space.layers)
        print(f"W[{space.label(i)} -> {space.label(j)}]: autograd {gradient[gene]:+.5f}, "
              f"central difference {numeric:+.5f}")


if __name__ == "__main__":
    main()
