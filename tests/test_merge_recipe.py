"""Recipes: mergekit YAML in and out, hashing, and rejection of what we do not support."""


import pytest

from mergeflow.errors import MergeflowError
from mergeflow.merge.recipe import load_recipe, recipe_from_dict, recipe_from_yaml, recipe_hash, save_recipe

MERGEKIT_RECIPE = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_recipe_round_trips(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(MERGEKIT_RECIPE)
    recipe = load_recipe(path)
    assert recipe.merge_method == "ties"
    assert recipe.base_model == "TheBloke/Llama-2-13B-fp16"
    assert recipe.models[1].parameters["weight"] == [0, 0.3, 0.7, 1]
    assert recipe.dtype == "float16"
    save_recipe(recipe, tmp_path / "again.yaml")
    again = load_recipe(tmp_path / "again.yaml")
    assert again == recipe
    assert recipe_hash(again) == recipe_hash(recipe)
    assert len(recipe_hash(recipe)) == 12
    assert recipe_from_yaml(recipe.to_yaml()) == recipe  # as a history row stores it


def test_hash_changes_with_content():
    a = recipe_from_dict({"merge_method": "linear", "models": ["x", "y"]})
    b = recipe_from_dict({"merge_method": "linear", "models": ["x", "y"], "seed": 1})
    assert recipe_hash(a) != recipe_hash(b)


def test_slices_with_layer_ranges():
    recipe = recipe_from_dict({
        "merge_method": "slerp", "base_model": "a",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]},
                                {"model": "b", "layer_range": [0, 4]}],
                    "parameters": {"t": 0.3}}]})
    assert recipe.slices[0].num_layers == 4
    assert recipe.model_paths() == ["a", "b"]


@pytest.mark.parametrize("data, culprit", [
    ({"merge_method": "linear", "models": ["x"], "tokenizer": {"pad_to_multiple_of": 0}}, "positive integer"),
    ({"merge_method": "linear", "models": ["x"], "tokenizer": {"pad_to": 8}}, "'pad_to'"),
    ({"merge_method": "linear", "models": ["x"], "tokenizer_source": "union", "tokenizer": {"source": "base"}},
     "not both"),
    ({"merge_method": "linear", "models": ["x"], "tokenizer": {"tokens": {"<t>": {"source": {"kind": "one"}}}}},
     r"tokenizer.tokens\['<t>'\]: 'source' must be"),
    ({"merge_method": "linear", "models": ["x"],
      "tokenizer": {"tokens": {"<t>": {"source": {"kind": "model_token", "model": "x"}}}}}, "exactly one of 'token'"),
    ({"merge_method": "linear", "models": ["x"], "tokenizer": {"tokens": {"<t>": {"force": True}}}}, "needs a 'source'"),
    ({"merge_method": "linear", "models": [{"model": "x", "lora": 1}]}, "'lora'"),
    ({"merge_method": "linear"}, "exactly one of 'models' and 'slices'"),
    ({"merge_method": "linear", "models": ["x"], "dtype": "int4"}, "'int4'"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "x", "layer_range": [3, 1]}]}]},
     "layer_range"),
])
def test_unsupported_recipes_are_rejected(data, culprit):
    with pytest.raises(MergeflowError, match=culprit):
        recipe_from_dict(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(MergeflowError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(MergeflowError, match="bad.yaml"):
        load_recipe(bad)
    with pytest.raises(MergeflowError, match="history row 3 is not valid YAML"):
        recipe_from_yaml("models: [\n", where="history row 3")


def test_tokenizer_forms_round_trip_as_mergekit_writes_them():
    """``tokenizer_source`` stays itself; a ``tokenizer`` block with token overrides stays a block
    (its source defaulting to union, as mergekit's); one without overrides is a tokenizer_source."""
    plain = recipe_from_dict({"merge_method": "linear", "models": ["x", "y"], "tokenizer_source": "union"})
    assert plain.tokenizer_source == "union" and plain.tokenizer_model is None and not plain.tokens
    assert plain.to_dict()["tokenizer_source"] == "union" and recipe_from_yaml(plain.to_yaml()) == plain
    assert recipe_from_dict({"merge_method": "linear", "models": ["x"], "tokenizer": {"source": "base"}}).to_dict()[
        "tokenizer_source"] == "base"
    tokens = {"<a>": {"source": "y"}, "<b>": {"source": {"kind": "zero"}, "force": True},
              "<c>": {"source": {"kind": "model_token", "model": "x", "token_id": 3}}}
    block = recipe_from_dict({"merge_method": "linear", "models": ["x", "y"], "tokenizer": {"tokens": tokens}})
    assert block.tokenizer_source == "union" and block.tokens["<b>"].force and not block.tokens["<a>"].force
    assert block.to_dict()["tokenizer"] == {"source": "union", "tokens": tokens}
    assert recipe_from_yaml(block.to_yaml()) == block and recipe_hash(block) != recipe_hash(plain)
    assert recipe_from_dict({"merge_method": "linear", "models": ["x"], "tokenizer_source": "x"}).tokenizer_model == "x"
    padded = recipe_from_dict({"merge_method": "linear", "models": ["x"], "tokenizer": {"pad_to_multiple_of": 8}})
    assert padded.to_dict()["tokenizer"] == {"source": "union", "pad_to_multiple_of": 8}
    assert recipe_from_yaml(padded.to_yaml()) == padded
