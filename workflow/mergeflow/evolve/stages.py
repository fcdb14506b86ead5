"""The evolution loop's stages — ``ask(g)``, ``fitness(g, rung, shard)``, ``promote(g, rung)``,
``tell(g)`` — as functions of files.

Files per run (under ``results/runs/{run}/evolve/``):

- ``gen_{g}/candidates.parquet``: generation, index, genome, seed, recipe_hash, recipe (YAML)
- ``gen_{g}/asked.pkl``: the optimizer with its pending candidates (a cache)
- ``gen_{g}/rung_{r}/fitness_{k}.parquet``: shard k's per-candidate, per-task fitness, sd, items
  newly scored and wall time at rung r (a fitness kind of one rung has only ``rung_0``), and
  ``responses_{k}.parquet``: those candidates' answers, reused at higher rungs
- ``gen_{g}/rung_{r}/promoted.parquet``: the candidates of rung r that move on to rung r + 1
- ``gen_{g}/optimizer.pkl``: the optimizer after tell (a cache)
- ``gen_{g}/history.parquet``: every candidate told so far — the source of truth (its columns:
  :mod:`mergeflow.evolve.history`)
- ``gen_{g}/best/recipe.yaml``: the best recipe so far (mergekit-compatible), plus weights when
  ``save_weights`` is set
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.evaluate import EvalSettings
from mergeflow.errors import MergeflowError
from mergeflow.evolve import history as hist
from mergeflow.evolve.resident import resident_merger
from mergeflow.evolve.search import (
    SearchSettings,
    ask_generation,
    load_state,
    make_optimizer,
    replay,
    save_state,
    tell_generation,
)
from mergeflow.fitness import FITNESS, FitnessContext, FitnessKind, ScoredCandidate, evaluate_candidate
from mergeflow.locations import merge_tokenizer_source, model_location
from mergeflow.merge.candidates import candidate_from_yaml
from mergeflow.merge.recipe import recipe_hash
from mergeflow.progress import Progress
from mergeflow.spaces import Space, build_space, space_models

log = logging.getLogger(__name__)


@dataclass
class EvolveConfig:
    """A run's search, resolved from the validated workflow config (model names become paths).

    ``fitness`` is the run's fitness mapping (``kind`` and the kind's own keys); ``search_space``
    its search-space mapping with ``base_model`` and ``models`` as paths; ``endpoints`` and
    ``base`` the endpoints' and the base model's names (how estimators find them in an IRT fit).
    """

    run: str
    objectives: dict[str, float]
    multi_objective: bool
    fitness: dict
    optimizer: str
    sigma: float
    learning_rate: float
    population: int
    budget: int | None
    shards: int
    seed: int
    search_space: dict
    save_weights: bool
    init: dict[str, float] | None
    base_path: str
    endpoint_paths: dict[str, str] = field(default_factory=dict)
    endpoints: list[str] = field(default_factory=list)
    base: str = ""

    @classmethod
    def from_config(cls, config: dict, run: str) -> "EvolveConfig":
        rcfg = config["runs"][run]
        ecfg = rcfg["evolve"]
        models = config["models"]
        space = dict(ecfg["search_space"])
        base, names = space_models(space)  # names; replaced by paths below
        for key in ("models", "base_model"):
            space.pop(key, None)
        names = list(names or config["endpoints"])
        base = base or config["base_model"]
        for name in [base, *names]:
            if name not in models:
                raise MergeflowError(f"config: runs.{run}.evolve.search_space names model {name!r}, "
                                     f"which is not one of models {sorted(models)}")
        paths = {name: model_location(models[name]) for name in names}
        space.update({"base_model": model_location(models[base]), "models": list(paths.values())})
        if config.get("tokenizer_source"):
            space["tokenizer_source"] = merge_tokenizer_source(config)
        return cls(run=run, objectives=dict(ecfg["objectives"]), multi_objective=ecfg["multi_objective"],
                   fitness=dict(ecfg["fitness"]), optimizer=ecfg["optimizer"], sigma=ecfg["sigma"],
                   learning_rate=ecfg["learning_rate"], population=ecfg["population"],
                   budget=ecfg.get("budget"), shards=ecfg["shards"], seed=rcfg["seed"], search_space=space,
                   save_weights=ecfg["save_weights"], init=_init_weights(ecfg.get("init"), models, run),
                   base_path=model_location(models[base]), endpoint_paths=paths,
                   endpoints=list(config["endpoints"]), base=config["base_model"])

    @property
    def tasks(self) -> list[str]:
        return list(self.objectives)

    @property
    def kind(self) -> FitnessKind:
        """The run's fitness kind."""
        return FITNESS[self.fitness["kind"]]

    @property
    def result(self) -> str:
        """What the search ends on: its best candidate or its last (the fitness kind's ``result``)."""
        return self.kind.result

    @property
    def fitness_label(self) -> str | None:
        """What the search's fitness is where it is not an accuracy (the fitness kind's ``fitness_label``)."""
        return self.kind.fitness_label(self.fitness)

    def fitness_context(self, task: str, task_config: dict, files: dict[str, str], generation: int = 0,
                        rung: int = 0) -> FitnessContext:
        """What the fitness kind builds ``task``'s scorer from at a rung of a generation."""
        return FitnessContext(task, task_config, files, self.fitness, tuple(self.endpoints), self.base, self.seed,
                              generation, rung)

    def space(self) -> Space:
        return build_space(self.search_space, where=f"runs.{self.run}.evolve.search_space")

    def search_settings(self) -> SearchSettings:
        space = self.space()
        smooth = tuple(self.kind.gradient_genes(space)) if self.kind.gradient_genes else ()
        return SearchSettings(self.optimizer, space.dim, self.population, self.seed,
                              len(self.objectives) if self.multi_objective else 1, self.budget,
                              space.initial_genome(self.init), self.sigma, self.learning_rate, smooth)

    def candidate_seed(self, generation: int, index: int) -> int:
        """The recipe seed of candidate (g, i): drawn from (run seed, g, i), for DARE / DELLA."""
        return int(np.random.SeedSequence([self.seed, generation, index]).generate_state(1)[0])

    def objectives_told(self) -> list[str] | None:
        """The objectives told one by one (multi-objective runs), else None: one scalar loss."""
        return self.tasks if self.multi_objective else None


def _init_weights(init: dict | None, models: dict, run: str) -> dict[str, float] | None:
    """``init`` maps model names to weights; the search space speaks in paths."""
    if init is None:
        return None
    for name in init:
        if name not in models:
            raise MergeflowError(f"config: runs.{run}.evolve.init names model {name!r}, which is not one of "
                                 f"models {sorted(models)}")
    return {model_location(models[name]): float(w) for name, w in init.items()}


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
    return replay(settings, pd.read_parquet(history_path), cfg.objectives_told(), cfg.kind.extra_columns)


# --- fitness and promote ---------------------------------------------------------------------

@dataclass(frozen=True)
class FitnessJob:
    """One fitness job: shard ``shard`` of rung ``rung`` of generation ``generation``.

    ``promoted``: the previous rung's promotions (None at the generation's first rung);
    ``earlier``: the previous rungs' responses files, whose answers a promoted candidate reuses;
    ``out``: its fitness rows; ``out_responses``: its candidates' answers at this rung.
    """

    generation: int
    rung: int
    shard: int
    candidates: str
    promoted: str | None
    earlier: tuple[str, ...]
    out: str
    out_responses: str


def fitness(cfg: EvolveConfig, tasks: dict[str, dict], evaluation: dict, files: dict[str, dict[str, str]],
            job: FitnessJob) -> pd.DataFrame:
    """Score this shard's candidates at this rung on every objective with the run's fitness kind.

    ``tasks``: each objective's task config; ``files``: per objective, the files the fitness
    kind needs (need name -> path). Sources stay resident (across jobs, in one process) and
    merges happen in memory; a candidate promoted from a lower rung answers only the items it
    has not answered there.
    """
    settings = EvalSettings.from_config(evaluation)
    candidates = pd.read_parquet(job.candidates)
    if job.promoted is not None:
        candidates = candidates[candidates["index"].isin(pd.read_parquet(job.promoted)["index"])]
    mine = candidates[candidates["index"] % cfg.shards == job.shard]
    earlier = hist.read_shards(job.earlier) if job.earlier else None
    kind = cfg.kind
    scorers = [kind.task_fitness(cfg.fitness_context(task, tasks[task], files[task], job.generation, job.rung))
               for task in cfg.tasks]
    rows, answers = [], []
    space = cfg.space()
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], settings.device,
                         settings.dtype, space.candidates, space.merger_template()) as (merger, tokenizer):
        meter = Progress(f"generation {job.generation} rung {job.rung} shard {job.shard}", len(mine), "candidate")
        for _, cand in mine.iterrows():
            known = hist.known_answers(earlier, cand["recipe_hash"])
            candidate = candidate_from_yaml(cand["recipe"])
            result = evaluate_candidate(merger, tokenizer, candidate, scorers, settings, known,
                                        space.problem(candidate))
            extras = {}
            if kind.extras is not None:
                extras = kind.extras(cfg.fitness, ScoredCandidate(merger, tokenizer, space, np.asarray(cand["genome"]),
                                                                  int(cand["seed"]), scorers, settings, result))
            for task in cfg.tasks:
                rows.append({"generation": job.generation, "index": int(cand["index"]), "rung": job.rung, "task": task,
                             "fitness": result.fitness[task], "sd": result.sd[task], "items": result.items[task],
                             "problem": result.problem or "", "wall_s": result.wall_s, **extras.get(task, {})})
                answers += [{"recipe_hash": cand["recipe_hash"], "task": task, "item_id": item, "correct": int(value)}
                            for item, value in result.answers[task].items()]
            log.info("generation %d rung %d candidate %d: %s (%.2fs)%s", job.generation, job.rung, cand["index"],
                     {t: round(result.fitness[t], 4) for t in cfg.tasks}, result.wall_s,
                     f" PROBLEM: {result.problem}" if result.problem else "")
            meter.update()
    frame = pd.DataFrame(rows, columns=hist.SHARD_COLUMNS + list(kind.extra_columns))
    Path(job.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(job.out, index=False)
    pd.DataFrame(answers, columns=hist.ANSWER_COLUMNS).to_parquet(job.out_responses, index=False)
    return frame


def promote(cfg: EvolveConfig, generation: int, rung: int, fitness_paths: list[str], out: str) -> pd.DataFrame:
    """The candidates of rung ``rung`` that move on to the next rung: the best by the
    objectives' weighted fitness (``promote: ucb``: plus its sd), as many as the kind says."""
    shards = hist.read_shards(fitness_paths)
    kind = cfg.kind
    count = kind.promoted(cfg.fitness, cfg.population, rung - kind.first_rung(cfg.fitness, generation))
    kept = hist.promotions(cfg.objectives, shards, count, cfg.fitness.get("promote") == "ucb")
    kept.to_parquet(out, index=False)
    log.info("generation %d rung %d: promoted candidates %s", generation, rung, kept["index"].tolist())
    return kept


# --- tell -----------------------------------------------------------------------------------

def tell(cfg: EvolveConfig, generation: int, asked_state: str, candidates_path: str, fitness_paths: list[str],
         previous_history: str | None, out_state: str, out_history: str, out_best: str) -> pd.DataFrame:
    """Tell the optimizer this generation's losses; write its state, the history and the best recipe."""
    optimizer, pending = load_state(asked_state)
    candidates = pd.read_parquet(candidates_path)
    shards = hist.read_shards(fitness_paths)
    table = hist.candidate_table(cfg.objectives, candidates, shards, cfg.kind.rungs(cfg.fitness))
    tell_generation(optimizer, pending, hist.losses(table, cfg.objectives_told()),
                    hist.extras(table, cfg.kind.extra_columns))
    save_state(out_state, optimizer)
    history = hist.extend(previous_history, table.sort_values("index"), out_history)
    best = hist.best_row(history, cfg.result)
    Path(out_best).parent.mkdir(parents=True, exist_ok=True)
    Path(out_best).write_text(best["recipe"])
    log.info("generation %d told; best so far: generation %d candidate %d fitness %.4f", generation,
             best["generation"], best["index"], best["fitness"])
    return history
