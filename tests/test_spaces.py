"""Search spaces: genome <-> recipe, and genome recipes that merge."""

import numpy as np
import pytest
import torch

from factories import make_zoo
from mergeflow.errors import MergeflowError
from mergeflow.merge import InMemoryMerger, merge_to_dir
from mergeflow.spaces import SPACES, build_space
from mergeflow.spaces.parameter import ParameterSpace, layer_groups
from mergeflow.merge.params import layer_position, resolve_value


def config(**overrides):
    cfg = {"method": "dare_ties", "base_model": "base", "models": ["math", "lang"],
           "layer_groups": 2, "filters": ["self_attn", "mlp"],
           "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": {"min": 0.1, "max": 1.0}},
           "method_parameters": {"lambda": {"min": 0.5, "max": 1.5}, "normalize": False}}
    cfg.update(overrides)
    return cfg


def test_dimension_counts_groups_kinds_models_and_parameters():
    space = ParameterSpace.from_config(config(), num_layers=4)
    # 2 groups x 3 kinds x (2 models x 2 params + 1 method param)
    assert space.dim == 2 * 3 * 5
    multi = ParameterSpace.from_config(config(method=["ties", "dare_ties", "slerp"]), num_layers=4)
    assert multi.dim == space.dim + 2
    flat = ParameterSpace.from_config(config(layer_groups=1, filters=[]), num_layers=4)
    assert flat.dim == 5


def test_layer_groups_cover_all_layers():
    assert layer_groups(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert layer_groups(4, 1) == [(0, 4)]


def test_genes_map_linearly_to_ranges_and_per_layer_values():
    space = ParameterSpace.from_config(config(), num_layers=4)
    x = np.zeros(space.dim)
    # gene order: group 0, kind self_attn: math weight, math density, lang weight, lang density, lambda
    x[0], x[1], x[4] = 1.0, 0.5, 0.25
    recipe = space.to_recipe(x, seed=11)
    assert recipe.seed == 11 and recipe.merge_method == "dare_ties"
    assert recipe.parameters["normalize"] is False
    weight = recipe.models[0].parameters["weight"]
    t = layer_position(1, 4)
    assert resolve_value(weight, t, "model.layers.1.self_attn.q_proj.weight") == 1.5
    assert resolve_value(weight, t, "model.layers.1.mlp.up_proj.weight") == 0.0
    assert resolve_value(recipe.models[0].parameters["density"], t,
                         "model.layers.1.self_attn.k_proj.weight") == pytest.approx(0.55)
    assert resolve_value(recipe.parameters["lambda"], t, "model.layers.0.self_attn.o_proj.weight") == 0.75
    # group 1 (layers 2-3) has its own values
    assert resolve_value(weight, layer_position(2, 4), "model.layers.2.self_attn.q_proj.weight") == 0.0


@pytest.mark.parametrize("method", ["dare_ties", ["ties", "dare_ties", "task_arithmetic"]])
def test_round_trip(method):
    space = ParameterSpace.from_config(config(method=method), num_layers=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=space.dim)
    back = space.from_recipe(space.to_recipe(x, seed=1))
    n = space.method_genes
    np.testing.assert_allclose(back[n:], x[n:], atol=1e-12)
    # categorical genes come back as bin centres of the same bin
    assert np.all(np.floor(back[:n] * 3) == np.floor(x[:n] * 3))


def test_several_methods_give_slices_with_per_group_methods():
    space = ParameterSpace.from_config(config(method=["ties", "dare_ties"]), num_layers=4)
    x = np.full(space.dim, 0.5)
    x[0], x[1] = 0.1, 0.9
    recipe = space.to_recipe(x)
    assert [s.merge_method for s in recipe.slices] == ["ties", "dare_ties"]
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 2), (2, 4)]


def test_bad_genome_and_config():
    space = ParameterSpace.from_config(config(), num_layers=4)
    with pytest.raises(MergeflowError, match="shape"):
        space.to_recipe(np.zeros(3))
    with pytest.raises(MergeflowError, match="'nope'"):
        ParameterSpace.from_config(config(method="nope"), num_layers=4)
    with pytest.raises(MergeflowError, match="layer_groups"):
        ParameterSpace.from_config(config(layer_groups=9), num_layers=4)


def test_genome_recipes_merge_in_memory_like_the_cli(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", num_layers=4)
    cfg = config(method=["ties", "dare_ties"], base_model=zoo["base"], models=[zoo["math"], zoo["lang"]])
    space = build_space(cfg)  # the registry's way: layers read from the base model
    assert isinstance(space, ParameterSpace) and space.num_layers == 4
    merger = InMemoryMerger(space.models, base_model=space.base_model)
    rng = np.random.default_rng(1)
    for candidate in range(2):
        recipe = space.to_recipe(rng.uniform(size=space.dim), seed=candidate)
        state = {k: v.clone() for k, v in merger.merge(recipe).state_dict().items()}
        from safetensors.torch import load_file
        out = merge_to_dir(recipe, tmp_path / f"c{candidate}")
        merged = {}
        for file in out.glob("model-*.safetensors"):
            merged.update(load_file(file))
        assert all(torch.equal(state[k], v) for k, v in merged.items())


def test_a_space_chooses_among_the_newer_methods_per_group(tmp_path):
    """Any registered method is a choice: here TIES, nuslerp and SCE (with its select_topk
    searched) per layer group; the recipes merge, in memory as by the CLI."""
    zoo = make_zoo(tmp_path / "zoo", num_layers=3)
    cfg = config(method=["ties", "nuslerp", "sce"], base_model=zoo["base"], models=[zoo["math"], zoo["lang"]],
                 layer_groups=3, filters=[], method_parameters={"select_topk": {"min": 0.2, "max": 1.0}})
    space = build_space(cfg)
    x = np.full(space.dim, 0.4)
    x[:3] = [0.1, 0.5, 0.9]  # one method per group
    recipe = space.to_recipe(x, seed=2)
    assert [s.merge_method for s in recipe.slices] == ["ties", "nuslerp", "sce"]
    state = InMemoryMerger(space.models, base_model=space.base_model).merge(recipe).state_dict()
    from safetensors.torch import load_file
    out = merge_to_dir(recipe, tmp_path / "merged")
    merged = {}
    for file in out.glob("model-*.safetensors"):
        merged.update(load_file(file))
    assert all(torch.equal(state[k], v) for k, v in merged.items())
    # parameters none of the chosen methods reads are refused: karcher and ram read no weight
    with pytest.raises(MergeflowError, match="'weight' is read by no merge method here \\(karcher, ram\\)"):
        ParameterSpace.from_config(config(method=["karcher", "ram"], method_parameters={}), num_layers=3)
    with pytest.raises(MergeflowError, match="'gamma'"):
        ParameterSpace.from_config(config(method=["karcher", "ram"], parameters={}, method_parameters={"gamma": 0.1}),
                                   num_layers=3)


def test_the_registry_builds_the_default_kind_and_fills_the_schema_defaults(tmp_path):
    zoo = make_zoo(tmp_path / "zoo", num_layers=4)
    space = build_space({"method": "task_arithmetic", "base_model": zoo["base"], "models": [zoo["math"]],
                         "parameters": {"weight": {"min": 0.0, "max": 1.0}}})
    assert list(SPACES) == ["parameter", "dfs", "dis"]
    assert isinstance(space, ParameterSpace)
    assert space.groups == [(0, 4)] and space.filters == []  # schema defaults: layer_groups 1, no filters
    assert space.initial_genome(None) is None
    assert space.initial_genome({zoo["math"]: 0.25}) == pytest.approx((0.25,))


@pytest.mark.parametrize("bad, message", [
    ({"kind": "dfz"}, r"search_space\.kind: 'dfz' is not one of \['parameter', 'dfs', 'dis'\]"),
    ({"layer_groupz": 2}, r"at search_space: Additional properties are not allowed \('layer_groupz'"),
    ({"method": "tie"}, r"search_space\.method"),
])
def test_bad_kind_or_key_is_named(bad, message):
    cfg = {"method": "ties", "models": ["m"], "base_model": "b", **bad}
    with pytest.raises(MergeflowError, match=message):
        build_space(cfg)
