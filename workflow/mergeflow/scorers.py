"""The scorers a task can name (``tasks.NAME.scorer``): how its items are judged.

A module of its own so that the config check and the data stage know a scorer without
importing the evaluator (and torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeflow.errors import MergeflowError


@dataclass(frozen=True)
class Scorer:
    """``choices``: multiple choice by log-likelihood (else the gold answer's log-likelihood and,
    with ``generates``, a greedy generation judged by ``judge``); ``length_normalised``: choices
    compared by log-likelihood per character of the choice (lm-evaluation-harness's ``acc_norm``)
    rather than by the summed log-likelihood (``acc``); ``both_norms``: both answers recorded, as
    ``acc`` and ``acc_norm`` columns. Without ``generates`` an item is correct when its gold answer
    is the greedy continuation (lm-eval's ``acc`` of a ``loglikelihood`` task). ``judge`` is
    ``"module:function"`` (imported when a generation is judged): ``(items, generations) ->
    (correct, extra columns)``; none, the number in the answer is compared with the target's."""

    choices: bool
    length_normalised: bool = False
    both_norms: bool = False
    generates: bool = True
    judge: str | None = None


SCORERS: dict[str, Scorer] = {
    "mc_loglik": Scorer(choices=True),
    "mc_loglik_norm": Scorer(choices=True, length_normalised=True),
    "exact_match": Scorer(choices=False),
    # lm-evaluation-harness tasks (mergeflow.lm_eval_tasks): set from the task's output type and metric
    "lm_eval_acc": Scorer(choices=True, both_norms=True),
    "lm_eval_acc_norm": Scorer(choices=True, length_normalised=True, both_norms=True),
    "lm_eval_generate": Scorer(choices=False, judge="mergeflow.lm_eval_tasks:judge_generations"),
    "lm_eval_loglik": Scorer(choices=False, generates=False),
}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise MergeflowError(f"unknown scorer {name!r}; use one of {list(SCORERS)}")
    return SCORERS[name]
