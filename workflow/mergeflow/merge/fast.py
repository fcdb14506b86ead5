"""In-memory merging for the search: sources resident on the device, one preallocated model.

The evolutionary search merges thousands of candidates from the same sources. ``InMemoryMerger``
loads every source tensor once (in the compute dtype, on the device) and one model from the
template (base) checkpoint; each ``merge(recipe)`` executes the same per-tensor plan as the
CLI (``plan.merge_tensor``) and copies the results into that model's parameters in place: no
disk I/O and no new model per candidate.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergeflow.errors import MergeflowError
from mergeflow.merge.methods import MaskedTerms
from mergeflow.merge.plan import MergePlan, TensorPlan, check_finite, masked_terms, merge_tensor, plan_merge
from mergeflow.merge.recipe import Recipe
from mergeflow.dtypes import dtype_name, torch_dtype
from mergeflow.merge.sources import ModelSource
from mergeflow.merge.sparsify import Workspace
from mergeflow.merge.vocab import align_sources, fill_rows, first_difference, is_vocabulary_tensor, plan_vocabulary


def find_nonfinite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` holding NaN or Inf."""
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def _tokenizer_spec(recipe: Recipe) -> tuple:
    return (recipe.tokenizer_source, tuple(sorted((t, str(o.to_dict())) for t, o in recipe.tokens.items())),
            recipe.pad_to_multiple_of)


def _rows_key(tensor_plan: TensorPlan) -> tuple:
    """A vocabulary tensor and the models merged into it: what its filled rows depend on (given
    the output vocabulary and the recipe's base)."""
    refs = [*tensor_plan.sources, *([tensor_plan.base] if tensor_plan.base else [])]
    return tensor_plan.name, frozenset(model for model, _ in refs)


class InMemoryMerger:
    """Resident sources plus one preallocated model that each merge overwrites.

    ``models``: a recipe (every model it reads is loaded) or a list of model paths;
    ``base_model``: added to the list when given. The first of (base, models) is the template:
    its config, buffers and tokenizer define the merged model. ``dtype`` is the merged model's
    dtype (default: the template's); ``compute_dtype`` the dtype sources are held and merged in
    (default float32, as the CLI). ``sort_magnitudes`` keeps each trimmed task vector's sorted
    magnitudes so TIES trims need no selection per candidate (one float32 copy per source
    model's tensor; turn off when device memory is short).

    Models whose vocabularies differ: given a recipe with a ``tokenizer_source``, the sources are
    held seen through its output vocabulary (each model's embedding rows permuted, the rows it
    lacks filled, as ``merge_to_dir`` does: :mod:`mergeflow.merge.vocab`), the preallocated model
    has that vocabulary's rows, and :attr:`tokenizer` is its tokenizer (None otherwise: the
    template's). Every recipe merged must then name the same tokenizer and merge the same models
    into the vocabulary tensors: a search's candidates do.
    """

    def __init__(self, models: Recipe | Sequence[str], base_model: str | None = None,
                 device: str = "cpu", dtype: str | None = None, compute_dtype: str | None = None,
                 sort_magnitudes: bool = True):
        paths = models.model_paths() if isinstance(models, Recipe) else [str(p) for p in models]
        base = base_model or (models.base_model if isinstance(models, Recipe) else None)
        self.paths = list(dict.fromkeys(([base] if base else []) + paths))
        if not self.paths:
            raise MergeflowError("InMemoryMerger needs at least one model")
        self.device = torch.device(device)
        self.compute_dtype = torch_dtype(compute_dtype or "float32", "compute dtype")
        self.sources = {path: ModelSource(path) for path in self.paths}
        self.vocabulary, self.tokenizer = None, None
        if isinstance(models, Recipe) and models.tokenizer_source:
            self._align_vocabularies(models)
        self.resident = {path: self._load(source) for path, source in self.sources.items()}
        self.template = self.paths[0]
        self.out_dtype = torch_dtype(dtype, "dtype") if dtype else None
        self.model = self._preallocate()
        self.parameters = dict(self.model.state_dict())
        self.workspace = Workspace(cache=True, sort_cache=sort_magnitudes)
        self.merged: Recipe | None = None  # the recipe the model holds, None before a merge or after a failed one

    def _align_vocabularies(self, recipe: Recipe) -> None:
        """See the sources through ``recipe``'s output vocabulary, when it reconciles any: the
        other tensors are held as they are, the vocabulary tensors per set of models merged into
        them (the rows a model lacks are filled from those models: :meth:`_vocabulary_rows`)."""
        vocabulary = plan_vocabulary(recipe, self.sources)
        if vocabulary is None:
            return
        self.vocabulary, self.tokenizer = vocabulary, vocabulary.tokenizer
        self._vocabulary_merge = (_tokenizer_spec(recipe), recipe.base_model)
        self._rows: dict[tuple, dict[str, torch.Tensor]] = {}
        self._aligned = align_sources(self.sources, vocabulary)

    def _vocabulary_rows(self, plan: MergePlan, recipe: Recipe) -> None:
        """The aligned vocabulary tensors of every set of models ``plan`` merges into one, loaded
        once per set."""
        missing = [t for t in plan.tensors if is_vocabulary_tensor(t.name) and _rows_key(t) not in self._rows]
        if not missing:
            return
        sources = align_sources(self.sources, self.vocabulary)  # fresh fills, for this plan's sets
        fill_rows(plan, recipe, sources, self.vocabulary)
        for tensor_plan in missing:
            rows = {}
            for model, _ in [*tensor_plan.sources, *([tensor_plan.base] if tensor_plan.base else [])]:
                tensor = sources[model].read(tensor_plan.name)
                check_finite(tensor, tensor_plan.name, model)
                rows[model] = tensor.to(device=self.device, dtype=self.compute_dtype)
            self._rows[_rows_key(tensor_plan)] = rows

    def _fetcher(self, tensor_plan: TensorPlan):
        """``fetch(model, name)`` for one tensor's plan: a vocabulary tensor seen through the output
        vocabulary when the merger aligns vocabularies."""
        if self.vocabulary is None or not is_vocabulary_tensor(tensor_plan.name):
            return self._fetch
        rows = self._rows[_rows_key(tensor_plan)]
        return lambda model, name: rows[model]

    def _load(self, source: ModelSource) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in source.tensors:
            if self.vocabulary is not None and is_vocabulary_tensor(name):
                continue  # held through the output vocabulary (:meth:`_vocabulary_rows`)
            tensor = source.read(name)
            check_finite(tensor, name, str(source.path))
            tensors[name] = tensor.to(device=self.device, dtype=self.compute_dtype)
        return tensors

    def _preallocate(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM  # heavy import, only for this path

        template = self.sources[self.template]
        if self.out_dtype is None:
            first = next(iter(template.tensors.values())).dtype
            self.out_dtype = first if first.is_floating_point else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            template.path, dtype=self.out_dtype, device_map=None)
        if self.vocabulary is not None:  # the output vocabulary's rows (tied embeddings stay tied)
            model.resize_token_embeddings(self.vocabulary.size)
        model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        return model

    def _fetch(self, model: str, name: str) -> torch.Tensor:
        try:
            tensors = self.resident[model]
        except KeyError:
            raise MergeflowError(
                f"model {model!r} was not loaded into the in-memory merger; loaded: {self.paths}"
            ) from None
        try:
            return tensors[name]
        except KeyError:
            raise MergeflowError(f"tensor {name!r} is missing from model {model!r}") from None

    def plan(self, recipe: Recipe) -> MergePlan:
        """The plan of ``recipe`` over the resident sources, checked to fit the preallocated model."""
        if recipe.dtype and torch_dtype(recipe.dtype, "recipe dtype") != self.compute_dtype:
            raise MergeflowError(
                f"recipe dtype {recipe.dtype!r} differs from the merger's compute dtype "
                f"{dtype_name(self.compute_dtype)!r}")
        missing = [p for p in recipe.model_paths() if p not in self.resident]
        if missing:
            raise MergeflowError(f"model {missing[0]!r} was not loaded into the in-memory merger")
        if self.vocabulary is not None:
            if (_tokenizer_spec(recipe), recipe.base_model) != self._vocabulary_merge:
                raise MergeflowError(
                    "recipe: its tokenizer or base model differ from those of the recipe this merger aligned the "
                    f"vocabularies for ({self._vocabulary_merge}); build a merger for it")
            plan = plan_merge(recipe, self._aligned, out_dtype=dtype_name(self.out_dtype))
            self._vocabulary_rows(plan, recipe)
        else:
            vocab = plan_vocabulary(recipe, self.sources) if recipe.tokenizer_source else None
            if vocab is not None:
                raise MergeflowError(
                    f"recipe: tokenizer_source {recipe.tokenizer_source!r} reconciles vocabularies "
                    f"({first_difference(vocab)}); build the in-memory merger from such a recipe "
                    "(InMemoryMerger(recipe)) to merge it in memory")
            plan = plan_merge(recipe, self.sources, out_dtype=dtype_name(self.out_dtype))
        if plan.num_layers != self.sources[self.template].num_layers:
            raise MergeflowError(
                f"recipe produces {plan.num_layers} layers; the preallocated model has "
                f"{self.sources[self.template].num_layers}")
        return plan

    def masked_terms(self, tensor_plan: TensorPlan) -> MaskedTerms:
        """One tensor of a plan as its merge with every mask held (:func:`~mergeflow.merge.plan.masked_terms`),
        in the compute dtype, without touching the model (a gradient's slopes, one tensor at a time)."""
        with torch.no_grad():
            return masked_terms(tensor_plan, self._fetcher(tensor_plan), self.device, self.workspace)

    def merge(self, recipe: Recipe) -> torch.nn.Module:
        """Merge ``recipe`` into the preallocated model in place and return the model
        (:attr:`merged` then says which recipe it holds)."""
        plan = self.plan(recipe)
        self.merged = None  # until every tensor is written
        with torch.no_grad():
            for tensor_plan in plan.tensors:
                target = self.parameters.get(tensor_plan.name)
                if target is None:
                    raise MergeflowError(
                        f"tensor {tensor_plan.name!r} has no counterpart in the preallocated model")
                # Write straight into the parameter when it has the compute dtype; otherwise
                # merge into scratch and cast on the copy, as the CLI casts on writing.
                direct = target.dtype == self.compute_dtype and target.is_contiguous()
                merged = merge_tensor(tensor_plan, self._fetcher(tensor_plan), self.device, self.workspace,
                                      out=target if direct else None)
                if merged is not target:
                    target.copy_(merged)
        self.merged = recipe
        return self.model

    def nonfinite_tensors(self) -> list[str]:
        """Names of merged tensors holding NaN or Inf (empty when the merge is usable)."""
        return find_nonfinite(self.model)
