"""The ``gradient`` fitness kind: Adam steps on the genome, each told the gradient of a training
loss on one minibatch (its ``extras``), and the last step as the search's result."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from mergeflow.config import upgrade_config, validate_config
from mergeflow.data import split_task, write_splits
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings, context_length, teach
from mergeflow.evolve import history as hist
from mergeflow.evolve.resident import resident_merger
from mergeflow.evolve.search import replay
from mergeflow.evolve.stages import EvolveConfig, restore_optimizer
from mergeflow.figures import search_progress
from mergeflow.fitness.gradient import LABEL_FREE, TEACHER_COLUMN, genome_gradient, path_gradient, task_loss
from mergeflow.merge.methods import smooth_parameters
from mergeflow.spaces import build_space
from stage_runs import run_generations, with_run


def gradient_run(config: dict, **fitness) -> dict:
    """The stages' config with a gradient run (Adam, one candidate per step) named ``grad``; a
    label-free loss's run checks no estimate."""
    label_free = fitness.get("loss") in LABEL_FREE
    return with_run(config, "grad", optimizer="Adam", population=1, generations=3,
                    fitness={"kind": "gradient", "batch": 16, **fitness}, **({"check_estimate": False} if label_free else {}))


def central_differences(loss_at, x: np.ndarray, genes, h: float = 1e-2) -> list[float]:
    """(loss(x + h e_k) - loss(x - h e_k)) / 2h for each gene k of ``genes``."""
    numeric = []
    for k in genes:
        step = np.eye(len(x))[k] * h
        numeric.append((loss_at(x + step) - loss_at(x - step)) / (2 * h))
    return numeric


def assert_is_the_loss_derivative(gradient: np.ndarray, loss: float, loss_at, x: np.ndarray) -> None:
    """``gradient`` (and ``loss``) at ``x`` against ``loss_at``, the loss of the merge at a genome:
    the loss itself, then central differences along every gene."""
    with torch.no_grad():
        assert loss_at(x) == pytest.approx(loss)
        numeric = central_differences(loss_at, x, range(len(x)))
    assert np.abs(gradient).max() > 0.01  # the loss does depend on the genes
    np.testing.assert_allclose(gradient, numeric, rtol=0.02, atol=2e-3)


@pytest.mark.parametrize("loss", ["sigmoid", "cross_entropy", "entropy"])
def test_the_genome_gradient_is_the_training_loss_s_derivative(stages, loss):
    """Against central differences of the loss itself, merged at x ± h along each gene."""
    config = gradient_run(stages[0], loss=loss)
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2], generation=1))
    x = np.array([0.6, 0.2, 0.5, 0.4])
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        gradient, losses = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)
        model = merger.merge(space.to_recipe(x))
        max_length = context_length(model, settings)

        def loss_at(genome):
            return task_loss(merger.merge(space.to_recipe(genome)), tok, fit, settings, max_length, cfg.fitness,
                             backward=False)
        assert_is_the_loss_derivative(gradient["math_l2"], losses["math_l2"], loss_at, x)


def taught(config: dict, split: str, out, teacher: str = "lang") -> str:
    """The teach stage's outputs of ``teacher`` on math_l2's search split ``split``, at ``out``."""
    tcfg = config["tasks"]["math_l2"]
    teach(config["models"][teacher], split, tcfg["scorer"], tcfg["target_delimiter"], config["evaluation"], out)
    return str(out)


@pytest.mark.parametrize("scorer", ["mc_loglik", "mc_loglik_norm", "exact_match"])
def test_the_agreement_gradient_is_the_training_loss_s_derivative(stages, tmp_path, scorer):
    """``loss: agreement`` (DAM's): the KL from the teacher's softmax over the choices (length-normalised
    as the scorer says) or the negative log-likelihood of its greedy answer (generation), against
    central differences; the minibatch carries the teacher's outputs from the teach stage's file."""
    config = gradient_run(stages[0], loss="agreement", teachers={"math_l2": "lang"})
    config["tasks"]["math_l2"]["scorer"] = scorer
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    files = {**stages[2], "teacher": taught(config, stages[2]["split"], tmp_path / "lang.parquet")}
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], files, generation=1))
    outputs = fit.items[TEACHER_COLUMN]
    assert {"answer", "target"}.isdisjoint(fit.items.columns)  # read without its answers
    if scorer == "exact_match":  # greedy answers, not the gold targets
        gold = pd.read_parquet(stages[2]["split"]).set_index("item_id")["target"]
        assert all(isinstance(o, str) for o in outputs) and (outputs.to_numpy() != gold[fit.items["item_id"]]).any()
    else:
        assert all(len(o) == len(c) for o, c in zip(outputs, fit.items["choices"]))
    x = np.array([0.6, 0.2, 0.5, 0.4])
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        gradient, losses = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)
        max_length = context_length(merger.merge(space.to_recipe(x)), settings)

        def loss_at(genome):
            return task_loss(merger.merge(space.to_recipe(genome)), tok, fit, settings, max_length, cfg.fitness,
                             backward=False)
        assert_is_the_loss_derivative(gradient["math_l2"], losses["math_l2"], loss_at, x)
        if scorer != "exact_match":  # the teacher agrees with itself: KL 0 at its own merge
            assert loss_at(np.array([0.0, 1 / 1.5, 0.0, 1 / 1.5])) == pytest.approx(0, abs=1e-5)


def test_a_bfloat16_merge_gives_about_the_float32_genome_gradient(stages):
    """The GPU path's dtype: the masks check allows bf16 rounding, and the gradient stays close."""
    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2]))
    x, out = np.array([0.6, 0.2, 0.5, 0.4]), {}
    for dtype in ("float32", "bfloat16"):
        with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", dtype) as (merger, tok):
            out[dtype] = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)[0]["math_l2"]
    assert np.corrcoef(out["float32"], out["bfloat16"])[0, 1] > 0.95


# Spaces beyond task arithmetic: densities (and gamma, epsilon) fixed, weights and lambda searched.
HELD_SPACES = {
    "ties": {"parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5},
             "method_parameters": {"lambda": {"min": 0.5, "max": 1.5}}},
    "ties_unnormalized": {"method": "ties", "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5},
                          "method_parameters": {"normalize": False}},
    "dare_ties": {"parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5}},
    "breadcrumbs": {"parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.6, "gamma": 0.05}},
    "breadcrumbs_ties": {"parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.6},
                         "method_parameters": {"normalize": True}},
    "della": {"parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5, "epsilon": 0.1}},
    # per module kind: the mlp's weights and the rest's are genes of their own
    "dare_linear_filtered": {"method": "dare_linear", "filters": ["mlp"],
                             "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5}},
}


def held_space(cfg: EvolveConfig, name: str):
    return build_space({**cfg.search_space, "method": name, **HELD_SPACES[name]})  # a spec's own method wins


def held_merge(merger, space, x: np.ndarray, genome: np.ndarray, seed: int):
    """The merge at ``genome`` with every mask (trims, seeded drops, elected signs) held as the merge
    at ``x`` makes it, written into the merger's model."""
    here, there = (merger.plan(space.to_recipe(g, seed=seed)) for g in (x, genome))
    with torch.no_grad():
        for plan, moved in zip(here.tensors, there.tensors):
            merger.parameters[plan.name].copy_(merger.masked_terms(plan).at(*smooth_parameters(moved.model_params,
                                                                                              moved.params)))
    return merger.model


@pytest.mark.parametrize("name", list(HELD_SPACES))
def test_the_genome_gradient_with_masks_held_is_the_held_merge_s_derivative(stages, name):
    """TIES, DARE-TIES (its drops seeded by the candidate's seed), breadcrumbs and DELLA, normalized
    or not, with lambda as a gene: against central differences of the loss of the merge at x ± h
    along each gene with its masks held at x."""
    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = held_space(cfg, name), EvalSettings.from_config(config["evaluation"])
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2], generation=1))
    x, seed = np.linspace(0.2, 0.7, space.dim), 3
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        gradient, losses = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness, seed)
        max_length = context_length(merger.model, settings)

        def loss_at(genome):
            return task_loss(held_merge(merger, space, x, genome, seed), tok, fit, settings, max_length, cfg.fitness,
                             backward=False)
        assert_is_the_loss_derivative(gradient["math_l2"], losses["math_l2"], loss_at, x)


def test_a_bfloat16_ties_merge_gives_about_the_float32_genome_gradient(stages):
    """The masks check allows bf16 rounding of the held merge, and the gradient stays close."""
    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = held_space(cfg, "ties"), EvalSettings.from_config(config["evaluation"])
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2]))
    x, out = np.linspace(0.2, 0.7, space.dim), {}
    for dtype in ("float32", "bfloat16"):
        with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", dtype) as (merger, tok):
            out[dtype] = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)[0]["math_l2"]
    assert np.corrcoef(out["float32"], out["bfloat16"])[0, 1] > 0.95


def test_held_masks_that_are_not_the_merge_s_are_refused(stages, monkeypatch):
    """A held merge drawn with another seed than the candidate's (DARE's drops) is caught."""
    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    space = held_space(cfg, "dare_ties")
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2]))
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        held = merger.masked_terms
        monkeypatch.setattr(merger, "masked_terms", lambda plan: held(dataclasses.replace(plan, seed=plan.seed + 1)))
        with pytest.raises(MergeflowError, match="the merge with its masks held is not the candidate's merge"):
            genome_gradient(merger, tok, space, np.full(space.dim, 0.5), [fit],
                            EvalSettings.from_config(config["evaluation"]), cfg.fitness)


def test_a_gradient_search_steps_on_minibatches_and_replays_from_its_history(stages, tmp_path):
    """Three Adam steps on 16-item minibatches (two batches per pass over the 40-item split): each
    step's history row holds its gradient, the run's result is its last step, and the optimizer
    rebuilt from the history alone asks the same next genome as the pickle."""
    config = gradient_run(stages[0])
    config["runs"]["grad"]["evolve"]["learning_rate"] = 0.1
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
    assert cfg.result == "last" and hist.best_row(history, cfg.result)["generation"] == 2
    assert (tmp_path / "gen_2" / "best" / "recipe.yaml").read_text() == history["recipe"].iloc[-1]
    pickled = restore_optimizer(cfg, cfg.search_settings(), str(tmp_path / "gen_2" / "optimizer.pkl"), previous)
    replayed = replay(cfg.search_settings(), history, None, cfg.kind.extra_columns)
    np.testing.assert_array_equal(pickled.ask().value, replayed.ask().value)


def test_adam_cosine_s_step_falls_along_a_half_cosine_over_its_budget(stages, tmp_path):
    """AdamCosine's step at step t is lr ½(1 + cos(π (t − 1) / budget)): the full step first, then
    less each step (Adam moves a gene at most its step); replayed from the history it asks what
    the pickle asks."""
    config = gradient_run(stages[0])
    config["runs"]["grad"]["evolve"].update({"learning_rate": 0.1, "optimizer": "AdamCosine", "budget": 3})
    cfg = EvolveConfig.from_config(config, "grad")
    previous = run_generations(cfg, config, {"math_l2": stages[2]}, tmp_path, 3)
    history = pd.read_parquet(previous)
    genomes = np.stack(history["genome"].to_list())
    steps = np.abs(np.diff(genomes, axis=0)).max(axis=1)  # steps 1 and 2: at most 0.1 and 0.075
    assert 0 < steps[1] <= 0.1 * 0.5 * (1 + np.cos(np.pi / 3)) + 1e-9 < steps[0] <= 0.1 + 1e-9
    pickled = restore_optimizer(cfg, cfg.search_settings(), str(tmp_path / "gen_2" / "optimizer.pkl"), previous)
    replayed = replay(cfg.search_settings(), history, None, cfg.kind.extra_columns)
    np.testing.assert_array_equal(pickled.ask().value, replayed.ask().value)
    assert [round(pickled.rate(), 6) for pickled.steps in (1, 2, 3, 4)] == [0.1, 0.075, 0.025, 0.0]


# DFS over the tiny zoo's experts: the hybrid's space (2 repeats of 2 + 2 layers: 8 slots, 16 W genes)
DFS = {"kind": "dfs", "a": "math", "b": "lang", "repeats": 2, "max_layers": 8}


def test_the_path_gradient_in_the_scale_genes_is_the_loss_s_derivative(stages):
    """A DFS genome's gradient in its W genes, the path held (W moves scales only), against central
    differences of the loss; an indicator gene and a W gene off the path get 0."""
    config = with_run(stages[0], "hybrid", optimizer="CMA", population=2, generations=1, search_space=DFS,
                      fitness={"kind": "gradient", "batch": 16})
    cfg = EvolveConfig.from_config(config, "hybrid")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2]))
    x = np.array(space.initial_genome(None))
    x[[2, 3, 4]] = 0.6  # A0 A1, then B0 B1, then A0 (and the closing A1) again: through both models
    x[space.slots:] = np.random.default_rng(0).uniform(0.3, 0.7, space.layers ** 2)
    with resident_merger([space.a, space.b], "cpu", "float32", "path") as (assembler, tok):
        gradient, losses = path_gradient(assembler, tok, space, x, [fit], settings, cfg.fitness)
        max_length = context_length(assembler.merge(space.to_recipe(x)), settings)

        def loss_at(genome):
            return task_loss(assembler.merge(space.to_recipe(genome)), tok, fit, settings, max_length, cfg.fitness,
                             backward=False)
        with torch.no_grad():
            assert loss_at(x) == pytest.approx(losses["math_l2"])
            on_path = np.flatnonzero(gradient["math_l2"])
            assert set(on_path) <= set(space.scale_genes()) and len(on_path) == 4  # A0>A1 twice, A1>B0, B0>B1, B1>A0
            numeric = central_differences(loss_at, x, on_path)
    assert np.abs(numeric).max() > 1e-3  # the loss does depend on the scales
    np.testing.assert_allclose(gradient["math_l2"][on_path], numeric, rtol=0.02, atol=2e-4)


def test_a_hybrid_search_evolves_the_path_and_steps_the_scales(stages, tmp_path):
    """CMA on the indicators, Adam on the scales: a generation's candidates share their scales, the
    scales move between generations by at most the learning rate, and the optimizer rebuilt from
    the history asks what the pickle asks."""
    config = with_run(stages[0], "hybrid", optimizer="CMA", population=3, generations=3, search_space=DFS,
                      learning_rate=0.1, fitness={"kind": "gradient", "batch": 16})
    cfg = EvolveConfig.from_config(config, "hybrid")
    previous = run_generations(cfg, config, {"math_l2": stages[2]}, tmp_path, 3)
    history = pd.read_parquet(previous)
    genomes = np.stack(history["genome"].to_list())
    scales = list(cfg.space().scale_genes())
    for g in range(3):
        rows = genomes[history["generation"] == g]
        assert (rows[:, scales] == rows[0, scales]).all() and not (rows[:, :scales[0]] == rows[0, :scales[0]]).all()
    moved = np.abs(genomes[history["generation"] == 2][0, scales] - genomes[0, scales])
    assert moved.max() > 0 and moved.max() <= 2 * 0.1 + 1e-9
    assert np.isfinite(np.stack(history["gradient"].to_list())).all()
    last = history[history["generation"] == 2]
    assert hist.best_row(history, cfg.result)["index"] == last.sort_values("loss")["index"].iloc[0]
    pickled = restore_optimizer(cfg, cfg.search_settings(), str(tmp_path / "gen_2" / "optimizer.pkl"), previous)
    replayed = replay(cfg.search_settings(), history, None, cfg.kind.extra_columns)
    np.testing.assert_array_equal(pickled.ask().value, replayed.ask().value)


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "CMA"},
     r"grad\.evolve\.optimizer: fitness kind 'gradient' needs a gradient optimizer \(Adam, AdamCosine\)"),
    # the cosine's horizon is the budget, fixed when the search starts
    ({"optimizer": "AdamCosine"}, r"grad\.evolve\.budget: optimizer AdamCosine decays its step over the run's budget"),
    ({"optimizer": "AdamCosine", "budget": 1, "generations": 2},
     r"grad\.evolve\.generations: 2 steps, past optimizer AdamCosine's budget \(1\), where its step is 0"),
    ({"population": 4}, r"grad\.evolve\.population: fitness kind 'gradient' takes one candidate per generation"),
    ({"fitness": {"kind": "gradient", "batch": 50}}, r"grad\.evolve\.fitness\.batch: 50 items, more than task 'math_l2'"),
    ({"search_space": {"method": "ties", "parameters": {"weight": {"min": 0.0, "max": 1.0},
                                                         "density": {"min": 0.1, "max": 1.0}}}},
     r"grad\.evolve\.search_space\.parameters\.density: fitness kind 'gradient' moves only weight; density chooses"),
    ({"search_space": {"method": "breadcrumbs", "parameters": {"weight": 1.0, "density": 0.5,
                                                                "gamma": {"min": 0.0, "max": 0.1}}}},
     r"grad\.evolve\.search_space\.parameters\.gamma: fitness kind 'gradient' moves only weight"),
    ({"search_space": {"method": "ties", "parameters": {"weight": 1.0},
                       "method_parameters": {"normalize": True, "rescale": {"min": 0, "max": 1}}}},
     r"grad\.evolve\.search_space\.method_parameters\.rescale: fitness kind 'gradient' moves only lambda"),
    ({"search_space": {"method": "slerp", "parameters": {}, "method_parameters": {"t": {"min": 0, "max": 1}}}},
     r"grad\.evolve\.search_space\.method: fitness kind 'gradient' needs a merge that is smooth in its weights "
     r"once its masks are held \(task_arithmetic, ties, .*\), not 'slerp'"),
    ({"search_space": {"method": ["ties", "task_arithmetic"], "parameters": {"weight": {"min": 0.0, "max": 1.0}}}},
     r"grad\.evolve\.search_space\.method: fitness kind 'gradient' takes one method"),
    ({"search_space": {"kind": "dfs", "a": "math", "b": "lang"}},
     r"grad\.evolve\.optimizer: fitness kind 'gradient' on a dfs space is a hybrid: its layer indicators"),
    ({"search_space": {"kind": "dis"}},
     r"grad\.evolve\.search_space\.kind: fitness kind 'gradient' needs a parameter space \(or a dfs space"),
    ({"learning_rate": 0}, r"evolve\.learning_rate: 0 is less than or equal to the minimum"),
    # the older spelling, under fitness, is read as the run's learning_rate
    ({"fitness": {"kind": "gradient", "batch": 16, "learning_rate": 0}},
     r"evolve\.learning_rate: 0 is less than or equal to the minimum"),
    ({"fitness": {"kind": "gradient", "loss": "hinge"}},
     r"fitness\.loss: 'hinge' is not one of \['sigmoid', 'cross_entropy', 'entropy', 'agreement'\]"),
    # agreement needs a teacher for each objective, a model of the config; teachers need agreement
    ({"check_estimate": False, "fitness": {"kind": "gradient", "batch": 16, "loss": "agreement"}},
     r"grad\.evolve\.fitness\.teachers: loss 'agreement' needs a teacher model for objective 'math_l2'"),
    ({"check_estimate": False, "fitness": {"kind": "gradient", "batch": 16, "loss": "agreement",
                                           "teachers": {"math_l2": "maths"}}},
     r"grad\.evolve\.fitness\.teachers\.math_l2: 'maths' is not a model of the config \(base, math, lang\)"),
    ({"check_estimate": False, "fitness": {"kind": "gradient", "batch": 16, "loss": "agreement",
                                           "teachers": {"math_l2": "lang", "read_l2": "lang"}}},
     r"grad\.evolve\.fitness\.teachers\.read_l2: not one of the run's objectives \(math_l2\)"),
    ({"fitness": {"kind": "gradient", "batch": 16, "teachers": {"math_l2": "lang"}}},
     r"grad\.evolve\.fitness\.teachers: only a loss that agrees with teachers \(agreement\) reads them, not loss "
     r"'sigmoid'"),
    # a label-free search has no accuracy estimate to check against the split's answers
    ({"fitness": {"kind": "gradient", "batch": 16, "loss": "entropy"}},
     r"grad\.evolve\.check_estimate: a search on the label-free loss 'entropy' \(fitness\.loss\)"),
    # the loss is the gradient kind's own key
    ({"fitness": {"kind": "full", "loss": "entropy"}},
     r"runs\.grad\.evolve\.fitness: Additional properties are not allowed \('loss' was unexpected\)"),
    ({"fitness": {"kind": "gradient", "temperature": 0}}, r"temperature: 0 is less than or equal to the minimum"),
])
def test_bad_gradient_settings_are_named(stages, change, message):
    config = copy.deepcopy(stages[0])
    evolve = copy.deepcopy(config["runs"]["full"]["evolve"])
    evolve.pop("learning_rate")  # a default of the validated config: the change may give it in its older place
    evolve.update({"optimizer": "Adam", "population": 1, "fitness": {"kind": "gradient", "batch": 16}})
    evolve.update(change)
    config["runs"] = {"grad": {"evolve": evolve}}
    with pytest.raises(MergeflowError, match=message):
        validate_config(config)


@pytest.mark.parametrize("space", [{"method": name, **spec} for name, spec in HELD_SPACES.items()] + [
    {"method": "dare_linear", **HELD_SPACES["dare_ties"]}, {"method": "della_linear", **HELD_SPACES["della"]}])
def test_spaces_with_held_masks_are_accepted(stages, space):
    config = copy.deepcopy(stages[0])
    evolve = copy.deepcopy(config["runs"]["full"]["evolve"])
    evolve.update({"optimizer": "Adam", "population": 1, "fitness": {"kind": "gradient", "batch": 16},
                   "search_space": {**evolve["search_space"], **space}})
    config["runs"] = {"grad": {"evolve": evolve}}
    validate_config(config)


def test_the_learning_rate_under_fitness_is_read_as_the_optimizer_s():
    config = {"runs": {"g": {"evolve": {"optimizer": "Adam", "fitness": {"kind": "gradient", "learning_rate": 0.1}}}}}
    assert upgrade_config(config)["runs"]["g"]["evolve"] == {"optimizer": "Adam", "learning_rate": 0.1,
                                                              "fitness": {"kind": "gradient"}}


def unlabelled_run(config: dict, tmp_path, fitness: dict) -> dict:
    """The stages' config whose math_l2 search prompts come from a file without its ``answer`` and
    ``target`` columns (``search_source``: the source's rows, answers dropped), with one run, a
    gradient search named ``grad`` of fitness ``fitness`` (the runs that read answers go)."""
    prompts = tmp_path / "prompts.parquet"
    source = pd.read_parquet(config["tasks"]["math_l2"]["source"]["path"])
    source.drop(columns=["answer", "target"]).to_parquet(prompts)
    config = copy.deepcopy(config)
    config["tasks"]["math_l2"]["search_source"] = {"path": str(prompts)}
    search = {**config["runs"]["full"]["evolve"], "optimizer": "Adam", "population": 1, "generations": 3,
              "check_estimate": False, "fitness": fitness}
    config["runs"] = {"grad": {"evolve": search}}
    return validate_config(config)


def test_a_label_free_search_reads_no_answer_and_records_its_negative_entropy(stages, tmp_path):
    """``loss: entropy`` on a task whose search prompts come without answers (``search_source``,
    a file with no ``answer`` or ``target`` column, split by the data stage): two Adam steps run,
    each history fitness is the negative mean entropy of the minibatch's softmax over the choices
    (in [-log 4, 0]), no item is answered right or wrong, and the final merge is not checked
    against the split (there is no accuracy to check)."""
    config = unlabelled_run(stages[0], tmp_path, {"kind": "gradient", "batch": 16, "loss": "entropy"})
    split = tmp_path / "data" / "search.parquet"
    write_splits(split_task("math_l2", config["tasks"]["math_l2"], config["seed"]),
                 {"search": split, "test": tmp_path / "data" / "test.parquet"})
    assert {"answer", "target"}.isdisjoint(pd.read_parquet(split).columns)
    cfg = EvolveConfig.from_config(config, "grad")
    assert not cfg.kind.estimates(cfg.fitness, 40) and not cfg.kind.reads_answers(cfg.fitness)
    previous = run_generations(cfg, config, {"math_l2": {**stages[2], "split": str(split)}}, tmp_path, 2)
    history = pd.read_parquet(previous)
    fitness = history[hist.fitness_column("math_l2")]
    assert ((fitness < 0) & (fitness > -np.log(4))).all() and (history[hist.sd_column("math_l2")] > 0).all()
    assert np.isfinite(np.stack(history["gradient"].to_list())).all()
    assert len(pd.read_parquet(tmp_path / "gen_0" / "responses_0.parquet")) == 0
    # the progress figure names what the fitness is and draws it on its own scale, not in percent
    assert cfg.fitness_label == "negative mean entropy on the minibatch, no labels"
    assert search_progress("grad", previous, cfg.result, tmp_path / "progress.png", None, cfg.fitness_label).exists()
    # the labelled losses do need the answers: the same file is refused, naming the missing columns
    labelled = EvolveConfig.from_config(gradient_run(stages[0]), "grad")
    with pytest.raises(MergeflowError, match=r"lacks columns \['answer', 'target'\]"):
        labelled.kind.task_fitness(labelled.fitness_context("math_l2", config["tasks"]["math_l2"], {"split": str(split)}))


def test_an_agreement_search_reads_no_answer_and_records_its_negative_kl(stages, tmp_path):
    """``loss: agreement`` with the language expert as math_l2's teacher, on prompts without answers:
    the teach stage reads only the prompts, two Adam steps run, each history fitness is the negative
    mean KL to the teacher (≤ 0), and no item is answered right or wrong."""
    fitness = {"kind": "gradient", "batch": 16, "loss": "agreement", "teachers": {"math_l2": "lang"}}
    config = unlabelled_run(stages[0], tmp_path, fitness)
    split = tmp_path / "data" / "search.parquet"
    write_splits(split_task("math_l2", config["tasks"]["math_l2"], config["seed"]),
                 {"search": split, "test": tmp_path / "data" / "test.parquet"})
    cfg = EvolveConfig.from_config(config, "grad")
    assert cfg.kind.needs(cfg.fitness) == ("split", "teacher") and not cfg.kind.reads_answers(cfg.fitness)
    files = {"split": str(split), "teacher": taught(config, str(split), tmp_path / "teachers" / "lang.parquet")}
    previous = run_generations(cfg, config, {"math_l2": files}, tmp_path, 2)
    history = pd.read_parquet(previous)
    assert (history[hist.fitness_column("math_l2")] < 0).all()
    assert np.isfinite(np.stack(history["gradient"].to_list())).all()
    assert len(pd.read_parquet(tmp_path / "gen_0" / "responses_0.parquet")) == 0
    assert cfg.fitness_label == "negative mean agreement on the minibatch, no labels"


def test_a_label_free_step_runs_its_minibatch_once(stages, tmp_path, monkeypatch):
    """The fitness hook's pass gives the step's fitness and, kept, its gradient: one pass of the
    loss per step, and the gradient the history records is the one a fresh pass gives."""
    import mergeflow.fitness.gradient as gradient_kind

    config = unlabelled_run(stages[0], tmp_path, {"kind": "gradient", "batch": 16, "loss": "entropy"})
    split = tmp_path / "data" / "search.parquet"
    write_splits(split_task("math_l2", config["tasks"]["math_l2"], config["seed"]),
                 {"search": split, "test": tmp_path / "data" / "test.parquet"})
    cfg = EvolveConfig.from_config(config, "grad")
    passes, task_loss_once = [], gradient_kind.task_loss
    monkeypatch.setattr(gradient_kind, "task_loss", lambda *a, **k: passes.append(k) or task_loss_once(*a, **k))
    history = pd.read_parquet(run_generations(cfg, config, {"math_l2": {"split": str(split)}}, tmp_path, 1))
    assert len(passes) == 1 and passes[0].get("backward", True)
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], {"split": str(split)}))
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        fresh, loss = genome_gradient(merger, tok, cfg.space(), np.asarray(history["genome"][0]), [fit],
                                      EvalSettings.from_config(config["evaluation"]), cfg.fitness)
    np.testing.assert_allclose(history["gradient"][0], fresh["math_l2"], rtol=1e-6, atol=1e-9)
    assert history[hist.fitness_column("math_l2")][0] == pytest.approx(-loss["math_l2"], rel=1e-6)


def test_a_scorer_with_no_output_to_teach_is_refused(stages, tmp_path):
    """lm-eval's loglikelihood tasks neither score choices nor generate: no teacher output."""
    config = stages[0]
    with pytest.raises(MergeflowError, match=r"scorer 'lm_eval_loglik' neither scores choices nor generates"):
        teach(config["models"]["lang"], stages[2]["split"], "lm_eval_loglik", " ", config["evaluation"],
              tmp_path / "out.parquet")


def test_teacher_outputs_from_another_split_are_named(stages, tmp_path):
    config = gradient_run(stages[0], loss="agreement", teachers={"math_l2": "lang"})
    cfg = EvolveConfig.from_config(config, "grad")
    other = tmp_path / "other.parquet"
    pd.read_parquet(stages[2]["split"]).iloc[:5].to_parquet(other)
    files = {**stages[2], "teacher": taught(config, str(other), tmp_path / "lang.parquet")}
    with pytest.raises(MergeflowError, match=r"teacher outputs '.*lang\.parquet' lack 35 item\(s\) of the search "
                                             r"split, e\.g\. 'math_l2-\d+': made from another split"):
        cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], files))


@pytest.mark.parametrize("fitness", [{"kind": "full"}, {"kind": "gradient", "batch": 16, "loss": "sigmoid"}])
def test_a_search_that_reads_answers_is_refused_on_prompts_without_them(stages, tmp_path, fitness):
    with pytest.raises(MergeflowError, match=r"runs\.grad\.evolve\.fitness: task 'math_l2''s search prompts have no "
                                             r"answers \(tasks\.math_l2\.search_source\)"):
        unlabelled_run(stages[0], tmp_path, fitness)


def test_a_label_free_loss_on_a_generative_objective_is_refused(stages):
    config = copy.deepcopy(stages[0])
    config["tasks"]["math_l2"]["scorer"] = "exact_match"
    with pytest.raises(MergeflowError, match=r"grad\.evolve\.fitness\.loss: the label-free loss 'entropy' scores "
                                             r"multiple choice only, and objective 'math_l2' is scored by 'exact_match'"):
        gradient_run(config, loss="entropy")
