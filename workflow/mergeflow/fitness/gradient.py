"""``gradient`` fitness: a search that follows the gradient of the merge's loss in its genome.

On a parameter space each generation has one candidate (``population: 1``, ``optimizer: Adam``).
It answers a minibatch of the search split, ``batch`` items per task drawn without replacement
from seeded permutations of the split (one per pass over it), and its fitness is its accuracy on
them.
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

``agreement`` (:data:`TAUGHT`, DAM's) needs no answers either, but a teacher per objective
(``teachers``: task -> model, typically the expert whose own task it is): the merge is pulled
towards the teacher's outputs on the task's search prompts, which the teach stage scores once
(:func:`mergeflow.evaluate.teach`): for multiple choice the KL from the teacher's softmax over
the choices to the merge's, for generation the negative log-likelihood of the teacher's greedy
answer. The target task need not be read at all: the merge keeps each expert's skill on its own
ground.

A genome gene is not a model parameter, so the gradient is taken in two parts. One backward
pass gives the loss's gradient G with respect to the merged weights θ(x). Then, tensor by tensor,
the merge's masks are held as the candidate's merge made them (AdaMerging++'s move:
:class:`mergeflow.merge.methods.MaskedTerms`, the method's ``masked`` form in the registry): the
entries each model's sparsification keeps (TIES's and breadcrumbs' trims, DARE's and DELLA's drops
drawn with the candidate's seed, and their rescales) and, under sign consensus, the elected sign.
Held, the merge is smooth in each model's weight w_k and in lambda,
θ = base + λ Σ_k w_k u_k / D(w), with D = Σ_k w_k a_k under ``normalize`` (a_k: where model k
agrees with the elected sign; 1 without sign consensus) and 1 without: a ratio in the weights
with ``normalize`` (TIES's and DELLA's default), affine without. So ∂loss/∂x_j = Σ over tensors
and their weights and lambda p of ⟨G, ∂θ/∂p⟩ ∂p/∂x_j, where ∂p/∂x_j is what gene j moves p by,
read from the plans of the basis genomes (the space's own mapping). Task arithmetic is the case
with nothing to hold. The merges it takes: ``task_arithmetic``, ``ties``, ``dare_ties``,
``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, in a
``parameter`` space of one method. Its genes may be the weights and ``lambda`` only: densities,
``gamma`` and ``epsilon`` choose the masks and are discrete in effect (a density moves which
entries are kept, not how much), so they stay fixed (a value, not a range) and ``check`` refuses
them by key; search them with an evolutionary run, or run one gradient search per density. A
per-group method choice is categorical and refused too.

Beyond the merged model and G a step holds one tensor's held terms at a time (per model its
kept task vector and, with ``normalize`` under sign consensus, its agreement, then the slopes
∂θ/∂p: at most about 3K + 3 tensors of that tensor's size for K models), never a second model
(for a 7B model and three sources in float32: the sources, the merge and one G per objective,
28 GB each, plus activations). The job checks, along the first task's gradient, that the held
terms give the candidate's merge (the same trims, draws and signs) before it hands the gradient
on.

On a ``dfs`` space the search is a hybrid (:class:`mergeflow.evolve.search.Hybrid`): its layer
indicators are steps in the loss, so an evolutionary optimizer (any Nevergrad one, e.g. CMA, with
a population) moves them, while Adam moves its scales W. A generation's candidates share the
scales and differ in their paths; each answers the generation's minibatch and gives its loss
(told to the evolutionary optimizer) and its gradient in W, the path held (:func:`path_gradient`:
one backward pass with each hop's scale a leaf, no gradient of the weights); Adam steps once a
generation on their mean. The search ends on its last generation's best candidate on that
minibatch (``result: last``).

Adam's step is constant (``optimizer: Adam``) or falls along a half cosine to 0 over the run's
``budget`` steps (``optimizer: AdamCosine``, :class:`mergeflow.evolve.search.AdamCosine`): with a
constant step the last genome keeps moving by about the step with each minibatch's noise.

Every step costs ``batch`` items per task, like a multi-fidelity rung: 40 steps of 60 items are
the cheap search's 2,400 items. Where each candidate of an evolutionary search yields one noisy
number from its items, a step here yields one number per gene from the same items.

Keys (schema ``fitness_gradient``): ``batch``, ``loss``, ``temperature`` (the sigmoid's, in nats
of margin), ``seed``. Adam's step is the run's ``learning_rate`` (an optimizer setting, beside
``optimizer``). Each step's shard and history row hold the gradient (column ``gradient``, the
kind's ``extras``), and the run's result is its last step (``result: last``; the hybrid's: its
last generation's best).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mergeflow.data import PROMPT_COLUMNS, SPLIT_COLUMNS, read_split
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import context_length, differentiable_logliks, encode_requests, item_prompts
from mergeflow.evolve.search import GRADIENT_OPTIMIZERS
from mergeflow.fitness.base import FitnessContext, FitnessKind, ScoredCandidate, TaskFitness
from mergeflow.merge.assemble import ScaledHop
from mergeflow.merge.methods import SMOOTH_PARAMETERS, smooth_parameters
from mergeflow.merge.registry import MERGE_METHODS
from mergeflow.scorers import get_scorer
from mergeflow.spaces.dfs import DfsSpace
from mergeflow.spaces.parameter import space_methods

log = logging.getLogger(__name__)


def batch_items(task: str, fitness_cfg: dict, split: pd.DataFrame, generation: int) -> pd.DataFrame:
    """Generation ``generation``'s minibatch of ``split``, in split order: passes over the split
    in seeded orders (a new one per pass), each cut into ⌊n / batch⌋ batches (the n mod batch
    items left over sit that pass out)."""
    size = fitness_cfg["batch"]
    per_pass = len(split) // size
    epoch, at = divmod(generation, per_pass)
    order = np.random.default_rng([fitness_cfg["seed"], zlib.crc32(task.encode()), epoch]).permutation(len(split))
    return split.iloc[np.sort(order[at * size:(at + 1) * size])].reset_index(drop=True)


# The column of a minibatch that holds a teacher's output on each item (``loss: agreement``).
TEACHER_COLUMN = "teacher"


def with_teacher(split: pd.DataFrame, path: str) -> pd.DataFrame:
    """``split`` with its teacher's output on each item (the teach stage's file: choice
    log-likelihoods, or a greedy generation) in :data:`TEACHER_COLUMN`."""
    outputs = pd.read_parquet(path)
    output = next(c for c in outputs.columns if c != "item_id")
    by_item = dict(zip(outputs["item_id"], outputs[output]))
    missing = [item for item in split["item_id"] if item not in by_item]
    if missing:
        raise MergeflowError(f"teacher outputs {path!r} lack {len(missing)} item(s) of the search split, e.g. "
                             f"{missing[0]!r}: made from another split; delete the file to remake it")
    return split.assign(**{TEACHER_COLUMN: [by_item[item] for item in split["item_id"]]})


def task_fitness(ctx: FitnessContext) -> TaskFitness:
    """The step's minibatch; under a label-free loss read without its answers (only
    :data:`mergeflow.data.PROMPT_COLUMNS`, with the teacher's outputs under ``agreement``), its
    fitness the negative mean loss on it."""
    label_free = ctx.fitness["loss"] in LABEL_FREE
    split = read_split(ctx.files["split"], PROMPT_COLUMNS if label_free else SPLIT_COLUMNS)
    if ctx.fitness["loss"] in TAUGHT:
        split = with_teacher(split, ctx.files["teacher"])
    items = batch_items(ctx.task, ctx.fitness, split, ctx.generation)
    fit = TaskFitness.of(ctx, items)
    if label_free:
        fit.score = LabelFreeStep(ctx.fitness, fit)
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


def agreement_loss(scores: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ merge) between the softmaxes over the choices' scores: the teacher's (its
    scores, a tensor, in place of a gold index) and the merge's (DAM's agreement with an expert;
    ``temperature`` unused)."""
    target = torch.log_softmax(teacher.to(scores.dtype), 0)
    return (target.exp() * (target - torch.log_softmax(scores, 0))).sum()


# A multiple-choice item's training loss from its choices' scores (``fitness.loss``).
LOSSES = {"sigmoid": sigmoid_loss, "cross_entropy": cross_entropy_loss, "entropy": entropy_loss,
          "agreement": agreement_loss}
# The losses that read no gold answer: a search with one is label-free (its fitness is the
# negative mean loss on the minibatch, and only the split's prompts and choices are read).
LABEL_FREE = ("entropy", "agreement")
# The label-free losses that pull each objective's merge towards a teacher model's outputs on its
# prompts (``fitness.teachers``: objective -> model), read from the teach stage's file: for
# multiple choice the KL from the teacher's softmax over the choices, for generation the
# negative log-likelihood of the teacher's greedy answer (sequence-level distillation).
TAUGHT = ("agreement",)
# The label-free losses that score multiple choice only.
CHOICES_ONLY = ("entropy",)


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
    loss_name = fitness_cfg["loss"]
    if loss_name in CHOICES_ONLY and not how.choices:
        raise MergeflowError(f"task {fit.task!r}: loss {loss_name!r} scores multiple choice only, not "
                             f"scorer {fit.scorer!r}")
    if how.choices:
        options = [[str(c) for c in cs] for cs in items["choices"]]
        if loss_name in TAUGHT:  # the teacher's scores of the choices (normalised below, as the merge's are)
            golds = [torch.tensor(np.asarray(t, dtype=np.float64)) for t in items[TEACHER_COLUMN]]
        else:
            golds = [-1] * n if loss_name in LABEL_FREE else [int(a) for a in items["answer"]]
    else:  # the gold answer's, or the teacher's greedy answer's, negative log-likelihood
        options = [[str(t)] for t in items[TEACHER_COLUMN if loss_name in TAUGHT else "target"]]
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
            gold = golds[i]
            if how.length_normalised:
                lengths = torch.tensor([len(c) for c in options[i]], dtype=scores.dtype, device=scores.device)
                scores = scores / lengths
                if loss_name in TAUGHT:
                    gold = gold / lengths.to(gold.dtype)
            losses.append(choice_loss(scores, gold, temperature) if how.choices else -scores[0])
        loss = torch.stack(losses).sum() / n
        if item_losses is not None:
            item_losses += [float(v) for v in torch.stack(losses).detach()]
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total


def loss_gradient(model, tokenizer, fit: TaskFitness, settings, fitness_cfg: dict,
                  item_losses: list[float] | None = None) -> tuple[float, dict]:
    """One forward and backward pass of the task's training loss over its items: the loss, and its
    gradient in what a step moves. For a layer path (its hops :class:`ScaledHop`) that is each
    hop's scale (hop index -> float; the weights take no gradient); for a merge, the merged
    weights (parameter name -> tensor: the gradients themselves, not copies, which the model lets
    go of). The model is left without gradients."""
    max_length = context_length(model, settings)
    hops = [module for module in model.modules() if isinstance(module, ScaledHop)]
    if hops:
        leaves = [hop.leaf() for hop in hops]
        loss = task_loss(model, tokenizer, fit, settings, max_length, fitness_cfg, item_losses=item_losses)
        return loss, {k: float(leaf.grad) for k, leaf in enumerate(leaves) if leaf.grad is not None}
    params = dict(model.named_parameters())
    model.requires_grad_(True)
    try:
        model.zero_grad(set_to_none=True)
        loss = task_loss(model, tokenizer, fit, settings, max_length, fitness_cfg, item_losses=item_losses)
        return loss, {n: p.grad.detach() for n, p in params.items() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


@dataclass
class LabelFreeStep:
    """A label-free step's fitness hook (``TaskFitness.score``), which runs the step's one pass over
    its minibatch: the items' losses give the fitness (their negative mean, and its sd), and the
    same backward pass the loss's gradient, kept for the kind's extras hook (:func:`genome_gradient`,
    :func:`path_gradient`) to take (:func:`take_pass`), so the minibatch is not run a second time."""

    fitness_cfg: dict
    fit: TaskFitness
    kept: tuple | None = None  # (the model it ran, the loss, its gradient)

    def __call__(self, model, tokenizer, settings) -> tuple[float, float]:
        losses: list[float] = []
        loss, gradient = loss_gradient(model, tokenizer, self.fit, settings, self.fitness_cfg, item_losses=losses)
        self.kept = (model, loss, gradient)
        sd = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
        return -float(np.mean(losses)), sd


def take_pass(fit: TaskFitness, model) -> tuple[float, dict] | None:
    """The loss and gradient ``fit``'s label-free fitness hook kept from its pass over ``model``
    (which the fitness job scored just before its extras), handed over once; None where there is none."""
    step = fit.score
    if not isinstance(step, LabelFreeStep) or step.kept is None:
        return None
    (ran, loss, gradient), step.kept = step.kept, None
    return (loss, gradient) if ran is model else None


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
    grads: dict[str, dict[str, torch.Tensor]] = {}
    losses: dict[str, float] = {}
    for fit in tasks:
        losses[fit.task], grads[fit.task] = (take_pass(fit, model)
                                             or loss_gradient(model, tokenizer, fit, settings, fitness_cfg))
    # ∂loss/∂x_j = Σ over tensors and their smooth parameters p (each model's weight, lambda) of
    # <G, ∂θ/∂p> ∂p/∂x_j, the masks held at x (MaskedTerms): one tensor's terms at a time, never a
    # second model. ∂p/∂x_j is what gene j moves p by, read from the plans of the basis genomes
    # (the space's own mapping; a range gene is linear). The terms at x must give the merger's θ(x)
    # (the same trims, draws and elected signs), checked along the first task's gradient.
    here = merger.plan(recipe)
    zero = merger.plan(space.to_recipe(np.zeros(space.dim), seed=seed))
    basis = [merger.plan(space.to_recipe(np.eye(space.dim)[k], seed=seed)) for k in range(space.dim)]
    at = {plan.name: i for i, plan in enumerate(here.tensors)}
    probe = grads[tasks[0].task]
    out = {fit.task: np.zeros(space.dim) for fit in tasks}
    missed = scale = 0.0
    for n, p in params.items():  # in the model's order, as each gene's sum has always added its terms
        i = at[n]
        origin = np.array(_smooth(zero.tensors[i]))
        moves = [(k, np.array(_smooth(plan.tensors[i])) - origin) for k, plan in enumerate(basis)]
        moves = [(k, move) for k, move in moves if np.any(move)]
        if not moves or not any(n in g for g in grads.values()):
            continue
        terms = merger.masked_terms(here.tensors[i])
        weight_slopes, lambda_slope = terms.slopes()
        if n in probe:  # θ at the held weights is base + λ ∂θ/∂λ, without summing the terms again
            g, held = probe[n], torch.add(terms.base, lambda_slope, alpha=terms.lam).to(p.dtype)
            missed += _dot(g.abs(), (held - p.detach()).abs())
            scale += _dot(g.abs(), held.abs() + p.detach().abs())
        slopes = [*weight_slopes, lambda_slope]
        for task, g in grads.items():
            if n in g:
                dots = np.array([_dot(g[n], slope) for slope in slopes])
                for k, move in moves:
                    out[task][k] += float(dots @ move)
        del terms, weight_slopes, lambda_slope, slopes
    worst = missed / (scale + 1e-30)
    # the terms sum in another order than the merge; a 16-bit model rounds both the same way but
    # where they straddle a rounding boundary, which the compute dtype's eps bounds as well
    tolerance = 16 * torch.finfo(merger.compute_dtype).eps
    log.debug("held masks against the merge: relative difference %.3g", worst)
    if not math.isfinite(worst) or worst > tolerance:
        raise MergeflowError(f"fitness kind 'gradient': the merge with its masks held is not the candidate's merge "
                             f"(relative difference {worst:.2g})")
    return out, losses


def _smooth(tensor_plan) -> list[float]:
    """A tensor's smooth parameters, as the gradient orders them: each model's weight, then lambda."""
    weights, lam = smooth_parameters(tensor_plan.model_params, tensor_plan.params)
    return [*weights, lam]


def path_gradient(assembler, tokenizer, space: DfsSpace, genome: np.ndarray, tasks: list[TaskFitness], settings,
                  fitness_cfg: dict) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per task, the gradient of its training loss in a data-flow space's scale genes W (0 in its
    indicator genes), the path held, and the loss. A W gene moves only the scales of the hops
    entering layer j from layer i, never the path, and a hop's scale multiplies its input
    (:class:`mergeflow.merge.assemble.ScaledHop`), so one backward pass with the scales as leaves
    gives ∂loss/∂s_k, and ∂loss/∂W_ij = (max − min) Σ over those hops of ∂loss/∂s_k. The weights
    take no gradient: the step holds only the activations."""
    sequence, _ = space.decode(genome)
    model = assembler.merge(space.to_recipe(genome))
    out, losses = {}, {}
    for fit in tasks:
        losses[fit.task], scales = take_pass(fit, model) or loss_gradient(model, tokenizer, fit, settings, fitness_cfg)
        gradient = np.zeros(space.dim)
        for k in range(1, len(sequence)):
            if k in scales:
                gradient[space.slots + sequence[k - 1] * space.layers + sequence[k]] += (
                    scales[k] * (space.scale.high - space.scale.low))
        out[fit.task] = gradient
    return out, losses


def check(config: dict, run: str) -> None:
    """One loss; a dfs space with an evolutionary optimizer (the hybrid), or Adam on a parameter
    space (:func:`check_parameter_space`); batches that fit every objective's search split; a
    label-free loss with no accuracy to check the search's fitness against, entropy only on
    multiple-choice objectives, agreement with a teacher for each (:func:`check_teachers`)."""
    evolve = config["runs"][run]["evolve"]
    where = f"config: runs.{run}.evolve"
    space = evolve["search_space"]
    if evolve["multi_objective"]:
        raise MergeflowError(f"{where}.multi_objective: fitness kind 'gradient' follows one loss, the objectives' "
                             "weighted sum")
    if space.get("kind") == "dfs":
        if evolve["optimizer"] in GRADIENT_OPTIMIZERS:
            raise MergeflowError(f"{where}.optimizer: fitness kind 'gradient' on a dfs space is a hybrid: its layer "
                                 f"indicators (steps in the loss) need an evolutionary optimizer (a Nevergrad one, "
                                 f"e.g. CMA) while the gradient moves its scales, not {evolve['optimizer']!r}")
    else:
        check_parameter_space(evolve, where)
        GRADIENT_OPTIMIZERS[evolve["optimizer"]].check(evolve, where)
    for task in evolve["objectives"]:
        size = config["tasks"][task]["splits"]["search"]
        if evolve["fitness"]["batch"] > size:
            raise MergeflowError(f"{where}.fitness.batch: {evolve['fitness']['batch']} items, more than task {task!r}'s "
                                 f"search split ({size}, tasks.{task}.splits.search)")
    loss = evolve["fitness"]["loss"]
    if loss in LABEL_FREE and evolve["check_estimate"]:
        raise MergeflowError(f"{where}.check_estimate: a search on the label-free loss {loss!r} (fitness.loss) has "
                             "no accuracy estimate to check against the search split's answers; set it false")
    if loss in CHOICES_ONLY:
        for task in evolve["objectives"]:
            scorer = config["tasks"][task]["scorer"]
            if not get_scorer(scorer).choices:
                raise MergeflowError(f"{where}.fitness.loss: the label-free loss {loss!r} scores multiple choice only, "
                                     f"and objective {task!r} is scored by {scorer!r} (tasks.{task}.scorer)")
    check_teachers(config, evolve, where)


def check_teachers(config: dict, evolve: dict, where: str) -> None:
    """A taught loss (:data:`TAUGHT`) names a teacher model for each objective, and only then."""
    loss, teachers = evolve["fitness"]["loss"], evolve["fitness"].get("teachers")
    if loss not in TAUGHT:
        if teachers:
            raise MergeflowError(f"{where}.fitness.teachers: only a loss that agrees with teachers "
                                 f"({', '.join(TAUGHT)}) reads them, not loss {loss!r}")
        return
    for task in evolve["objectives"]:
        if task not in (teachers or {}):
            raise MergeflowError(f"{where}.fitness.teachers: loss {loss!r} needs a teacher model for objective "
                                 f"{task!r}, the model whose outputs on its prompts the merge should agree with "
                                 f"(e.g. teachers: {{{task}: <an endpoint>}})")
    for task, model in teachers.items():
        if task not in evolve["objectives"]:
            raise MergeflowError(f"{where}.fitness.teachers.{task}: not one of the run's objectives "
                                 f"({', '.join(evolve['objectives'])})")
        if model not in config["models"]:
            raise MergeflowError(f"{where}.fitness.teachers.{task}: {model!r} is not a model of the config "
                                 f"({', '.join(config['models'])})")
        how = get_scorer(config["tasks"][task]["scorer"])
        if not (how.choices or how.generates):
            raise MergeflowError(f"{where}.fitness.teachers.{task}: task {task!r} is scored by "
                                 f"{config['tasks'][task]['scorer']!r}, which gives a teacher no output to agree "
                                 "with (agreement takes multiple choice or generation)")


def check_parameter_space(evolve: dict, where: str) -> None:
    """Adam moving one candidate through a parameter space of one held-mask method, whose searched
    genes are weights and lambda."""
    if evolve["optimizer"] not in GRADIENT_OPTIMIZERS:
        raise MergeflowError(f"{where}.optimizer: fitness kind 'gradient' needs a gradient optimizer "
                             f"({', '.join(GRADIENT_OPTIMIZERS)}), not {evolve['optimizer']!r} (an evolutionary "
                             "optimizer takes a dfs space's layer indicators beside the gradient: the hybrid)")
    if evolve["population"] != 1:
        raise MergeflowError(f"{where}.population: fitness kind 'gradient' takes one candidate per generation "
                             f"(population 1), not {evolve['population']}")
    space = evolve["search_space"]
    if space.get("kind", "parameter") != "parameter":
        raise MergeflowError(f"{where}.search_space.kind: fitness kind 'gradient' needs a parameter space (or a dfs "
                             f"space, its scales), not {space['kind']!r}")
    methods = space_methods(space)
    if len(methods) > 1:
        raise MergeflowError(f"{where}.search_space.method: fitness kind 'gradient' takes one method; a choice "
                             f"among {methods} is a categorical gene, with no gradient")
    method = MERGE_METHODS.get(methods[0]) if methods else None  # a missing or unknown one: the space's check
    if method is not None and method.masked is None:
        held = [name for name, known in MERGE_METHODS.items() if known.masked is not None]
        raise MergeflowError(f"{where}.search_space.method: fitness kind 'gradient' needs a merge that is smooth in "
                             f"its weights once its masks are held ({', '.join(held)}), not {methods[0]!r}")
    for level, key in (("model", "parameters"), ("method", "method_parameters")):
        for name, value in space.get(key, {}).items():
            if isinstance(value, dict) and name not in SMOOTH_PARAMETERS[level]:
                raise MergeflowError(f"{where}.search_space.{key}.{name}: fitness kind 'gradient' moves only "
                                     f"{' and '.join(SMOOTH_PARAMETERS[level])}; {name} chooses the masks (which "
                                     f"entries are kept): give it a value, or search it with an evolutionary run")


# The column of a step's shard and history row that the gradient optimizer is told.
GRADIENT_COLUMN = "gradient"


def extras(fitness_cfg: dict, scored: ScoredCandidate) -> dict[str, dict[str, Any]]:
    """Per task, the gradient of its training loss with respect to the genome (NaN for a
    candidate with a problem: the optimizer keeps its step and tries the next batch)."""
    if scored.result.problem:
        for fit in scored.tasks:  # let go of what a label-free hook kept from this candidate's pass
            take_pass(fit, None)
        return {fit.task: {GRADIENT_COLUMN: [float("nan")] * scored.space.dim} for fit in scored.tasks}
    if isinstance(scored.space, DfsSpace):
        gradient, losses = path_gradient(scored.merger, scored.tokenizer, scored.space, scored.genome, scored.tasks,
                                         scored.settings, fitness_cfg)
    else:
        gradient, losses = genome_gradient(scored.merger, scored.tokenizer, scored.space, scored.genome,
                                           scored.tasks, scored.settings, fitness_cfg, scored.seed)
    log.info("training loss %s", {t: round(v, 4) for t, v in losses.items()})
    return {task: {GRADIENT_COLUMN: g.tolist()} for task, g in gradient.items()}


KIND = FitnessKind("gradient",
                   needs=lambda fitness_cfg: ("split", "teacher") if fitness_cfg["loss"] in TAUGHT else ("split",),
                   estimates=lambda fitness_cfg, split_size: fitness_cfg["loss"] not in LABEL_FREE,
                   task_fitness=task_fitness, check=check, extra_columns=(GRADIENT_COLUMN,), extras=extras,
                   result="last", seeded_keys=(("seed",),),
                   gradient_genes=lambda space: tuple(space.scale_genes()) if isinstance(space, DfsSpace) else (),
                   batch_invariant=False,  # its float sums follow the evaluation's batches
                   reads_answers=lambda fitness_cfg: fitness_cfg["loss"] not in LABEL_FREE,
                   fitness_label=lambda fitness_cfg: (f"negative mean {fitness_cfg['loss']} on the minibatch, no labels"
                                                      if fitness_cfg["loss"] in LABEL_FREE else None))
