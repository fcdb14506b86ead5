"""Every stage's library function called as its rule calls it, in-process on the tiny zoo: data,
respond, calibrate, fit_irt, select_anchors, ask / fitness / tell with both fitness kinds, the
baseline and final merges with their lineage, provenance and the job logs. The slow end-to-end
run (tests/test_workflow.py) drives the same functions through Snakemake."""

import copy
import json

import pandas as pd
import pytest
import yaml

from mergeflow.calibrate import calibrate
from mergeflow.config import validate_config
from mergeflow.data import split_task, write_splits
from mergeflow.evaluate import respond
from mergeflow.evolve import history as hist
from mergeflow.evolve.stages import EvolveConfig, FitnessJob, ask, fitness, promote, tell
from mergeflow.irt.anchors import select_anchors
from mergeflow.irt.fit import load_irt
from mergeflow.irt.model import fit_irt
from mergeflow.irt.responses import load_response_matrix
from mergeflow.lineage import baseline_model, merge_recipe
from mergeflow.logs import job_log, setup_job
from mergeflow.provenance import write_provenance

EVALUATION = {"batch_size": 64, "max_length": 64, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def stages(tiny_zoo, tmp_path_factory):
    """A validated config over the tiny zoo, its math_l2 splits, endpoint responses, a small
    calibration population, an IRT fit and an anchor set, as the IRT stages write them."""
    root = tmp_path_factory.mktemp("stages")
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


def test_calibration_population_holds_endpoints_and_random_merges(stages):
    _, root, _, _ = stages
    calibration = pd.read_parquet(root / "calibration.parquet")
    assert sorted(calibration["model"].unique()) == [f"random-{i:03d}" for i in range(4)]
    assert calibration.groupby("model").size().eq(40).all()


def run_generations(cfg: EvolveConfig, config: dict, task_files: dict, root, generations: int) -> str:
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


@pytest.mark.parametrize("run, items", [("full", 40), ("anchored", 8)])
def test_two_generations_of_ask_fitness_tell(stages, tmp_path, run, items):
    config, _, files, _ = stages
    cfg = EvolveConfig.from_config(config, run)
    from mergeflow.fitness import FITNESS

    needs = FITNESS[cfg.fitness["kind"]].needs(cfg.fitness)
    assert needs == {"full": ("split",), "anchored": ("split", "anchors", "irt", "calibration")}[run]
    task_files = {"math_l2": {need: files[need] for need in needs}}
    history = pd.read_parquet(run_generations(cfg, config, task_files, tmp_path, 2))
    assert len(history) == 6 and set(history["items"]) == {items} and (history["problem"] == "").all()
    assert history["fitness_math_l2"].between(0, 1).all() and history["sd_math_l2"].gt(0).all()
    best = hist.best_row(history)
    assert (tmp_path / "gen_1" / "best" / "recipe.yaml").read_text() == best["recipe"]
    assert "candidate 0" in (tmp_path / "gen_1" / "fitness_0.log").read_text()


def test_multi_fidelity_promotes_the_best_and_scores_only_unseen_items(stages, tmp_path):
    """Rungs of 8 anchors, 20 and all 40 items at η = 2: 4, 2 and 1 candidates per rung."""
    config, _, files, _ = stages
    cfg = EvolveConfig.from_config(config, "multi")
    task_files = {"math_l2": files}
    gen = tmp_path / "gen_0"
    ask(cfg, 0, None, None, str(gen / "candidates.parquet"), str(gen / "asked.pkl"))
    shards, earlier = [], ()
    for rung in range(3):
        out = gen / f"rung_{rung}"
        job = FitnessJob(0, rung, 0, str(gen / "candidates.parquet"),
                         str(gen / f"rung_{rung - 1}" / "promoted.parquet") if rung else None, earlier,
                         str(out / "fitness_0.parquet"), str(out / "responses_0.parquet"))
        rows = fitness(cfg, config["tasks"], config["evaluation"], task_files, job)
        assert len(rows) == [4, 2, 1][rung] and set(rows["items"]) == {[8, 12, 20][rung]}  # only unseen items
        answers = pd.read_parquet(out / "responses_0.parquet")
        assert answers.groupby("recipe_hash").size().eq([8, 20, 40][rung]).all()
        if rung < 2:
            kept = promote(cfg, 0, rung, [str(out / "fitness_0.parquet")], str(out / "promoted.parquet"))
            best = rows.sort_values(["fitness", "index"], ascending=[False, True])["index"].head(len(kept))
            assert kept["index"].tolist() == best.tolist()
        shards.append(str(out / "fitness_0.parquet"))
        earlier = earlier + (str(out / "responses_0.parquet"),)
    top = pd.read_parquet(gen / "rung_2" / "responses_0.parquet")
    assert rows["fitness"].iloc[0] == top["correct"].mean() and rows["sd"].iloc[0] > 0  # the whole split: exact
    history = tell(cfg, 0, str(gen / "asked.pkl"), str(gen / "candidates.parquet"), shards, None,
                   str(gen / "optimizer.pkl"), str(gen / "history.parquet"), str(gen / "best" / "recipe.yaml"))
    assert sorted(history["rung"]) == [0, 0, 1, 2] and sorted(history["items"]) == [8, 8, 20, 40]
    assert hist.best_row(history)["rung"] == 2  # the best is chosen among the most exact fitnesses


def test_a_bracket_starts_every_candidate_of_its_generation_at_its_rung(stages, tmp_path):
    """Brackets [1, 0]: generation 0 puts all 4 candidates on rung 1 (20 items, none seen before)
    and promotes 2 of them to the whole split, as a generation starting at rung 0 does from there."""
    config = copy.deepcopy(stages[0])
    config["runs"]["multi"]["evolve"]["fitness"]["brackets"] = [1, 0]
    cfg = EvolveConfig.from_config(validate_config(config), "multi")
    from mergeflow.fitness import FITNESS

    kind = FITNESS[cfg.fitness["kind"]]
    assert [list(kind.climbed(cfg.fitness, g)) for g in range(3)] == [[1, 2], [0, 1, 2], [1, 2]]
    gen = tmp_path / "gen_0"
    ask(cfg, 0, None, None, str(gen / "candidates.parquet"), str(gen / "asked.pkl"))
    shards, earlier = [], ()
    for rung in (1, 2):
        out = gen / f"rung_{rung}"
        job = FitnessJob(0, rung, 0, str(gen / "candidates.parquet"),
                         str(gen / "rung_1" / "promoted.parquet") if rung == 2 else None, earlier,
                         str(out / "fitness_0.parquet"), str(out / "responses_0.parquet"))
        rows = fitness(cfg, config["tasks"], config["evaluation"], {"math_l2": stages[2]}, job)
        assert len(rows) == {1: 4, 2: 2}[rung] and set(rows["items"]) == {20}
        if rung == 1:
            assert len(promote(cfg, 0, 1, [job.out], str(out / "promoted.parquet"))) == 2
        shards.append(job.out)
        earlier += (job.out_responses,)
    history = tell(cfg, 0, str(gen / "asked.pkl"), str(gen / "candidates.parquet"), shards, None,
                   str(gen / "optimizer.pkl"), str(gen / "history.parquet"), str(gen / "best" / "recipe.yaml"))
    assert sorted(history["rung"]) == [1, 1, 2, 2] and sorted(history["items"]) == [20, 20, 40, 40]


@pytest.mark.parametrize("change, message", [
    ({"rungs": [20, 8]}, r"fitness\.rungs \[20, 8\]: each rung must have more items"),
    ({"rungs": [8, 60]}, r"the top rung has 60 items, more than task 'math_l2'\'s search split \(40"),
    ({"eta": 1.5}, r"fitness\.eta: 1\.5 is less than the minimum of 2"),
    ({"rungs": [4, 8, 16, 40]}, r"population 4 is too small for 4 rungs at eta 2: .* at least 5"),
    ({"brackets": [0, 3]}, r"fitness\.brackets \[0, 3\]: a bracket starts at rung 3, but the rungs are 0 to 2"),
    ({"brackets": []}, r"fitness\.brackets: \[\] should be non-empty"),
])
def test_bad_multi_fidelity_settings_are_named(stages, change, message):
    from mergeflow.errors import MergeflowError

    config = copy.deepcopy(stages[0])
    config["runs"]["multi"]["evolve"]["fitness"].update(change)
    with pytest.raises(MergeflowError, match=message):
        validate_config(config)


def test_an_estimator_without_an_irt_population_is_named(stages):
    from mergeflow.errors import MergeflowError

    config = copy.deepcopy(stages[0])
    config["irt"]["calibration"]["random_merges"] = 0
    with pytest.raises(MergeflowError, match=r"runs\.anchored\.evolve\.fitness\.estimator 'gmpirt' needs an IRT fit"):
        validate_config(config)


def test_baseline_and_final_merges_carry_their_lineage(stages, tmp_path):
    config, _, _, paths = stages
    baseline_model(config["baseline"], paths["base"], [paths["math"], paths["lang"]], str(tmp_path / "b.yaml"),
                   str(tmp_path / "baseline"))
    recipe = yaml.safe_load((tmp_path / "b.yaml").read_text())
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.5, 0.5]
    history = pd.DataFrame({"generation": [0, 0], "index": [0, 1], "loss": [-0.2, -0.3], "fitness": [0.2, 0.3],
                            "recipe": ["", ""]})
    history.to_parquet(tmp_path / "history.parquet", index=False)
    merge_recipe(str(tmp_path / "b.yaml"), str(tmp_path / "final"), {"run": "r"}, str(tmp_path / "history.parquet"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "- run: r" in card and "found in generation 0 as candidate 1 of 2 evaluated" in card


def test_provenance_and_job_logs(stages, tmp_path):
    config, _, _, _ = stages
    record = write_provenance(config, "full", tmp_path / "provenance.json")
    assert json.loads((tmp_path / "provenance.json").read_text())["seeds"] == record["seeds"] == {
        "seed": 0, "run_seed": 0}
    logger = setup_job(tmp_path / "job.log", threads=1)
    logger.info("hello from a job")
    assert "hello from a job" in (tmp_path / "job.log").read_text()


def gradient_run(config: dict, **fitness) -> dict:
    """The stages' config with a gradient run (Adam, one candidate per step) named ``grad``."""
    config = copy.deepcopy(config)
    evolve = copy.deepcopy(config["runs"]["full"]["evolve"])
    evolve.update({"optimizer": "Adam", "population": 1, "generations": 3,
                   "fitness": {"kind": "gradient", "batch": 16, **fitness}})
    config["runs"]["grad"] = {"evolve": evolve}
    return validate_config(config)


@pytest.mark.parametrize("loss", ["sigmoid", "cross_entropy"])
def test_the_genome_gradient_is_the_training_loss_s_derivative(stages, loss):
    """Against central differences of the loss itself, merged at x ± h along each gene."""
    import numpy as np
    import torch

    from mergeflow.evaluate import EvalSettings, context_length
    from mergeflow.evolve.resident import resident_merger
    from mergeflow.fitness import FITNESS
    from mergeflow.fitness.gradient import genome_gradient, task_loss

    config = gradient_run(stages[0], loss=loss)
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    fit = FITNESS["gradient"].task_fitness("math_l2", config["tasks"]["math_l2"], stages[2], cfg, 0, 1)
    x = np.array([0.6, 0.2, 0.5, 0.4])
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        gradient, losses = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)
        model = merger.merge(space.to_recipe(x))
        max_length = context_length(model, settings)

        def loss_at(genome):
            return task_loss(merger.merge(space.to_recipe(genome)), tok, fit, settings, max_length, cfg.fitness,
                             backward=False)
        with torch.no_grad():
            assert loss_at(x) == pytest.approx(losses["math_l2"])
            h, numeric = 1e-2, []
            for k in range(space.dim):
                step = np.eye(space.dim)[k] * h
                up, down = (loss_at(x + s) for s in (step, -step))
                numeric.append((up - down) / (2 * h))
    assert np.abs(gradient["math_l2"]).max() > 0.01  # the loss does depend on the genes
    np.testing.assert_allclose(gradient["math_l2"], numeric, rtol=0.02, atol=2e-3)


def test_a_bfloat16_merge_gives_about_the_float32_genome_gradient(stages):
    """The GPU path's dtype: the affine check allows bf16 rounding, and the gradient stays close."""
    import numpy as np

    from mergeflow.evaluate import EvalSettings
    from mergeflow.evolve.resident import resident_merger
    from mergeflow.fitness import FITNESS
    from mergeflow.fitness.gradient import genome_gradient

    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    fit = FITNESS["gradient"].task_fitness("math_l2", config["tasks"]["math_l2"], stages[2], cfg, 0, 0)
    x, out = np.array([0.6, 0.2, 0.5, 0.4]), {}
    for dtype in ("float32", "bfloat16"):
        with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", dtype) as (merger, tok):
            out[dtype] = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)[0]["math_l2"]
    assert np.corrcoef(out["float32"], out["bfloat16"])[0, 1] > 0.95


def test_a_merge_not_affine_in_the_genome_is_refused_by_the_gradient(stages):
    from mergeflow.errors import MergeflowError
    from mergeflow.evaluate import EvalSettings
    from mergeflow.evolve.resident import resident_merger
    from mergeflow.fitness import FITNESS
    from mergeflow.fitness.gradient import genome_gradient
    from mergeflow.spaces import build_space
    import numpy as np

    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    ties = build_space({**cfg.search_space, "method": "ties",
                        "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5}})
    fit = FITNESS["gradient"].task_fitness("math_l2", config["tasks"]["math_l2"], stages[2], cfg, 0, 0)
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        with pytest.raises(MergeflowError, match="not affine in its genome"):
            genome_gradient(merger, tok, ties, np.full(ties.dim, 0.5), [fit], EvalSettings.from_config(config["evaluation"]),
                            cfg.fitness)


def test_a_gradient_search_steps_on_minibatches_and_replays_from_its_history(stages, tmp_path):
    """Three Adam steps on 16-item minibatches (two batches per pass over the 40-item split): each
    step's history row holds its gradient, the run's result is its last step, and the optimizer
    rebuilt from the history alone asks the same next genome as the pickle."""
    import numpy as np

    from mergeflow.evolve.search import replay
    from mergeflow.evolve.stages import restore_optimizer

    config = gradient_run(stages[0], learning_rate=0.1)
    cfg = EvolveConfig.from_config(config, "grad")
    previous = run_generations(cfg, config, {"math_l2": stages[2]}, tmp_path, 3)
    seen = [set(pd.read_parquet(tmp_path / f"gen_{g}" / "responses_0.parquet")["item_id"]) for g in range(3)]
    history = pd.read_parquet(previous)
    assert list(history["items"]) == [16, 16, 16] and not seen[0] & seen[1]  # a pass draws without replacement
    assert seen[2] != seen[0]  # the second pass (2 batches of 16 per pass of 40) draws another order
    genomes = np.stack(history["genome"].to_list())
    steps = np.abs(np.diff(genomes, axis=0))
    assert (steps > 0).any(axis=1).all() and steps.max() <= 0.1 + 1e-9  # Adam moves at most lr per gene
    assert np.isfinite(np.stack(history["gradient"].to_list())).all()
    assert hist.best_row(history)["generation"] == 2
    assert (tmp_path / "gen_2" / "best" / "recipe.yaml").read_text() == history["recipe"].iloc[-1]
    pickled = restore_optimizer(cfg, cfg.search_settings(), str(tmp_path / "gen_2" / "optimizer.pkl"), previous)
    replayed = replay(cfg.search_settings(), history)
    np.testing.assert_array_equal(pickled.ask().value, replayed.ask().value)


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "CMA"}, r"grad\.evolve\.optimizer: fitness kind 'gradient' needs a gradient optimizer \(Adam\)"),
    ({"population": 4}, r"grad\.evolve\.population: fitness kind 'gradient' takes one candidate per generation"),
    ({"fitness": {"kind": "gradient", "batch": 50}}, r"grad\.evolve\.fitness\.batch: 50 items, more than task 'math_l2'"),
    ({"search_space": {"method": "ties", "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": 0.5}}},
     r"grad\.evolve\.search_space: fitness kind 'gradient' needs a parameter space whose merge is affine"),
    ({"fitness": {"kind": "gradient", "learning_rate": 0}}, r"learning_rate: 0 is less than or equal to the minimum"),
    ({"fitness": {"kind": "gradient", "loss": "hinge"}}, r"fitness\.loss: 'hinge' is not one of \['sigmoid', 'cross_entropy'\]"),
    ({"fitness": {"kind": "gradient", "temperature": 0}}, r"temperature: 0 is less than or equal to the minimum"),
])
def test_bad_gradient_settings_are_named(stages, change, message):
    from mergeflow.errors import MergeflowError

    config = copy.deepcopy(stages[0])
    evolve = copy.deepcopy(config["runs"]["full"]["evolve"])
    evolve.update({"optimizer": "Adam", "population": 1, "fitness": {"kind": "gradient", "batch": 16}})
    evolve.update(change)
    config["runs"] = {"grad": {"evolve": evolve}}
    with pytest.raises(MergeflowError, match=message):
        validate_config(config)
