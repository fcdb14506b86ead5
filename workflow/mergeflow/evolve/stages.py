"""The evolution loop's stages — ``ask(g)``, ``evaluate(g, shard)``, ``tell(g)`` — as functions of files.

Files per run (under ``results/runs/{run}/evolve/``):

- ``gen_{g}/candidates.parquet``: generation, index, genome, seed, recipe_hash, recipe (YAML)
- ``gen_{g}/asked.pkl``: the optimizer with its pending candidates (a cache)
- ``gen_{g}/fitness_{k}.parquet``: shard k's per-candidate, per-task fitness, sd, items, wall time
- ``gen_{g}/optimizer.pkl``: the optimizer after tell (a cache)
- ``gen_{g}/history.parquet``: every candidate told so far — the source of truth; it holds no
  wall times, so the same config and seed give the same bytes
- ``gen_{g}/best/recipe.yaml``: the best recipe so far (mergekit-compatible), plus weights when
  ``save_weights`` is set
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.config import model_location
from mergeflow.errors import MergeflowError
from mergeflow.evolve.search import (
    WORST_LOSS,
    SearchSettings,
    ask_generation,
    load_state,
    make_optimizer,
    replay,
    save_state,
    tell_generation,
)

log = logging.getLogger(__name__)


@dataclass
class EvolveConfig:
    """A run's search, resolved from the workflow config (model names become paths)."""

    run: str
    objectives: dict[str, float]
    multi_objective: bool
    fitness: str
    estimator: str
    anchors: dict
    optimizer: str
    population: int
    budget: int | None
    shards: int
    seed: int
    search_space: dict
    save_weights: bool
    init: dict[str, float] | None
    base_path: str
    endpoint_paths: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, run: str) -> "EvolveConfig":
        rcfg = config["runs"][run]
        ecfg = rcfg["evolve"]
        models = config["models"]
        space = dict(ecfg["search_space"])
        names = space.pop("models", None) or list(config["endpoints"])
        base = space.pop("base_model", None) or config["base_model"]
        for name in [base, *names]:
            if name not in models:
                raise MergeflowError(f"config: runs.{run}.evolve.search_space names model {name!r}, "
                                     f"which is not one of models {sorted(models)}")
        paths = {name: model_location(models[name]) for name in names}
        space.update({"base_model": model_location(models[base]), "models": list(paths.values())})
        return cls(run=run, objectives=dict(ecfg["objectives"]), multi_objective=ecfg.get("multi_objective", False),
                   fitness=ecfg.get("fitness", "full"), estimator=ecfg.get("estimator", "gmpirt"),
                   anchors=dict(ecfg.get("anchors", {})), optimizer=ecfg.get("optimizer", "CMA"),
                   population=ecfg["population"], budget=ecfg.get("budget"), shards=ecfg.get("shards", 1),
                   seed=rcfg.get("seed", 0), search_space=space, save_weights=ecfg.get("save_weights", False),
                   init=_init_weights(ecfg.get("init"), models, run),
                   base_path=model_location(models[base]), endpoint_paths=paths)

    @property
    def tasks(self) -> list[str]:
        return list(self.objectives)

    def space(self):
        from mergeflow.merge import SearchSpace

        return SearchSpace.from_config(self.search_space, num_layers(self.base_path))

    def search_settings(self) -> SearchSettings:
        space = self.space()
        return SearchSettings(self.optimizer, space.dim, self.population, self.seed,
                              len(self.objectives) if self.multi_objective else 1, self.budget,
                              self.initial_genome(space))

    def initial_genome(self, space) -> tuple[float, ...] | None:
        """The genome of ``init`` (each source's weight; other genes at the middle of their range)."""
        if self.init is None:
            return None
        from mergeflow.merge import recipe_from_dict

        recipe = recipe_from_dict({
            "merge_method": space.methods[0], "base_model": self.base_path,
            "models": [{"model": path, "parameters": {"weight": self.init.get(path, 0.0)}} for path in space.models],
        })
        return tuple(float(v) for v in space.from_recipe(recipe))

    def candidate_seed(self, generation: int, index: int) -> int:
        """The recipe seed of candidate (g, i): drawn from (run seed, g, i), for DARE / DELLA."""
        return int(np.random.SeedSequence([self.seed, generation, index]).generate_state(1)[0])


def _init_weights(init: dict | None, models: dict, run: str) -> dict[str, float] | None:
    """``init`` maps model names to weights; the search space speaks in paths."""
    if init is None:
        return None
    for name in init:
        if name not in models:
            raise MergeflowError(f"config: runs.{run}.evolve.init names model {name!r}, which is not one of "
                                 f"models {sorted(models)}")
    return {model_location(models[name]): float(w) for name, w in init.items()}


def num_layers(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config["num_hidden_layers"])


# --- ask ------------------------------------------------------------------------------------

def ask(cfg: EvolveConfig, generation: int, previous_state: str | None, previous_history: str | None,
        out_candidates: str, out_state: str) -> pd.DataFrame:
    """Propose generation ``g``'s population from the optimizer left by ``tell(g - 1)``."""
    settings = cfg.search_settings()
    if generation == 0:
        optimizer = make_optimizer(settings)
    else:
        optimizer = restore_optimizer(cfg, settings, previous_state, previous_history)
    candidates = ask_generation(optimizer, cfg.population)
    space = cfg.space()
    rows = []
    from mergeflow.merge import recipe_hash

    for index, candidate in enumerate(candidates):
        seed = cfg.candidate_seed(generation, index)
        recipe = space.to_recipe(candidate.value, seed=seed)
        rows.append({"generation": generation, "index": index, "genome": [float(v) for v in candidate.value],
                     "seed": seed, "recipe_hash": recipe_hash(recipe), "recipe": recipe.to_yaml()})
    frame = pd.DataFrame(rows)
    Path(out_candidates).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out_candidates, index=False)
    save_state(out_state, optimizer, candidates)
    log.info("generation %d: asked %d candidates of dimension %d from %s", generation, len(rows), settings.dim,
             cfg.optimizer)
    return frame


def restore_optimizer(cfg: EvolveConfig, settings: SearchSettings, state_path: str | None, history_path: str | None):
    """The pickled optimizer, or — if the pickle is missing or unreadable — a replay of the history."""
    try:
        optimizer, _ = load_state(state_path)
        return optimizer
    except Exception as err:  # a cache: fall back to the source of truth
        log.warning("optimizer state %s unusable (%s); rebuilding it from %s", state_path, err, history_path)
    history = pd.read_parquet(history_path)
    return replay(settings, history, cfg.tasks if cfg.multi_objective else None)


# --- evaluate -------------------------------------------------------------------------------

def evaluate_shard(cfg: EvolveConfig, tasks_cfg: dict, evaluation: dict, endpoints: list[str], generation: int,
                   shard: int, candidates_path: str, search_splits: dict[str, str], anchors: dict[str, str],
                   irt_dirs: dict[str, str], out: str) -> pd.DataFrame:
    """Score this shard's candidates; sources stay resident (across jobs, in one process) and
    merges happen in memory."""
    from mergeflow.evaluate import EvalSettings
    from mergeflow.evolve.fitness import evaluate_candidate
    from mergeflow.evolve.resident import resident_merger
    from mergeflow.merge import recipe_from_yaml

    settings = EvalSettings.from_config(evaluation)
    candidates = pd.read_parquet(candidates_path)
    mine = candidates[candidates["index"] % cfg.shards == shard]
    tasks = [task_fitness(cfg, tasks_cfg[task], endpoints, task, search_splits[task], anchors.get(task),
                          irt_dirs.get(task)) for task in cfg.tasks]
    rows = []
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], settings.device,
                         settings.dtype) as (merger, tokenizer):
        for _, cand in mine.iterrows():
            recipe = recipe_from_yaml(cand["recipe"])
            result = evaluate_candidate(merger, tokenizer, recipe, tasks, settings)
            for task in cfg.tasks:
                rows.append({"generation": generation, "index": int(cand["index"]), "task": task,
                             "fitness": result.fitness[task], "sd": result.sd[task], "items": result.items,
                             "problem": result.problem or "", "wall_s": result.wall_s})
            log.info("generation %d candidate %d: %s (%.2fs)%s", generation, cand["index"],
                     {t: round(result.fitness[t], 4) for t in cfg.tasks}, result.wall_s,
                     f" PROBLEM: {result.problem}" if result.problem else "")
    frame = pd.DataFrame(rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return frame


def task_fitness(cfg: EvolveConfig, tcfg: dict, endpoints: list[str], task: str, split_path: str,
                 anchors_path: str | None, irt_dir: str | None):
    from mergeflow.data import read_split
    from mergeflow.evolve.fitness import TaskFitness

    items = read_split(split_path)
    delimiter = tcfg.get("target_delimiter", " ")
    if cfg.fitness == "full":
        return TaskFitness(task, items, tcfg["scorer"], delimiter)
    from mergeflow.irt.anchors import read_anchors
    from mergeflow.irt.estimators import Estimator
    from mergeflow.irt.model import load_irt

    anchors = read_anchors(anchors_path)
    fit = load_irt(irt_dir) if cfg.estimator != "mean" else None
    thetas = endpoints if cfg.estimator in ("mpirt", "gmpirt") else None
    estimator = Estimator(cfg.estimator, anchors, fit, endpoint_thetas=thetas, seed=cfg.seed)
    ids = set(anchors["item_id"].astype(str))
    subset = items[items["item_id"].astype(str).isin(ids)].reset_index(drop=True)
    if len(subset) != len(ids):
        raise MergeflowError(f"task {task!r}: {len(ids) - len(subset)} anchor items of {anchors_path!r} are not in "
                             f"the search split {split_path!r}")
    return TaskFitness(task, subset, tcfg["scorer"], delimiter, estimator)


# --- tell -----------------------------------------------------------------------------------

def candidate_table(cfg: EvolveConfig, candidates: pd.DataFrame, fitness: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate: genome, recipe, per-task fitness and sd, items, losses — no wall times."""
    wide = candidates[["generation", "index", "genome", "seed", "recipe_hash", "recipe"]].copy()
    per = fitness.pivot(index="index", columns="task", values="fitness")
    sd = fitness.pivot(index="index", columns="task", values="sd")
    meta = fitness.groupby("index").agg(items=("items", "first"), problem=("problem", "first"))
    if sorted(per.index) != sorted(wide["index"]):
        raise MergeflowError(f"generation {int(wide['generation'].iloc[0])}: fitness shards cover candidates "
                             f"{sorted(per.index)}, expected {sorted(wide['index'])}")
    wide = wide.set_index("index")
    for task in cfg.tasks:
        wide[f"fitness_{task}"] = per[task]
        wide[f"sd_{task}"] = sd[task]
    wide["items"] = meta["items"].astype("int64")
    wide["problem"] = meta["problem"]
    valid = (wide["problem"] == "") & np.isfinite(wide[[f"fitness_{t}" for t in cfg.tasks]]).all(axis=1)
    total = sum(cfg.objectives.values())
    scalar = sum(w * wide[f"fitness_{t}"] for t, w in cfg.objectives.items()) / total
    wide["fitness"] = np.where(valid, scalar, np.nan)
    wide["loss"] = np.where(valid, -scalar, WORST_LOSS)
    for task in cfg.tasks:
        wide[f"loss_{task}"] = np.where(valid, -wide[f"fitness_{task}"], WORST_LOSS)
    return wide.reset_index()[["generation", "index", *[c for c in wide.columns if c not in ("generation",)]]]


def tell(cfg: EvolveConfig, generation: int, asked_state: str, candidates_path: str, fitness_paths: list[str],
         previous_history: str | None, out_state: str, out_history: str, out_best: str) -> pd.DataFrame:
    """Tell the optimizer this generation's losses; write its state, the history and the best recipe."""
    optimizer, pending = load_state(asked_state)
    candidates = pd.read_parquet(candidates_path)
    fitness = pd.concat([pd.read_parquet(p) for p in fitness_paths], ignore_index=True)
    table = candidate_table(cfg, candidates, fitness).sort_values("index")
    if cfg.multi_objective:
        losses = [[float(v) for v in row] for row in table[[f"loss_{t}" for t in cfg.tasks]].to_numpy()]
    else:
        losses = [float(v) for v in table["loss"]]
    tell_generation(optimizer, pending, losses)
    save_state(out_state, optimizer)
    history = table if previous_history is None else pd.concat([pd.read_parquet(previous_history), table],
                                                               ignore_index=True)
    Path(out_history).parent.mkdir(parents=True, exist_ok=True)
    history.to_parquet(out_history, index=False)
    best = best_row(history)
    Path(out_best).parent.mkdir(parents=True, exist_ok=True)
    Path(out_best).write_text(best["recipe"])
    log.info("generation %d told; best so far: generation %d candidate %d fitness %.4f", generation,
             best["generation"], best["index"], best["fitness"])
    return history


def best_row(history: pd.DataFrame) -> pd.Series:
    """The lowest-loss candidate; ties go to the earliest (generation, index)."""
    ordered = history.sort_values(["loss", "generation", "index"], kind="mergesort")
    return ordered.iloc[0]


def pareto_front(history: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Candidates no other valid candidate beats on every task (multi-objective runs)."""
    valid = history[history["problem"] == ""]
    values = valid[[f"fitness_{t}" for t in tasks]].to_numpy()
    keep = []
    for i, row in enumerate(values):
        dominated = np.any(np.all(values >= row, axis=1) & np.any(values > row, axis=1))
        keep.append(not dominated)
    return valid[np.array(keep, dtype=bool)].drop_duplicates("recipe_hash").reset_index(drop=True)
