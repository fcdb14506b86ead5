"""Block-by-block merging (the streaming writer's) against whole-tensor merging, and the exact
``int(density * n)`` magnitude trim with entries tied at the cut."""

import pytest
import torch

from mergeflow.merge.methods import CPU_BLOCK
from mergeflow.merge.plan import TensorPlan, merge_tensor, merge_tensor_blocks, tensor_seed
from mergeflow.merge.registry import get_method
from mergeflow.merge.sparsify import Workspace, magnitude_trim, select_largest

BLOCKED = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear", "nearswap", "ram",
           "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock", "nuslerp", "multislerp", "karcher", "sce",
           "arcee_fusion", "ramplus_tl"]
# method parameters that have no default, or whose default selects nothing on these tensors
BLOCK_PARAMS = {"nearswap": {"t": 0.02}, "ram": {"epsilon": 0.03}, "ramplus_tl": {"epsilon": 0.03},
                "slerp": {"t": 0.3}, "sce": {"select_topk": 0.4}, "breadcrumbs": {"gamma": 0.05},
                "breadcrumbs_ties": {"gamma": 0.05}}
# blocked only with more than one row
ROW_WISE = ("della", "della_linear", "arcee_fusion")


def quantized(shape, generator, step=1 / 64):
    """Values on a coarse grid, so task vectors have many entries tied in magnitude."""
    return torch.round(torch.randn(shape, generator=generator) / step) * step


def plan_for(name, shape, models=3):
    method = get_method(name)
    sources = [(f"m{i}", "w") for i in range(models)]
    model_params = [{**method.model_defaults, "weight": w, "density": d}
                    for w, d in zip((0.5, 0.3, 0.2), (0.5, 0.37, 0.9))][:models]
    if "density" not in method.model_defaults:
        model_params = [{"weight": p["weight"]} for p in model_params]
    params = {**method.method_defaults, **BLOCK_PARAMS.get(name, {})}
    model_params = [{**p, **{k: v for k, v in params.items() if k in p}} for p in model_params]
    params = {k: v for k, v in params.items() if k in method.method_defaults}
    return TensorPlan("w", method, sources, ("base", "w") if method.uses_base else None,
                      model_params, params, tensor_seed(3, "w"), shape)


@pytest.mark.parametrize("shape", [(1201, 399), (479_899,)])  # odd sizes: blocks end mid-row
@pytest.mark.parametrize("name", BLOCKED)
def test_blocks_equal_the_whole_tensor_bitwise(name, shape):
    generator = torch.Generator().manual_seed(1)
    base = quantized(shape, generator)
    tensors = {("base", "w"): base}
    for i in range(3):
        tensors[(f"m{i}", "w")] = base + quantized(shape, generator)
    plan = plan_for(name, shape, models=get_method(name).max_models or 3)
    whole = merge_tensor(plan, lambda model, tensor: tensors[(model, tensor)], "cpu")

    def read(model, tensor, start, stop):
        return tensors[(model, tensor)].reshape(-1)[start:stop]

    blocks = list(merge_tensor_blocks(plan, read, "cpu", block=2 * CPU_BLOCK))
    assert len(blocks) > 1 or (name in ROW_WISE and len(shape) == 1)  # one row: whole
    assert torch.equal(torch.cat(blocks).view(shape), whole)


def test_trim_keeps_exactly_k_choosing_tied_entries_by_index():
    magnitudes = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.5, 2.0, 2.0, 1.0])
    trim = magnitude_trim(magnitudes, 3)
    kept = torch.zeros_like(magnitudes, dtype=torch.bool)
    kept[magnitudes > trim.threshold] = True
    kept[trim.tied] = True
    expected = torch.zeros_like(kept)
    expected[torch.argsort(magnitudes, descending=True, stable=True)[:3]] = True
    assert trim.threshold == 2.0 and int(kept.sum()) == 3
    assert torch.equal(kept, expected)
    assert magnitude_trim(magnitudes, 5).tied is None  # the cut falls after the ties: keep all


def test_argsort_tie_break_keeps_what_a_descending_argsort_keeps():
    """mergekit's trim: the first ``k`` of torch's (unstable) descending argsort."""
    generator = torch.Generator().manual_seed(4)
    magnitudes = quantized((200_000,), generator).abs()
    ws = Workspace(cache=True)
    for keep in (1, 7_000, 100_000, 150_001):
        expected = torch.zeros_like(magnitudes, dtype=torch.bool)
        expected[torch.argsort(magnitudes, descending=True)[:keep]] = True
        for trim in (magnitude_trim(magnitudes, keep, "argsort"), ws.trim(lambda: magnitudes, keep, ("m",), "argsort")):
            kept = magnitudes > trim.threshold if trim.tied is not None else magnitudes >= trim.threshold
            if trim.tied is not None:
                kept[trim.tied] = True
            assert int(kept.sum()) == keep
            assert torch.equal(kept, expected)
    by_index = magnitude_trim(magnitudes, 100_000)
    assert not torch.equal(by_index.tied, magnitude_trim(magnitudes, 100_000, "argsort").tied)  # ties do differ


def test_cached_sorted_trim_matches_the_selection():
    generator = torch.Generator().manual_seed(2)
    delta = quantized((400, 300), generator)
    ws = Workspace(cache=True)
    for keep in (1, 5000, 60000, 119999):
        fresh = magnitude_trim(delta.abs().reshape(-1), keep)
        cached = ws.trim(lambda: delta.abs().reshape(-1), keep, key=("delta",))
        assert fresh.threshold == cached.threshold
        assert (fresh.tied is None) == (cached.tied is None)
        if fresh.tied is not None:
            assert torch.equal(fresh.tied, cached.tied)


@pytest.mark.parametrize("layout", ["random", "sorted", "ties"])
def test_selection_counts_entries_above_and_at_the_cut(layout):
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(600_000, generator=generator).abs()
    if layout == "sorted":
        values = values.sort().values
    if layout == "ties":
        values = torch.randint(0, 50, (600_000,), generator=generator).float()
    for k in (1, 1000, 300_000, 599_999, 600_000):
        threshold, above, tied = select_largest(values, k)
        assert threshold == float(torch.kthvalue(values, values.numel() - k + 1).values)
        assert above == int((values > threshold).sum()) and tied == int((values == threshold).sum())


_WIDE_ZOO = {}


def wide_zoo(tmp_path_factory) -> dict[str, str]:
    """A base and two fine-tunes with MLP matrices of 393,216 entries (three blocks of 131,072)."""
    from factories import make_model

    if not _WIDE_ZOO:
        root = tmp_path_factory.mktemp("wide")
        base = make_model(root / "base", 0, 1, hidden=256, intermediate=1536)
        _WIDE_ZOO.update(base=str(base), **{name: str(make_model(root / name, seed, 1, base=base, hidden=256,
                                                                 intermediate=1536))
                                              for name, seed in (("math", 1), ("lang", 2))})
    return _WIDE_ZOO


STREAMED = {"ties": {}, "dare_ties": {}, "della": {}, "task_arithmetic": {}, "linear": {},
            "breadcrumbs_ties": {"gamma": 0.05}, "slerp": {"t": 0.3}, "model_stock": {},
            "model_stock-filter-wise": {"filter_wise": True}, "nuslerp": {}, "ties-rescale": {"rescale": True},
            "breadcrumbs-argsort-rescale": {"gamma": 0.05, "tie_break": "argsort", "rescale": True},
            "multislerp": {}, "karcher": {}, "sce": {"select_topk": 0.4}, "arcee_fusion": {},
            "ramplus_tl": {"epsilon": 0.001}}


@pytest.mark.parametrize("method", list(STREAMED))
def test_streaming_in_blocks_matches_the_in_memory_merger(tmp_path_factory, monkeypatch, method):
    import json

    from safetensors.torch import load_file

    from mergeflow.merge import InMemoryMerger, merge_to_dir, plan, recipe_from_dict

    monkeypatch.setattr(plan, "STREAM_BLOCK", CPU_BLOCK)  # block every tensor above CPU_BLOCK entries
    zoo = wide_zoo(tmp_path_factory)
    data = {"merge_method": method, "base_model": zoo["base"], "seed": 5,
            "models": [{"model": zoo["math"], "parameters": {"weight": 0.7, "density": 0.4}},
                       {"model": zoo["lang"], "parameters": {"weight": 0.4, "density": 0.7}}]}
    parameters = STREAMED[method]
    method = data["merge_method"] = method.split("-")[0]  # the method of a variant (its parameters)
    reads = get_method(method).model_defaults
    for model in data["models"]:
        model["parameters"] = {k: v for k, v in model["parameters"].items() if k in reads}
    data["parameters"] = parameters
    if method in ("slerp", "arcee_fusion"):  # one model besides the base
        data["models"] = data["models"][:1]
    if method == "karcher":
        data.pop("base_model")
    recipe = recipe_from_dict(data)
    out = merge_to_dir(recipe, tmp_path_factory.mktemp("out") / method)
    state = InMemoryMerger(recipe).merge(recipe).state_dict()
    files = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    merged = {name: t for file in files for name, t in load_file(out / file).items()}
    assert max(t.numel() for t in merged.values()) > 2 * CPU_BLOCK
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name
