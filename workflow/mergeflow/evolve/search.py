"""The optimizer side of the search: Nevergrad (or Adam) ask / tell across process boundaries.

The evolution loop is a static DAG of jobs (``ask(g)``, ``evaluate(g, shard)``, ``tell(g)``), so
the optimizer lives on disk between them. ``asked.pkl`` holds the optimizer together with the
candidates it just proposed (tell needs the very same candidate objects); ``optimizer.pkl`` the
state after tell. Both are caches: ``history.parquet`` — every genome and loss ever told — is
the source of truth, and :func:`replay` rebuilds the optimizer from it alone.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.evolve import history as hist


@dataclass(frozen=True)
class SearchSettings:
    """What defines an optimizer's trajectory: its name, the genome size, population and seed.

    The number of generations is deliberately absent: the optimizer is told a nominal ``budget``
    (default 100 generations' worth) that does not change when a finished search is extended
    with more generations, so the earlier ones stay as they were.
    """

    optimizer: str
    dim: int
    population: int
    seed: int
    objectives: int = 1
    budget: int | None = None
    init: tuple[float, ...] | None = None  # the genome the search starts from (default: the centre)
    sigma: float | None = None  # the genome's mutation scale (Nevergrad's parametrization sigma)
    learning_rate: float | None = None  # a gradient optimizer's step size, in genome units
    # the genes Adam moves beside a Nevergrad optimizer (:class:`Hybrid`); empty: none
    smooth: tuple[int, ...] = ()


@dataclass
class Step:
    """A gradient optimizer's candidate: the genome it asks to be scored (``value``, like a
    Nevergrad candidate's)."""

    value: np.ndarray


class Adam:
    """Adam on the genome, projected onto [0, 1]^dim: one candidate per generation, told its
    loss's gradient (``fitness.kind: gradient``). Plain float64 NumPy, so a replay of the
    history's gradients gives the same genomes bit for bit."""

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, settings: SearchSettings):
        if settings.init is None:
            self.x = np.full(settings.dim, 0.5)
        else:
            self.x = np.asarray(settings.init, dtype=np.float64).copy()
        self.lr = float(settings.learning_rate)
        self.m = np.zeros(settings.dim)
        self.v = np.zeros(settings.dim)
        self.steps = 0

    def ask(self) -> Step:
        return Step(self.x.copy())

    def tell(self, candidate: Step, loss: float, gradient: np.ndarray | None = None) -> None:
        if gradient is None:
            raise MergeflowError("optimizer Adam needs the loss's gradient (fitness kind 'gradient')")
        g = np.asarray(gradient, dtype=np.float64)
        if not np.all(np.isfinite(g)):
            return  # a candidate with a problem: keep the step where it was, try the next batch
        self.steps += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self.beta2 * self.v + (1 - self.beta2) * g * g
        m_hat = self.m / (1 - self.beta1 ** self.steps)
        v_hat = self.v / (1 - self.beta2 ** self.steps)
        self.x = np.clip(candidate.value - self.rate() * m_hat / (np.sqrt(v_hat) + self.eps), 0.0, 1.0)

    def rate(self) -> float:
        """The step size of the step being taken (``self.steps``, from 1)."""
        return self.lr

    @classmethod
    def check(cls, evolve: dict, where: str) -> None:
        """Refuse what this optimizer cannot do with a run's ``evolve`` section (nothing here)."""


class AdamCosine(Adam):
    """Adam whose step falls from ``learning_rate`` to 0 along a half cosine over the run's
    ``budget`` steps: lr · ½(1 + cos(π (t − 1) / budget)) at step t. Large early steps cross the
    genome while the first gradients agree; small late ones stop the last genome wandering with
    each minibatch's noise (a constant step keeps it moving by about the step size). The horizon is
    the budget, not the generations, so the trajectory is fixed when the search starts; a search
    can be extended up to its budget (a step past it would not move). Not the default: on three
    zoos its gain over a constant step depended on the zoo and the draws
    (bench/results/search_sweep.txt)."""

    def __init__(self, settings: SearchSettings):
        super().__init__(settings)
        self.horizon = settings.budget or 100 * settings.population

    def rate(self) -> float:
        return self.lr * 0.5 * (1 + np.cos(np.pi * min(self.steps - 1, self.horizon) / self.horizon))

    @classmethod
    def check(cls, evolve: dict, where: str) -> None:
        budget = evolve.get("budget")
        if budget is None:
            raise MergeflowError(f"{where}.budget: optimizer AdamCosine decays its step over the run's budget (its "
                                 f"steps); give one (e.g. the generations, {evolve.get('generations')})")
        if evolve.get("generations", 0) > budget:
            raise MergeflowError(f"{where}.generations: {evolve['generations']} steps, past optimizer AdamCosine's "
                                 f"budget ({budget}), where its step is 0; raise the budget (a new search: the "
                                 f"step of every generation changes)")


@dataclass
class HybridStep:
    """A :class:`Hybrid` candidate: the whole genome (``value``) and the Nevergrad candidate of its
    other genes, which is told their loss."""

    value: np.ndarray
    evolved: object


class Hybrid:
    """A Nevergrad optimizer over the genes a gradient cannot move (a data-flow space's layer
    indicators, steps in the loss) and :class:`Adam` over those it can (``settings.smooth``: the
    scales). A generation's candidates share Adam's genes and differ in the others; each is told
    its loss (Nevergrad, on its own genes) and its gradient, and once the whole population has
    been told Adam steps on their mean gradient (the gradient of the generation's mean loss over
    the paths it tried; candidates with a problem, NaN, sit it out)."""

    def __init__(self, settings: SearchSettings):
        self.smooth = np.asarray(settings.smooth, dtype=int)
        self.rough = np.setdiff1d(np.arange(settings.dim), self.smooth)
        init = None if settings.init is None else np.asarray(settings.init, dtype=np.float64)
        self.evolution = make_optimizer(replace(settings, dim=len(self.rough), smooth=(),
                                                init=None if init is None else tuple(init[self.rough])))
        self.adam = Adam(replace(settings, dim=len(self.smooth), smooth=(),
                                 init=None if init is None else tuple(init[self.smooth])))
        self.population = settings.population
        self.dim = settings.dim
        self.told: list[np.ndarray] = []

    def ask(self) -> HybridStep:
        evolved = self.evolution.ask()
        value = np.empty(self.dim)
        value[self.rough], value[self.smooth] = evolved.value, self.adam.x
        return HybridStep(value, evolved)

    def tell(self, candidate: HybridStep, loss: float, gradient: np.ndarray | None = None) -> None:
        if gradient is None:
            raise MergeflowError("a hybrid search needs each candidate's gradient (fitness kind 'gradient')")
        self.evolution.tell(candidate.evolved, loss)
        self.told.append(np.asarray(gradient, dtype=np.float64)[self.smooth])
        if len(self.told) < self.population:
            return
        finite = [g for g in self.told if np.all(np.isfinite(g))]
        self.told = []
        if finite:
            self.adam.tell(self.adam.ask(), loss, np.mean(finite, axis=0))


# Optimizers that follow gradients, mergeflow's own (every other name is a Nevergrad optimizer).
GRADIENT_OPTIMIZERS = {"Adam": Adam, "AdamCosine": AdamCosine}


def check_optimizer(name: str, where: str = "optimizer") -> None:
    """``name`` is a Nevergrad or gradient optimizer; else a ``MergeflowError`` naming ``where``."""
    # Nevergrad where an optimizer is named or made, not where this module is: imported at the bottom
    # of the config check's import chain, CPython 3.11 runs its import-time code measurably slower
    # (frame-stack chunks allocated and freed ~30,000 times: +0.3 s on every workflow parse)
    import nevergrad as ng
    if name not in ng.optimizers.registry and name not in GRADIENT_OPTIMIZERS:
        close = [n for n in [*ng.optimizers.registry, *GRADIENT_OPTIMIZERS] if n.lower() == name.lower()]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise MergeflowError(f"{where}: unknown Nevergrad optimizer {name!r}{hint} (gradient optimizers: "
                             f"{', '.join(GRADIENT_OPTIMIZERS)})")


def make_optimizer(settings: SearchSettings):
    """A fresh Nevergrad optimizer over [0, 1]^dim, seeded, told the population as its workers
    (or a gradient optimizer; or, with ``smooth`` genes, a :class:`Hybrid` of the two)."""
    import nevergrad as ng  # see check_optimizer
    check_optimizer(settings.optimizer)
    if settings.optimizer in GRADIENT_OPTIMIZERS:
        return GRADIENT_OPTIMIZERS[settings.optimizer](settings)
    if settings.smooth:
        return Hybrid(settings)
    if settings.init is not None:
        param = ng.p.Array(init=np.asarray(settings.init, dtype=float), lower=0.0, upper=1.0)
    else:
        param = ng.p.Array(shape=(settings.dim,), lower=0.0, upper=1.0)
    if settings.sigma is not None:
        param.set_mutation(sigma=settings.sigma)
    param.random_state = np.random.RandomState(settings.seed)
    budget = settings.budget or 100 * settings.population
    return ng.optimizers.registry[settings.optimizer](parametrization=param, budget=budget,
                                                      num_workers=settings.population)


def ask_generation(optimizer, population: int) -> list:
    return [optimizer.ask() for _ in range(population)]


def tell_generation(optimizer, candidates: list, losses: list, extras: list[dict] | None = None) -> None:
    """Tell each candidate's loss and, by name, its extra values (a gradient optimizer's
    ``gradient``; see the fitness kind's ``extra_columns``)."""
    for candidate, loss, extra in zip(candidates, losses, extras or [{}] * len(candidates)):
        optimizer.tell(candidate, loss, **extra)


def replay(settings: SearchSettings, history: pd.DataFrame, objectives: list[str] | None = None,
           extra_columns: tuple[str, ...] = ()):
    """Rebuild the optimizer from the history alone: ask and tell every recorded generation again
    (with the fitness kind's ``extra_columns``, told as :func:`tell_generation` tells them).

    Each re-asked genome must equal the recorded one; a mismatch means the history was written by
    another optimizer, seed or search space, and is reported rather than silently diverging.
    """
    optimizer = make_optimizer(settings)
    for generation in sorted(history["generation"].unique()):
        rows = hist.generation(history, generation)
        candidates = ask_generation(optimizer, len(rows))
        for candidate, recorded in zip(candidates, rows["genome"]):
            if not np.allclose(candidate.value, np.asarray(recorded), rtol=0, atol=1e-12):
                raise MergeflowError(
                    f"history generation {generation}: the optimizer re-asks a different genome; the history "
                    f"does not belong to optimizer {settings.optimizer!r} with seed {settings.seed}"
                )
        tell_generation(optimizer, candidates, hist.losses(rows, objectives), hist.extras(rows, extra_columns))
    return optimizer


def save_state(path: str | Path, optimizer, candidates: list | None = None) -> None:
    """Pickle the optimizer (and pending candidates) — Nevergrad's own state, a resumable cache."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"optimizer": optimizer, "candidates": candidates}, fh)


def load_state(path: str | Path) -> tuple:
    """The optimizer and pending candidates written by :func:`save_state` (a file this run wrote)."""
    with open(path, "rb") as fh:
        state = pickle.load(fh)
    return state["optimizer"], state["candidates"]
