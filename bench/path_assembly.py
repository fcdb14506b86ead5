"""What a data-flow candidate costs to assemble, against scoring it on the anchors.

Builds random DFS paths over the zoo's math and language experts (``PathAssembler``: a module
list over resident layers, no weight copy) and times, per candidate, the assembly alone and
the scoring of the assembled model on the anchor items (mc_loglik, no cache). Target: assembly
under 5% of scoring.

    PYTHONPATH=workflow python bench/path_assembly.py [--results /work/main/results] [--candidates 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="a results/ directory with the zoo and anchors")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--anchors", default="anchors/math_l2/irt-10-seed0.parquet")
    args = parser.parse_args()

    from mergeflow.data import read_split
    from mergeflow.evaluate import EvalSettings, evaluate_items, load_tokenizer
    from mergeflow.merge.assemble import PathAssembler
    from mergeflow.spaces.dfs import DfsSpace
    from mergeflow.spaces.parameter import Range

    torch.set_num_threads(1)
    root = Path(args.results)
    a, b = str(root / "zoo" / "math"), str(root / "zoo" / "lang")
    split = read_split(root / "data" / "math_l2" / "search.parquet")
    anchors = split[split["item_id"].isin(pd.read_parquet(root / args.anchors)["item_id"])]
    settings = EvalSettings.from_config({"batch_size": 128, "device": "cpu", "dtype": "float32"})
    assembler, tokenizer = PathAssembler([a, b]), load_tokenizer(a)
    space = DfsSpace(a, b, 4, 4, 3, None, Range(0.5, 1.5))
    rng = np.random.default_rng(0)
    assemble, score, depths = [], [], []
    for _ in range(args.candidates):
        path = space.to_recipe(np.clip(np.asarray(space.initial_genome(None)) + rng.normal(0, 0.15, space.dim), 0, 1))
        t0 = time.perf_counter()
        model = assembler.merge(path)
        t1 = time.perf_counter()
        evaluate_items(model, tokenizer, anchors, "mc_loglik", settings)
        t2 = time.perf_counter()
        assemble.append(t1 - t0)
        score.append(t2 - t1)
        depths.append(len(path))
    ratio = np.sum(assemble) / np.sum(score)
    print(f"{args.candidates} DFS candidates (paths of {min(depths)}-{max(depths)} layers) on {len(anchors)} anchors:")
    print(f"assembly {1e3 * np.mean(assemble):.3f} ms, scoring {1e3 * np.mean(score):.1f} ms per candidate; "
          f"assembly / scoring = {100 * ratio:.2f}% (target < 5%)")


if __name__ == "__main__":
    main()
