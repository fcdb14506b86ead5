"""The scorers a task can name (``tasks.NAME.scorer``): how its items are judged.

A module of its own so that the config check and the data stage know a scorer without
importing the evaluator (and torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeflow.errors import MergeflowError


@dataclass(frozen=True)
class Scorer:
    """``choices``: multiple choice by log-likelihood (else greedy generation and exact match);
    ``length_normalised``: choices compared by log-likelihood per character of the choice
    (lm-evaluation-harness's ``acc_norm``) rather than by the summed log-likelihood (``acc``)."""

    choices: bool
    length_normalised: bool = False


SCORERS: dict[str, Scorer] = {
    "mc_loglik": Scorer(choices=True),
    "mc_loglik_norm": Scorer(choices=True, length_normalised=True),
    "exact_match": Scorer(choices=False),
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise MergeflowError(f"unknown scorer {name!r}; use one of {list(SCORERS)}")
    return SCORERS[name]
