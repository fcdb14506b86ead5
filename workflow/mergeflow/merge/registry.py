"""The registry of merge methods: each method's function, what it needs and its parameters.

A recipe names a method (``merge_method``); the planner (``plan``) looks it up here to know
whether it takes a base model, how many models it merges, which parameters it reads at each
level and their defaults, whether it draws random numbers, and how the streaming writer may
split a large tensor for it. The functions themselves are in ``methods``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.merge.methods import (
    MethodFunction, arcee_fusion_layout, arcee_fusion_merge, arcee_fusion_prepare, breadcrumbs_masked,
    breadcrumbs_merge, breadcrumbs_prepare, breadcrumbs_ties_masked, breadcrumbs_ties_merge, breadcrumbs_ties_prepare,
    dare_linear_masked, dare_linear_merge, dare_ties_masked, dare_ties_merge, della_linear_masked, della_linear_merge,
    della_masked, della_merge, karcher_merge, karcher_prepare, linear_merge, model_stock_layout, model_stock_merge,
    model_stock_prepare, multislerp_merge, multislerp_prepare, nearswap_merge, nuslerp_merge, nuslerp_prepare,
    ram_merge, ramplus_tl_merge, ramplus_tl_prepare, sce_merge, sce_prepare, slerp_merge, slerp_prepare,
    task_arithmetic_masked, task_arithmetic_merge, ties_masked, ties_merge, ties_prepare,
)


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    """A registered method: its function, what it needs and the defaults of its parameters.

    ``model_defaults`` and ``method_defaults`` map parameter names to defaults; a None default
    means the parameter is required. ``min_models`` and ``max_models`` (None: no limit) count
    the models merged besides the base.
    """

    name: str
    function: MethodFunction
    uses_base: bool
    # uses_base methods that also merge without one: on the models themselves, not task vectors
    base_optional: bool = False
    # methods without a base (mergekit's "ignored" base) that merge a models recipe's
    # base_model as one more model, appended when the recipe does not list it, as mergekit does
    base_as_model: bool = False
    model_defaults: dict[str, Any] = field(default_factory=dict)
    method_defaults: dict[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # draws from ``rng``: DARE's and DELLA's drops
    # How the streaming writer may split a large tensor: "flat" (any runs of entries: the
    # method is elementwise given what ``prepare`` computed), "rows" (whole rows) or None (whole
    # tensor); or a function of (params, shape) giving one of them.
    blocks: str | None | Callable[[dict, tuple], str | None] = None
    # ``prepare(passes, shape, model_params, params)``: the method's whole-tensor quantities
    # (trims, angles, weights) from passes over the blocks (``passes``), given to it as
    # ``prepared`` for each block; None: the method needs none.
    prepare: Callable | None = None
    # ``masked(tensors, base, model_params, params, rng, ws, prepared, offset)``: the merge's
    # ``methods.MaskedTerms``, its masks held as the merge makes them (a merge smooth in the
    # weights and lambda, with its derivatives in them); None: no such form, no gradient search.
    masked: Callable | None = None

    def layout(self, params: dict, shape: tuple) -> str | None:
        """How the streaming writer may split a tensor of ``shape`` (see ``blocks``)."""
        return self.blocks(params, shape) if callable(self.blocks) else self.blocks


# What every task-vector method reads per model: its weight and the density of its sparsified
# task vector (1: no sparsification).
_TASK_VECTOR_MODEL = {"weight": 1.0, "density": 1.0}

# mergekit's ``int8_mask`` (the dtype of its masks: a memory option) on the methods that take
# it: read, so mergekit recipes run, and changes no value (our masks are never held whole).
_MASK_OPTION = {"int8_mask": False}

MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in [
        MergeMethod(name="linear", function=linear_merge, uses_base=False,
                    model_defaults={"weight": 1.0}, method_defaults={"normalize": True}, blocks="flat"),
        MergeMethod(name="task_arithmetic", function=task_arithmetic_merge, uses_base=True,
                    masked=task_arithmetic_masked, model_defaults={**_TASK_VECTOR_MODEL},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": False, "rescale": False}, blocks="flat"),
        MergeMethod(name="ties", function=ties_merge, uses_base=True, masked=ties_masked,
                    model_defaults={**_TASK_VECTOR_MODEL},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": True, "rescale": False, "tie_break": "index"},
                    blocks="flat", prepare=ties_prepare),
        MergeMethod(name="dare_linear", function=dare_linear_merge, uses_base=True, masked=dare_linear_masked,
                    model_defaults={**_TASK_VECTOR_MODEL},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": False, "rescale": True},
                    random=True, blocks="flat"),
        MergeMethod(name="dare_ties", function=dare_ties_merge, uses_base=True, masked=dare_ties_masked,
                    model_defaults={**_TASK_VECTOR_MODEL},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": False, "rescale": True},
                    random=True, blocks="flat"),
        MergeMethod(name="breadcrumbs", function=breadcrumbs_merge, uses_base=True, masked=breadcrumbs_masked,
                    model_defaults={**_TASK_VECTOR_MODEL, "gamma": 0.01},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": False, "rescale": False,
                                     "tie_break": "index"},
                    blocks="flat", prepare=breadcrumbs_prepare),
        MergeMethod(name="breadcrumbs_ties", function=breadcrumbs_ties_merge, uses_base=True,
                    masked=breadcrumbs_ties_masked, model_defaults={**_TASK_VECTOR_MODEL, "gamma": 0.01},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": False, "rescale": False,
                                     "tie_break": "index"},
                    blocks="flat", prepare=breadcrumbs_ties_prepare),
        MergeMethod(name="della", function=della_merge, uses_base=True, masked=della_masked,
                    model_defaults={**_TASK_VECTOR_MODEL, "epsilon": 0.15},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": True, "rescale": True},
                    random=True, blocks="rows"),
        MergeMethod(name="della_linear", function=della_linear_merge, uses_base=True, masked=della_linear_masked,
                    model_defaults={**_TASK_VECTOR_MODEL, "epsilon": 0.15},
                    method_defaults={**_MASK_OPTION, "lambda": 1.0, "normalize": False, "rescale": True},
                    random=True, blocks="rows"),
        MergeMethod(name="slerp", function=slerp_merge, uses_base=True,
                    method_defaults={"t": None}, min_models=1, max_models=1, blocks="flat", prepare=slerp_prepare),
        MergeMethod(name="model_stock", function=model_stock_merge, uses_base=True, min_models=2,
                    method_defaults={"filter_wise": False}, blocks=model_stock_layout, prepare=model_stock_prepare),
        MergeMethod(name="nuslerp", function=nuslerp_merge, uses_base=True, base_optional=True,
                    model_defaults={"weight": 1.0},
                    method_defaults={"nuslerp_flatten": True, "nuslerp_row_wise": False},
                    min_models=2, max_models=2, prepare=nuslerp_prepare,
                    blocks=lambda params, shape: "flat" if params["nuslerp_flatten"] else None),
        MergeMethod(name="multislerp", function=multislerp_merge, uses_base=True, base_optional=True,
                    model_defaults={"weight": 1.0}, method_defaults={"normalize_weights": True, "eps": 1e-8},
                    blocks="flat", prepare=multislerp_prepare),
        MergeMethod(name="karcher", function=karcher_merge, uses_base=False, base_as_model=True,
                    method_defaults={"max_iter": 10, "tol": 1e-5}, blocks="flat", prepare=karcher_prepare),
        MergeMethod(name="sce", function=sce_merge, uses_base=True,
                    method_defaults={**_MASK_OPTION, "select_topk": 1.0},
                    blocks="flat", prepare=sce_prepare),
        MergeMethod(name="nearswap", function=nearswap_merge, uses_base=True, method_defaults={"t": None},
                    max_models=1, blocks="flat"),
        MergeMethod(name="arcee_fusion", function=arcee_fusion_merge, uses_base=True, max_models=1,
                    blocks=arcee_fusion_layout, prepare=arcee_fusion_prepare),
        MergeMethod(name="ram", function=ram_merge, uses_base=True, method_defaults={"epsilon": 1e-5},
                    blocks="flat"),
        MergeMethod(name="ramplus_tl", function=ramplus_tl_merge, uses_base=True,
                    method_defaults={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, blocks="flat",
                    prepare=ramplus_tl_prepare),
    ]
}


PARAMETER_LEVELS = ("model", "method", "any")


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; MergeflowError naming it when unknown."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(MERGE_METHODS))
        raise MergeflowError(f"unknown merge method {name!r}; known methods: {known}") from None


def read_parameters(methods: list[str], level: str) -> set[str]:
    """The parameters any of ``methods`` reads at ``level``: ``model`` (per-model: weight,
    density, ...), ``method`` (lambda, normalize, t, ...) or ``any`` (both: a recipe's or
    slice's own ``parameters`` may give per-model defaults too)."""
    names: set[str] = set()
    for name in methods:
        method = get_method(name)
        if level in ("model", "any"):
            names |= set(method.model_defaults)
        if level in ("method", "any"):
            names |= set(method.method_defaults)
    return names


def check_parameter_names(keys, level: str, where: str, methods: list[str] | None = None) -> None:
    """Raise ``RecipeError`` naming the first of ``keys`` that no method reads at ``level`` (see
    :func:`read_parameters`): a misspelt parameter would otherwise be ignored. ``methods``: the
    methods in play (a search space's: a gene none of them reads is refused); None, every
    registered method (a recipe: a slice may switch methods, as a per-group choice does)."""
    known = read_parameters(list(MERGE_METHODS) if methods is None else methods, level)
    scope = "no merge method" if methods is None else f"no merge method here ({', '.join(methods)})"
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}: parameter {key!r} is read by {scope}; "
                              f"{'per-model ' if level == 'model' else ''}parameters "
                              f"{'merge methods' if methods is None else 'they'} read: "
                              f"{', '.join(sorted(known)) or 'none'}{hint}")
