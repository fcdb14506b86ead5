"""Per-layer gradients and per-module filters pick the right value for named tensors."""

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.merge.params import (
    layer_index, layer_position, resolve_value, with_layer_index,
)


def test_layer_index_from_names():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("transformer.h.7.attn.c_attn.weight") == 7
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert with_layer_index("model.layers.3.mlp.up_proj.weight", 10) == "model.layers.10.mlp.up_proj.weight"


def test_scalar_is_the_same_everywhere():
    assert resolve_value(0.4, 0.7, "model.layers.1.mlp.up_proj.weight") == 0.4


def test_gradient_interpolates_across_layers():
    # 5 layers: t = layer / 4
    gradient = [0.0, 1.0]
    values = [resolve_value(gradient, layer_position(i, 5), "x") for i in range(5)]
    assert values == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    three = [0.0, 1.0, 0.0]
    assert resolve_value(three, layer_position(1, 5), "x") == pytest.approx(0.5)
    assert resolve_value(three, layer_position(2, 5), "x") == pytest.approx(1.0)


def test_one_value_per_layer_is_exact():
    per_layer = [0.1, 0.2, 0.3, 0.7, 0.9, 0.13, 0.17]
    for layer, value in enumerate(per_layer):
        assert resolve_value(per_layer, layer_position(layer, 7), "x") == value


def test_filters_pick_module_values_and_fall_back_to_the_rest():
    setting = [{"filter": "self_attn", "value": 0.1},
               {"filter": "mlp", "value": [0.0, 1.0]},
               {"value": 0.5}]
    assert resolve_value(setting, 0.5, "model.layers.2.self_attn.q_proj.weight") == 0.1
    assert resolve_value(setting, 0.5, "model.layers.2.mlp.down_proj.weight") == pytest.approx(0.5)
    assert resolve_value(setting, 1.0, "model.layers.4.mlp.down_proj.weight") == pytest.approx(1.0)
    assert resolve_value(setting, 0.5, "model.layers.2.input_layernorm.weight") == 0.5
    assert resolve_value(setting[:1], 0.5, "lm_head.weight") is None


def test_bad_setting_names_the_parameter():
    with pytest.raises(MergeflowError, match="'weight'"):
        resolve_value({"min": 0}, 0.0, "x", "weight")
