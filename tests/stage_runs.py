"""The in-process stage fixtures the stage and fitness-kind tests share: a validated config over
the tiny zoo with every file a fitness kind may need (``build_stages``, behind the ``stages``
fixture), and the ask / fitness / tell loop as the rules chain it (``run_generations``)."""

from __future__ import annotations

import copy
from pathlib import Path

from mergeflow.calibrate import calibrate
from mergeflow.config import validate_config
from mergeflow.data import split_task, write_splits
from mergeflow.evaluate import respond
from mergeflow.evolve.stages import EvolveConfig, FitnessJob, ask, fitness, tell
from mergeflow.irt.anchors import select_anchors
from mergeflow.irt.fit import load_irt
from mergeflow.irt.model import fit_irt
from mergeflow.irt.responses import load_response_matrix
from mergeflow.logs import job_log

EVALUATION = {"batch_size": 64, "max_length": 64, "max_new_tokens": 4}


def build_stages(tiny_zoo: Path, root: Path) -> tuple[dict, Path, dict[str, str], dict[str, str]]:
    """A validated config over the tiny zoo (runs ``full``, ``anchored`` and ``multi``), its
    math_l2 splits, endpoint responses, a small calibration population, an IRT fit and an anchor
    set, as the IRT stages write them: (config, root, need -> file, model -> path)."""
    space = {"method": "task_arithmetic", "layer_groups": 2, "parameters": {"weight": {"min": 0.0, "max": 1.5}}}
    evolve = {"objectives": {"math_l2": 1.0}, "population": 3, "generations": 2, "search_space": space}
    config = validate_config({
        "models": {name: {"path": str(tiny_zoo / name)} for name in ("base", "math", "lang")},
        "base_model": "base", "endpoints": ["math", "lang"],
        "tasks": {"math_l2": {"source": {"path": str(tiny_zoo / "tasks" / "math_l2.parquet")}, "template": "{question}",
                              "choices": "choices", "answer": "answer", "id_column": "item_id", "scorer": "mc_loglik",
                              "splits": {"search": 40, "test": 20}}},
        "evaluation": EVALUATION,
        "irt": {"steps": 150, "calibration": {"random_merges": 4, "search_space": space}},
        "runs": {"full": {"evolve": {**evolve, "fitness": {"kind": "full"}}},
                 "anchored": {"evolve": {**evolve, "fitness": {"kind": "anchors", "anchors": {"n": 8}}}},
                 "multi": {"evolve": {**evolve, "population": 4, "fitness": {
                     "kind": "multi_fidelity", "rungs": [8, 20, 40], "eta": 2, "anchors": {"seed": 0}}}}},
    })
    tcfg = config["tasks"]["math_l2"]
    splits = {s: root / "data" / f"{s}.parquet" for s in ("search", "test")}
    write_splits(split_task("math_l2", tcfg, seed=0), splits)
    endpoint_files = []
    for model in ("base", "math", "lang"):
        out = root / "responses" / f"{model}.parquet"
        respond(config["models"][model], splits["search"], "mc_loglik", " ", config["evaluation"], out)
        endpoint_files.append(out)
    paths = {m: str(tiny_zoo / m) for m in ("base", "math", "lang")}
    calibration = root / "calibration.parquet"
    calibrate("math_l2", tcfg, str(splits["search"]), paths["base"], [paths["math"], paths["lang"]], [],
              config["irt"]["calibration"], 0, config["evaluation"], str(calibration))
    matrix = load_response_matrix([*endpoint_files, calibration])
    fit_irt(matrix, steps=config["irt"]["steps"], seed=0).save(root / "irt")
    anchors = select_anchors(matrix, load_irt(root / "irt"), strategy="irt", n=8, seed=0)
    anchors.to_parquet(root / "anchors.parquet", index=False)
    files = {"split": str(splits["search"]), "anchors": str(root / "anchors.parquet"),
             "irt": str(root / "irt" / "items.parquet"), "calibration": str(calibration)}
    return config, root, files, paths


def run_generations(cfg: EvolveConfig, config: dict, task_files: dict, root: Path, generations: int) -> str:
    """ask / fitness / tell for ``generations`` generations of a one-rung search under ``root``,
    as the rules chain them; the last history's path."""
    previous = None
    for g in range(generations):
        gen = root / f"gen_{g}"
        ask(cfg, g, previous and str(root / f"gen_{g - 1}" / "optimizer.pkl"), previous,
            str(gen / "candidates.parquet"), str(gen / "asked.pkl"))
        job = FitnessJob(g, 0, 0, str(gen / "candidates.parquet"), None, (), str(gen / "fitness_0.parquet"),
                         str(gen / "responses_0.parquet"))
        with job_log(gen / "fitness_0.log"):
            fitness(cfg, config["tasks"], config["evaluation"], task_files, job)
        tell(cfg, g, str(gen / "asked.pkl"), str(gen / "candidates.parquet"), [job.out], previous,
             str(gen / "optimizer.pkl"), str(gen / "history.parquet"), str(gen / "best" / "recipe.yaml"))
        previous = str(gen / "history.parquet")
    return previous


def with_run(config: dict, name: str, **evolve) -> dict:
    """``config`` (validated) with one more run, ``name``: run ``full``'s search with ``evolve``'s keys replaced."""
    config = copy.deepcopy(config)
    search = copy.deepcopy(config["runs"]["full"]["evolve"])
    search.update(evolve)
    config["runs"][name] = {"evolve": search}
    return validate_config(config)
