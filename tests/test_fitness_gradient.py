"""The ``gradient`` fitness kind: Adam steps on the genome, each told the gradient of a training
loss on one minibatch (its ``extras``), and the last step as the search's result."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from mergeflow.config import upgrade_config, validate_config
from mergeflow.data import split_task, write_splits
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings, context_length
from mergeflow.evolve import history as hist
from mergeflow.evolve.resident import resident_merger
from mergeflow.evolve.search import replay
from mergeflow.evolve.stages import EvolveConfig, restore_optimizer
from mergeflow.figures import search_progress
from mergeflow.fitness.gradient import LABEL_FREE, genome_gradient, task_loss
from mergeflow.spaces import build_space
from stage_runs import run_generations, with_run


def gradient_run(config: dict, **fitness) -> dict:
    """The stages' config with a gradient run (Adam, one candidate per step) named ``grad``; a
    label-free loss's run checks no estimate."""
    label_free = fitness.get("loss") in LABEL_FREE
    return with_run(config, "grad", optimizer="Adam", population=1, generations=3,
                    fitness={"kind": "gradient", "batch": 16, **fitness}, **({"check_estimate": False} if label_free else {}))


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
    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    space, settings = cfg.space(), EvalSettings.from_config(config["evaluation"])
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2]))
    x, out = np.array([0.6, 0.2, 0.5, 0.4]), {}
    for dtype in ("float32", "bfloat16"):
        with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", dtype) as (merger, tok):
            out[dtype] = genome_gradient(merger, tok, space, x, [fit], settings, cfg.fitness)[0]["math_l2"]
    assert np.corrcoef(out["float32"], out["bfloat16"])[0, 1] > 0.95


def test_a_merge_not_affine_in_the_genome_is_refused_by_the_gradient(stages):
    config = gradient_run(stages[0])
    cfg = EvolveConfig.from_config(config, "grad")
    ties = build_space({**cfg.search_space, "method": "ties",
                        "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": 0.5}})
    fit = cfg.kind.task_fitness(cfg.fitness_context("math_l2", config["tasks"]["math_l2"], stages[2]))
    with resident_merger([cfg.base_path, *cfg.endpoint_paths.values()], "cpu", "float32") as (merger, tok):
        with pytest.raises(MergeflowError, match="not affine in its genome"):
            genome_gradient(merger, tok, ties, np.full(ties.dim, 0.5), [fit], EvalSettings.from_config(config["evaluation"]),
                            cfg.fitness)


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


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "CMA"}, r"grad\.evolve\.optimizer: fitness kind 'gradient' needs a gradient optimizer \(Adam\)"),
    ({"population": 4}, r"grad\.evolve\.population: fitness kind 'gradient' takes one candidate per generation"),
    ({"fitness": {"kind": "gradient", "batch": 50}}, r"grad\.evolve\.fitness\.batch: 50 items, more than task 'math_l2'"),
    ({"search_space": {"method": "ties", "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": 0.5}}},
     r"grad\.evolve\.search_space: fitness kind 'gradient' needs a parameter space whose merge is affine"),
    ({"learning_rate": 0}, r"evolve\.learning_rate: 0 is less than or equal to the minimum"),
    # the older spelling, under fitness, is read as the run's learning_rate
    ({"fitness": {"kind": "gradient", "batch": 16, "learning_rate": 0}},
     r"evolve\.learning_rate: 0 is less than or equal to the minimum"),
    ({"fitness": {"kind": "gradient", "loss": "hinge"}},
     r"fitness\.loss: 'hinge' is not one of \['sigmoid', 'cross_entropy', 'entropy'\]"),
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
