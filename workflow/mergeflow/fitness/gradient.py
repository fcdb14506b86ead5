"""``gradient`` fitness: a search that follows the gradient of the merge's loss in its genome.

Each generation has one candidate (``population: 1``, ``optimizer: Adam``). It answers a
minibatch of the search split, ``batch`` items per task drawn without replacement from seeded
permutations of the split (one per pass over it), and its fitness is its accuracy on them.
The same items also give the gradient of a training loss with respect to the genome (``loss``,
:data:`LOSSES`). For multiple choice (choices' log-likelihoods per character with
``mc_loglik_norm``) it is by default ``sigmoid``: σ(−margin / temperature) per item, where the
margin is the gold choice's log-likelihood less the log-sum-exp of the others' (an item is
right when it is positive). That is a smoothed error rate: items near the decision move it,
items answered surely (right or wrong) barely do. ``cross_entropy`` over the choices also
pulls hard on items the merge gets confidently wrong, and can lower the loss while the
accuracy falls: on two zoos it chose merges below the math expert (bench/results/search_sweep.txt).
For generation the loss is the gold answer's negative log-likelihood. Adam, told the gradient,
takes the next step (:class:`mergeflow.evolve.search.Adam`).

``entropy`` (:data:`LABEL_FREE`) needs no answers: AdaMerging's loss, the entropy of the
softmax over the choices' scores, the merge's own predictive distribution (multiple choice
only). The minibatch is then read without its answers (the split's ``item_id``, ``prompt`` and
``choices``; a task's ``search_source`` gives prompts that have none), its fitness is the
negative mean entropy with its standard error (no accuracy to estimate: ``check_estimate`` is
refused), and figures say so (``fitness_label``). On the zoo it steers the merge to confident
and wrong answers (bench/results/label_free.txt).

A genome gene is not a model parameter, so the gradient is taken in two parts. One backward
pass gives the loss's gradient G with respect to the merged weights θ(x). The space's merge
must be affine in the genome (task arithmetic: θ(x) = θ(0) + Σ_k x_k (θ(e_k) − θ(0))), so
∂loss/∂x_k = ⟨G, θ(e_k) − θ(0)⟩, from the plans of dim + 1 basis merges read tensor by tensor
(:meth:`mergeflow.merge.InMemoryMerger.merged_tensor`): beyond the merged model and G a step
holds one tensor of θ(0) and one of θ(e_k) at a time, never a second model (for a 7B model and
three sources in float32: the sources, the merge and one G per objective, 28 GB each, plus
activations). The job checks the affine form along the gradient before it hands it on.

Every step costs ``batch`` items per task, like a multi-fidelity rung: 40 steps of 60 items are
the cheap search's 2,400 items. Where each candidate of an evolutionary search yields one noisy
number from its items, a step here yields one number per gene from the same items.

Keys (schema ``fitness_gradient``): ``batch``, ``loss``, ``temperature`` (the sigmoid's, in nats
of margin), ``seed``. Adam's step is the run's ``learning_rate`` (an optimizer setting, beside
``optimizer``). Each step's shard and history row hold the gradient (column ``gradient``, the
kind's ``extras``), and the run's result is its last step (``result: last``).
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from mergeflow.data import PROMPT_COLUMNS, SPLIT_COLUMNS, read_split
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import context_length, differentiable_logliks, encode_requests, item_prompts
from mergeflow.evolve.search import GRADIENT_OPTIMIZERS
from mergeflow.fitness.base import FitnessContext, FitnessKind, ScoredCandidate, TaskFitness
from mergeflow.scorers import get_scorer
from mergeflow.spaces.parameter import space_methods

log = logging.getLogger(__name__)

# Merges the genome gradient trusts: those whose merged weights are affine in the weights.
AFFINE_METHODS = ("task_arithmetic",)


def batch_items(task: str, fitness_cfg: dict, split: pd.DataFrame, generation: int) -> pd.DataFrame:
    """Generation ``generation``'s minibatch of ``split``, in split order: passes over the split
    in seeded orders (a new one per pass), each cut into ⌊n / batch⌋ batches (the n mod batch
    items left over sit that pass out)."""
    size = fitness_cfg["batch"]
    per_pass = len(split) // size
    epoch, at = divmod(generation, per_pass)
    order = np.random.default_rng([fitness_cfg["seed"], zlib.crc32(task.encode()), epoch]).permutation(len(split))
    return split.iloc[np.sort(order[at * size:(at + 1) * size])].reset_index(drop=True)


def task_fitness(ctx: FitnessContext) -> TaskFitness:
    """The step's minibatch; under a label-free loss read without its answers (only
    :data:`mergeflow.data.PROMPT_COLUMNS`), its fitness the negative mean loss on it."""
    label_free = ctx.fitness["loss"] in LABEL_FREE
    split = read_split(ctx.files["split"], PROMPT_COLUMNS if label_free else SPLIT_COLUMNS)
    items = batch_items(ctx.task, ctx.fitness, split, ctx.generation)
    fit = TaskFitness.of(ctx, items)
    if label_free:
        fit.score = functools.partial(label_free_fitness, ctx.fitness, fit)
    return fit


def sigmoid_loss(scores: torch.Tensor, gold: int, temperature: float) -> torch.Tensor:
    """σ(−margin / temperature), the margin being the gold choice's score less the log-sum-exp of
    the others' (an item with no other choice has no error to lose)."""
    others = torch.cat([scores[:gold], scores[gold + 1:]])
    return torch.sigmoid((torch.logsumexp(others, 0) - scores[gold]) / temperature)


def cross_entropy_loss(scores: torch.Tensor, gold: int, temperature: float) -> torch.Tensor:
    """The cross-entropy of the softmax over the choices' scores (``temperature`` unused)."""
    return torch.logsumexp(scores, 0) - scores[gold]


def entropy_loss(scores: torch.Tensor, gold: int, temperature: float) -> torch.Tensor:
    """The entropy of the softmax over the choices' scores, the merge's predictive distribution
    (AdaMerging's label-free loss; ``gold`` and ``temperature`` unused)."""
    logp = torch.log_softmax(scores, 0)
    return -(logp.exp() * logp).sum()


# A multiple-choice item's training loss from its choices' scores (``fitness.loss``).
LOSSES = {"sigmoid": sigmoid_loss, "cross_entropy": cross_entropy_loss, "entropy": entropy_loss}
# The losses that read no gold answer: a search with one is label-free (its fitness is the
# negative mean loss on the minibatch, and only the split's prompts and choices are read).
LABEL_FREE = ("entropy",)


def task_loss(model, tokenizer, fit: TaskFitness, settings, max_length: int, fitness_cfg: dict,
              backward: bool = True, item_losses: list[float] | None = None) -> float:
    """The task's mean training loss over its items (``fitness_cfg``'s ``loss`` and ``temperature``
    for multiple choice; the gold answer's negative log-likelihood for generation); with
    ``backward``, its gradient is also accumulated into the model's parameters; each item's loss
    is appended to ``item_losses`` where one is given. Items go in chunks of about
    ``settings.batch_size`` requests. A label-free loss (:data:`LABEL_FREE`) reads no answer."""
    how = get_scorer(fit.scorer)
    choice_loss, temperature = LOSSES[fitness_cfg["loss"]], fitness_cfg["temperature"]
    items, n = fit.items, len(fit.items)
    # the items as the evaluator presents them (evaluate_items), chat template included
    prompts, delimiter, settings = item_prompts(tokenizer, items, fit.delimiter, settings.for_task(fit.chat))
    label_free = fitness_cfg["loss"] in LABEL_FREE
    if how.choices:
        options = [[str(c) for c in cs] for cs in items["choices"]]
        golds = [-1] * n if label_free else [int(a) for a in items["answer"]]
    elif label_free:
        raise MergeflowError(f"task {fit.task!r}: loss {fitness_cfg['loss']!r} scores multiple choice only, not "
                             f"scorer {fit.scorer!r}")
    else:
        options = [[str(t)] for t in items["target"]]
        golds = [0] * n
    total = 0.0
    per_item = max(len(o) for o in options)
    step = max(1, settings.batch_size // per_item)
    for lo in range(0, n, step):
        chunk = range(lo, min(n, lo + step))
        pairs = [(prompts[i], delimiter + c) for i in chunk for c in options[i]]
        ll = differentiable_logliks(model, encode_requests(tokenizer, pairs, settings), max_length)
        losses, at = [], 0
        for i in chunk:
            scores = ll[at:at + len(options[i])]
            at += len(options[i])
            if how.length_normalised:
                scores = scores / torch.tensor([len(c) for c in options[i]], dtype=scores.dtype, device=scores.device)
            losses.append(choice_loss(scores, golds[i], temperature) if how.choices else -scores[0])
        loss = torch.stack(losses).sum() / n
        if item_losses is not None:
            item_losses += [float(v) for v in torch.stack(losses).detach()]
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total


def label_free_fitness(fitness_cfg: dict, fit: TaskFitness, model, tokenizer, settings) -> tuple[float, float]:
    """A label-free step's fitness on its minibatch: the negative mean of the items' losses, and
    its sd."""
    losses: list[float] = []
    with torch.no_grad():
        task_loss(model, tokenizer, fit, settings, context_length(model, settings), fitness_cfg, backward=False,
                  item_losses=losses)
    sd = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
    return -float(np.mean(losses)), sd


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b: float32 products (16-bit tensors are widened first) summed in float64, one temporary
    of the tensor's size rather than float64 copies (for a 49k-word float32 embedding, 113 MB
    instead of 680 MB)."""
    return float(torch.sum(a.float() * b.float(), dtype=torch.float64))


def genome_gradient(merger, tokenizer, space, genome: np.ndarray, tasks: list[TaskFitness], settings,
                    fitness_cfg: dict, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per task, the gradient of its training loss with respect to the genome at ``genome``, and
    the loss. Leaves the merger's model holding the merge of ``genome`` with no gradients."""
    genome = np.asarray(genome, dtype=np.float64)
    recipe = space.to_recipe(genome, seed=seed)
    # the fitness job has just merged this candidate to score it: no second merge
    model = merger.model if merger.merged == recipe else merger.merge(recipe)
    params = dict(model.named_parameters())
    max_length = context_length(model, settings)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    losses: dict[str, float] = {}
    model.requires_grad_(True)
    try:
        for fit in tasks:
            model.zero_grad(set_to_none=True)
            losses[fit.task] = task_loss(model, tokenizer, fit, settings, max_length, fitness_cfg)
            # the gradient tensors themselves, not copies: the next zero_grad lets go of them, not this dict
            grads[fit.task] = {n: p.grad.detach() for n, p in params.items() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    # ∂loss/∂x_k = <G, θ(e_k) - θ(0)>, taken tensor by tensor from the basis merges' plans: one
    # tensor of θ(0) and one of θ(e_k) at a time, never a second model; the merger's model keeps
    # θ(x), against which the affine form is checked along the first task's gradient:
    # <G, θ(x) - θ(0)> must be Σ_k x_k <G, θ(e_k) - θ(0)>.
    zero = merger.plan(space.to_recipe(np.zeros(space.dim), seed=seed))
    basis = [merger.plan(space.to_recipe(np.eye(space.dim)[k], seed=seed)) for k in range(space.dim)]
    at = {plan.name: i for i, plan in enumerate(zero.tensors)}
    probe, first = grads[tasks[0].task], tasks[0].task
    out = {fit.task: np.zeros(space.dim) for fit in tasks}
    moved = scale = 0.0
    for n, p in params.items():  # the model's order: each gene's sum adds its terms as before
        origin = merger.merged_tensor(zero.tensors[at[n]]).clone()
        for k, plan in enumerate(basis):
            direction = merger.merged_tensor(plan.tensors[at[n]]) - origin
            if not torch.any(direction):
                continue
            for task, g in grads.items():
                if n in g:
                    out[task][k] += _dot(g[n], direction)
        if n in probe:
            g, now = probe[n], p.detach()
            moved += _dot(g, now - origin)
            scale += _dot(g.abs(), now.abs() + origin.abs())
    worst = abs(moved - float(genome @ out[first])) / (scale + 1e-30)
    # each of the dim + 2 merges rounds on its own (in a 16-bit merge, coarsely)
    tolerance = 4 * (space.dim + 2) * torch.finfo(next(iter(params.values())).dtype).eps
    if not math.isfinite(worst) or worst > tolerance:
        raise MergeflowError(f"fitness kind 'gradient': the search space's merge is not affine in its genome (relative "
                             f"difference {worst:.2g}); it needs a {' or '.join(AFFINE_METHODS)} space")
    return out, losses


def check(config: dict, run: str) -> None:
    """One candidate per generation, a gradient optimizer, a task-arithmetic parameter space and
    batches that fit every objective's search split; a label-free loss only on multiple-choice
    objectives, and with no accuracy to check the search's fitness against."""
    evolve = config["runs"][run]["evolve"]
    where = f"config: runs.{run}.evolve"
    if evolve["optimizer"] not in GRADIENT_OPTIMIZERS:
        raise MergeflowError(f"{where}.optimizer: fitness kind 'gradient' needs a gradient optimizer "
                             f"({', '.join(GRADIENT_OPTIMIZERS)}), not {evolve['optimizer']!r}")
    if evolve["population"] != 1:
        raise MergeflowError(f"{where}.population: fitness kind 'gradient' takes one candidate per generation "
                             f"(population 1), not {evolve['population']}")
    if evolve["multi_objective"]:
        raise MergeflowError(f"{where}.multi_objective: fitness kind 'gradient' follows one loss, the objectives' "
                             "weighted sum")
    space = evolve["search_space"]
    methods = space_methods(space)
    if space.get("kind", "parameter") != "parameter" or any(m not in AFFINE_METHODS for m in methods):
        raise MergeflowError(f"{where}.search_space: fitness kind 'gradient' needs a parameter space whose merge is "
                             f"affine in the genome (method {' or '.join(AFFINE_METHODS)}), not "
                             f"{space.get('kind', 'parameter')} / {methods}")
    for task in evolve["objectives"]:
        size = config["tasks"][task]["splits"]["search"]
        if evolve["fitness"]["batch"] > size:
            raise MergeflowError(f"{where}.fitness.batch: {evolve['fitness']['batch']} items, more than task {task!r}'s "
                                 f"search split ({size}, tasks.{task}.splits.search)")
    loss = evolve["fitness"]["loss"]
    if loss in LABEL_FREE:
        if evolve["check_estimate"]:
            raise MergeflowError(f"{where}.check_estimate: a search on the label-free loss {loss!r} (fitness.loss) has "
                                 "no accuracy estimate to check against the search split's answers; set it false")
        for task in evolve["objectives"]:
            scorer = config["tasks"][task]["scorer"]
            if not get_scorer(scorer).choices:
                raise MergeflowError(f"{where}.fitness.loss: the label-free loss {loss!r} scores multiple choice only, "
                                     f"and objective {task!r} is scored by {scorer!r} (tasks.{task}.scorer)")


# The column of a step's shard and history row that the gradient optimizer is told.
GRADIENT_COLUMN = "gradient"


def extras(fitness_cfg: dict, scored: ScoredCandidate) -> dict[str, dict[str, Any]]:
    """Per task, the gradient of its training loss with respect to the genome (NaN for a
    candidate with a problem: the optimizer keeps its step and tries the next batch)."""
    if scored.result.problem:
        return {fit.task: {GRADIENT_COLUMN: [float("nan")] * scored.space.dim} for fit in scored.tasks}
    gradient, losses = genome_gradient(scored.merger, scored.tokenizer, scored.space, scored.genome, scored.tasks,
                                       scored.settings, fitness_cfg, scored.seed)
    log.info("training loss %s", {t: round(v, 4) for t, v in losses.items()})
    return {task: {GRADIENT_COLUMN: g.tolist()} for task, g in gradient.items()}


KIND = FitnessKind("gradient", needs=lambda fitness_cfg: ("split",),
                   estimates=lambda fitness_cfg, split_size: fitness_cfg["loss"] not in LABEL_FREE,
                   task_fitness=task_fitness, check=check, extra_columns=(GRADIENT_COLUMN,), extras=extras,
                   result="last", seeded_keys=(("seed",),),
                   batch_invariant=False,  # its float sums follow the evaluation's batches
                   reads_answers=lambda fitness_cfg: fitness_cfg["loss"] not in LABEL_FREE,
                   fitness_label=lambda fitness_cfg: (f"negative mean {fitness_cfg['loss']} on the minibatch, no labels"
                                                      if fitness_cfg["loss"] in LABEL_FREE else None))
