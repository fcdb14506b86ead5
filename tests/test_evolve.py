"""The search engine: Nevergrad state across processes, replay from history, worst fitness for NaN."""

import numpy as np
import pandas as pd
import pytest

from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings
from mergeflow.evolve.history import WORST_LOSS, candidate_table
from mergeflow.evolve.search import (
    SearchSettings,
    ask_generation,
    load_state,
    make_optimizer,
    replay,
    save_state,
    tell_generation,
)
from mergeflow.evolve.stages import EvolveConfig
from mergeflow.fitness import TaskFitness, evaluate_candidate


def _history(settings, generations, loss):
    """Run a search in memory, writing history rows as the tell stage does."""
    optimizer = make_optimizer(settings)
    rows = []
    for g in range(generations):
        candidates = ask_generation(optimizer, settings.population)
        losses = [loss(c.value) for c in candidates]
        tell_generation(optimizer, candidates, losses)
        rows += [{"generation": g, "index": i, "genome": list(map(float, c.value)), "loss": l}
                 for i, (c, l) in enumerate(zip(candidates, losses))]
    return optimizer, pd.DataFrame(rows)


@pytest.mark.parametrize("name", ["CMA", "TwoPointsDE", "NGOpt", "PSO"])
def test_replaying_the_history_gives_the_same_next_candidates_as_the_pickle(tmp_path, name):
    settings = SearchSettings(name, dim=5, population=4, seed=11)
    optimizer, history = _history(settings, 3, lambda x: float(np.sum((x - 0.3) ** 2)))
    save_state(tmp_path / "optimizer.pkl", optimizer)
    pickled, _ = load_state(tmp_path / "optimizer.pkl")
    rebuilt = replay(settings, history)
    for a, b in zip(ask_generation(pickled, 4), ask_generation(rebuilt, 4)):
        np.testing.assert_array_equal(a.value, b.value)


def test_same_seed_same_search_other_seed_other_search():
    settings = SearchSettings("CMA", dim=4, population=3, seed=5)
    _, a = _history(settings, 2, lambda x: float(x.sum()))
    _, b = _history(settings, 2, lambda x: float(x.sum()))
    _, c = _history(SearchSettings("CMA", dim=4, population=3, seed=6), 2, lambda x: float(x.sum()))
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(np.stack(a["genome"]), np.stack(c["genome"]))


def test_replay_rejects_a_foreign_history():
    _, history = _history(SearchSettings("CMA", dim=3, population=2, seed=1), 1, lambda x: float(x.sum()))
    with pytest.raises(MergeflowError, match="does not belong to optimizer 'CMA' with seed 2"):
        replay(SearchSettings("CMA", dim=3, population=2, seed=2), history)


def test_unknown_optimizer_is_named():
    with pytest.raises(MergeflowError, match="unknown Nevergrad optimizer 'cma'; did you mean 'CMA'"):
        make_optimizer(SearchSettings("cma", dim=2, population=2, seed=0))


def _cfg(tiny_zoo, **over):
    base = {"run": "r", "objectives": {"t": 1.0}, "multi_objective": False, "fitness": {"kind": "full"},
            "optimizer": "CMA", "sigma": 1 / 6, "learning_rate": 0.025, "population": 2, "budget": None, "shards": 1, "seed": 0,
            "search_space": {"method": "task_arithmetic", "base_model": str(tiny_zoo / "base"),
                             "models": [str(tiny_zoo / "math"), str(tiny_zoo / "lang")],
                             "parameters": {"weight": {"min": 0.0, "max": 1.5}}},
            "save_weights": False, "init": None, "base_path": str(tiny_zoo / "base"),
            "endpoint_paths": {"math": str(tiny_zoo / "math"), "lang": str(tiny_zoo / "lang")}}
    base.update(over)
    return EvolveConfig(**base)


def test_a_merge_with_inf_weights_gets_the_worst_fitness_and_the_run_goes_on(tiny_zoo):
    from transformers import AutoTokenizer

    from mergeflow.merge import InMemoryMerger, recipe_from_dict

    cfg = _cfg(tiny_zoo)
    merger = InMemoryMerger([cfg.base_path, *cfg.endpoint_paths.values()])
    tok = AutoTokenizer.from_pretrained(cfg.base_path)
    items = pd.read_parquet(tiny_zoo / "tasks" / "math_l2.parquet").iloc[:20]
    task = TaskFitness("t", items.assign(prompt=items["question"]), "mc_loglik")

    def recipe(weight):
        return recipe_from_dict({"merge_method": "task_arithmetic", "base_model": cfg.base_path,
                                 "models": [{"model": p, "parameters": {"weight": weight}}
                                            for p in cfg.endpoint_paths.values()]})

    bad = evaluate_candidate(merger, tok, recipe(3e38), [task], EvalSettings.from_config())
    good = evaluate_candidate(merger, tok, recipe(0.5), [task], EvalSettings.from_config())
    assert "NaN or Inf" in bad.problem and good.problem is None
    candidates = pd.DataFrame({"generation": [0, 0], "index": [0, 1], "genome": [[0.1], [0.2]], "seed": [1, 2],
                               "recipe_hash": ["a", "b"], "recipe": ["x", "y"]})
    fitness = pd.DataFrame([{"generation": 0, "index": i, "rung": 0, "task": "t", "fitness": r.fitness["t"], "sd": r.sd["t"],
                             "items": r.items["t"], "problem": r.problem or "", "wall_s": r.wall_s}
                            for i, r in enumerate([bad, good])])
    table = candidate_table(cfg.objectives, candidates, fitness)
    assert table["loss"].tolist() == [WORST_LOSS, -good.fitness["t"]]
    assert np.isnan(table["fitness"][0]) and table["fitness"][1] == pytest.approx(good.fitness["t"])


def test_nan_fitness_gets_the_worst_loss(tiny_zoo):
    cfg = _cfg(tiny_zoo)
    candidates = pd.DataFrame({"generation": [0], "index": [0], "genome": [[0.1]], "seed": [1],
                               "recipe_hash": ["a"], "recipe": ["x"]})
    fitness = pd.DataFrame([{"generation": 0, "index": 0, "rung": 0, "task": "t", "fitness": float("nan"), "sd": 0.0,
                             "items": 5, "problem": "", "wall_s": 0.1}])
    assert candidate_table(cfg.objectives, candidates, fitness)["loss"].tolist() == [WORST_LOSS]


def test_init_starts_the_search_at_the_given_weights(tiny_zoo):
    cfg = _cfg(tiny_zoo, init={str(tiny_zoo / "math"): 1.2, str(tiny_zoo / "lang"): 0.0})
    space = cfg.space()
    genome = space.initial_genome(cfg.init)
    assert genome == pytest.approx((0.8, 0.0))  # weight range [0, 1.5]
    recipe = space.to_recipe(np.asarray(genome))
    assert [m.parameters["weight"] for m in recipe.models] == pytest.approx([1.2, 0.0])
    optimizer = make_optimizer(cfg.search_settings())
    np.testing.assert_allclose(optimizer.parametrization.value, genome)


def test_resident_sources_serve_later_jobs_and_reload_when_a_model_changes(tiny_zoo, tmp_path):
    import os
    import shutil

    from mergeflow.evolve.resident import release, resident_merger
    from mergeflow.merge import recipe_from_dict

    paths = [str(shutil.copytree(tiny_zoo / name, tmp_path / name)) for name in ("base", "math", "lang")]
    items = pd.read_parquet(tiny_zoo / "tasks" / "math_l2.parquet").iloc[:20]
    task = TaskFitness("t", items.assign(prompt=items["question"]), "mc_loglik")
    recipe = recipe_from_dict({"merge_method": "task_arithmetic", "base_model": paths[0],
                               "models": [{"model": p, "parameters": {"weight": 0.4}} for p in paths[1:]]})
    try:
        with resident_merger(paths, "cpu", "float32") as (first, tok):
            fresh = evaluate_candidate(first, tok, recipe, [task], EvalSettings.from_config())
        with resident_merger(paths, "cpu", "float32") as (again, tok):
            assert again is first  # the next job's sources are already loaded
            assert evaluate_candidate(again, tok, recipe, [task], EvalSettings.from_config()).fitness == fresh.fitness
        weights = next((tmp_path / "math").glob("*.safetensors"))
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rebuilt expert
        with resident_merger(paths, "cpu", "float32") as (reloaded, _):
            assert reloaded is not first
    finally:
        release()


def test_sigma_sets_the_first_generation_spread():
    """evolve.sigma is the genome's mutation scale: CMA's first generation spreads with it."""
    spreads = []
    for sigma in (1 / 6, 0.35):
        optimizer = make_optimizer(SearchSettings("CMA", dim=8, population=24, seed=0, init=(0.5,) * 8, sigma=sigma))
        genomes = np.array([c.value for c in ask_generation(optimizer, 24)])
        spreads.append(genomes.std(axis=0).mean())
    assert spreads[0] == pytest.approx(0.47 / 6, rel=0.25) and spreads[1] > 1.8 * spreads[0]
