"""The merge CLI on tiny Llama models, CLI vs in-memory identity, and bad-input messages."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from factories import make_model, make_zoo
from mergeflow import cli
from mergeflow.errors import MergeflowError
from mergeflow.merge import (
    MERGE_METHODS, InMemoryMerger, MergeMethod, load_recipe, merge_to_dir, plan_merge, recipe_from_dict,
)
from mergeflow.merge.methods import linear_merge
from mergeflow.merge.plan import open_sources


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("zoo"), num_layers=3)


@pytest.fixture
def merge_cli():
    return cli.main


def read_merged(out_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out_dir / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def recipe_dict(zoo, method="ties", **extra):
    return {
        "merge_method": method, "base_model": zoo["base"],
        "models": [{"model": zoo["math"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": zoo["lang"], "parameters": {
                       "weight": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.5}],
                       "density": 0.8}}],
        "seed": 7, **extra}


def zoo_name(name: str) -> str:
    """A zoo model in a parametrization (which runs before the fixture): see resolve_zoo_names."""
    return f"<zoo:{name}>"


def resolve_zoo_names(data, zoo):
    if isinstance(data, dict):
        return {key: resolve_zoo_names(value, zoo) for key, value in data.items()}
    if isinstance(data, list):
        return [resolve_zoo_names(value, zoo) for value in data]
    if isinstance(data, str) and data.startswith("<zoo:"):
        return zoo[data[5:-1]]
    return data


def write_recipe(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_merge_loads_and_generates(zoo, tmp_path, merge_cli):
    recipe = write_recipe(tmp_path, recipe_dict(zoo, "dare_ties"))
    out = tmp_path / "merged"
    assert merge_cli(["merge", str(recipe), str(out), "--max-shard-size", "40000"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for name in ("config.json", "tokenizer.json", "README.md", "mergeflow_recipe.yaml"):
        assert (out / name).is_file(), name
    assert load_recipe(out / "mergeflow_recipe.yaml") == load_recipe(recipe)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("the cat sat on", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    assert isinstance(tokenizer.decode(generated[0]), str)
    merged = read_merged(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, merged[name]), name


@pytest.mark.parametrize("method, extra", [
    ("linear", {}), ("task_arithmetic", {"parameters": {"lambda": 0.8}}), ("ties", {}),
    ("ties", {"parameters": {"tie_break": "argsort"}}),
    ("dare_ties", {}), ("dare_linear", {}), ("della", {}), ("breadcrumbs_ties", {}),
    ("model_stock", {}),
    ("nuslerp", {}), ("nuslerp", {"parameters": {"nuslerp_flatten": False}, "base_model": None}),
    ("multislerp", {}), ("karcher", {}), ("sce", {"parameters": {"select_topk": 0.5}}),
    ("nearswap", {"models": [{"model": zoo_name("math")}], "parameters": {"t": 0.01}}),
    ("arcee_fusion", {"models": [{"model": zoo_name("math")}]}),
    ("ram", {"parameters": {"epsilon": 0.01}}), ("ramplus_tl", {"parameters": {"epsilon": 0.01}}),
])
def test_in_memory_matches_cli_bitwise(zoo, tmp_path, method, extra):
    recipe = recipe_from_dict(recipe_dict(zoo, method, **resolve_zoo_names(extra, zoo)))
    out = merge_to_dir(recipe, tmp_path / method)
    merger = InMemoryMerger(recipe, sort_magnitudes=method != "ties")
    model = merger.merge(recipe)
    state = model.state_dict()
    for name, tensor in read_merged(out).items():
        assert torch.equal(state[name], tensor), name
    assert merger.nonfinite_tensors() == []


def test_in_memory_reuses_one_model_and_matches_slices_with_methods(zoo, tmp_path):
    slices = {
        "merge_method": "linear", "base_model": zoo["base"], "seed": 3,
        "slices": [
            {"merge_method": "slerp", "parameters": {"t": 0.3},
             "sources": [{"model": zoo["base"], "layer_range": [0, 1]},
                         {"model": zoo["math"], "layer_range": [0, 1]}]},
            {"merge_method": "dare_ties",
             "sources": [{"model": zoo["math"], "layer_range": [1, 3], "parameters": {"density": 0.4}},
                         {"model": zoo["lang"], "layer_range": [1, 3], "parameters": {"density": 0.6}}]},
        ]}
    recipe = recipe_from_dict(slices)
    merger = InMemoryMerger([zoo["base"], zoo["math"], zoo["lang"]], base_model=zoo["base"])
    first = merger.merge(recipe_from_dict(recipe_dict(zoo, "linear")))
    pointers = {n: p.data_ptr() for n, p in first.state_dict().items()}
    second = merger.merge(recipe)
    assert second is first
    assert {n: p.data_ptr() for n, p in second.state_dict().items()} == pointers
    out = merge_to_dir(recipe, tmp_path / "slices")
    state = second.state_dict()
    for name, tensor in read_merged(out).items():
        assert torch.equal(state[name], tensor), name


def test_output_dtype_and_slerp_endpoint(zoo, tmp_path):
    recipe = recipe_from_dict({"merge_method": "slerp", "base_model": zoo["base"],
                               "models": [{"model": zoo["base"]}, {"model": zoo["math"]}],
                               "parameters": {"t": 1.0}})
    out = merge_to_dir(recipe, tmp_path / "bf16", dtype="bfloat16")
    merged = read_merged(out)
    math = load_file(Path(zoo["math"]) / "model.safetensors")
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, math[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_nonfinite_merge_is_reported(zoo):
    recipe = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": zoo["math"], "parameters": {"weight": 3e38}},
        {"model": zoo["lang"], "parameters": {"weight": 3e38}}], "parameters": {"normalize": False}})
    merger = InMemoryMerger(recipe)
    merger.merge(recipe)
    assert "model.norm.weight" in merger.nonfinite_tensors()  # ~1 * 6e38 overflows


# ---- bad input: each stops with a message naming the culprit


def _copy_model(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def _expect_error(recipe_data, match):
    with pytest.raises(MergeflowError, match=match):
        merge_to_dir(recipe_from_dict(recipe_data), Path("/nonexistent/never-written"))


def test_error_shape_mismatch(zoo, tmp_path):
    wide = make_model(tmp_path / "wide", 5, num_layers=3, intermediate=96)
    _expect_error(recipe_dict(zoo, "linear") | {"models": [zoo["math"], str(wide)]},
                  r"shape mismatch for 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'.*wide")


def test_error_missing_tensor(zoo, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    broken = _copy_model(zoo["lang"], tmp_path / "broken", lambda t: t.pop(name))
    _expect_error(recipe_dict(zoo) | {"models": [zoo["math"], broken]},
                  rf"'{name}' is missing from model '.*broken'")


def test_error_unknown_method(zoo):
    _expect_error(recipe_dict(zoo, "frankenmerge"), r"^recipe: merge_method: unknown merge method 'frankenmerge'; "
                                                     r"known methods: ")


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_error_density_outside_unit_interval(zoo, density):
    data = recipe_dict(zoo)
    data["models"][1]["parameters"]["density"] = density
    _expect_error(data, rf"density {density} of model '.*lang'.*outside \(0, 1\]")


def test_error_unknown_tie_break(zoo):
    data = recipe_dict(zoo, "ties", parameters={"tie_break": "sorted"})
    _expect_error(data, r"tie_break 'sorted' for tensor .*: expected one of index, argsort")


def test_error_nan_in_source(zoo, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(tensors):
        tensors[name][0, 0] = float("nan")

    poisoned = _copy_model(zoo["lang"], tmp_path / "poisoned", poison)
    data = recipe_dict(zoo) | {"models": [zoo["math"], poisoned]}
    with pytest.raises(MergeflowError, match=rf"'{name}' of model '.*poisoned' contains NaN or Inf"):
        merge_to_dir(recipe_from_dict(data), tmp_path / "out")
    with pytest.raises(MergeflowError, match=rf"'{name}' of model '.*poisoned' contains NaN or Inf"):
        InMemoryMerger(recipe_from_dict(data))


def test_error_slerp_needs_two_models(zoo):
    _expect_error(recipe_dict(zoo, "slerp", parameters={"t": 0.5}),
                  r"merge method 'slerp' merges exactly 1 model\(s\) besides the base; tensor '.*' has 2")


def test_error_nearswap_needs_t_and_one_model(zoo):
    one = {"models": [{"model": zoo["math"]}]}
    _expect_error(recipe_dict(zoo, "nearswap") | one, r"merge method 'nearswap' needs parameter 't'")
    _expect_error(recipe_dict(zoo, "nearswap", parameters={"t": 0.1}),
                  r"merge method 'nearswap' merges exactly 1 model\(s\) besides the base; tensor '.*' has 2")
    _expect_error(recipe_dict(zoo, "arcee_fusion") | {"base_model": None},
                  r"merge method 'arcee_fusion' needs a 'base_model'")


def test_nuslerp_without_a_base_merges_the_models(zoo):
    data = recipe_dict(zoo, "nuslerp") | {"base_model": None}
    plan = plan_merge(recipe_from_dict(data), open_sources(recipe_from_dict(data)))
    assert all(tensor.base is None and len(tensor.sources) == 2 for tensor in plan.tensors)
    _expect_error(data | {"models": [{"model": zoo["math"]}]},
                  r"merge method 'nuslerp' merges exactly 2 model\(s\); tensor '.*' has 1")


def test_karcher_merges_a_named_base_as_one_more_model(zoo):
    """As mergekit's planner: a models recipe's base joins the mean (appended when not listed);
    a slices recipe merges only its sources."""
    data = {"merge_method": "karcher", "base_model": zoo["base"], "models": [zoo["math"], zoo["lang"]]}
    recipe = recipe_from_dict(data)
    plan = plan_merge(recipe, open_sources(recipe))
    assert [model for model, _ in plan.tensors[0].sources] == [zoo["math"], zoo["lang"], zoo["base"]]
    assert plan.tensors[0].base is None
    listed = recipe_from_dict(data | {"models": [zoo["base"], zoo["math"], zoo["lang"]]})
    assert [m for m, _ in plan_merge(listed, open_sources(listed)).tensors[0].sources] == [
        zoo["base"], zoo["math"], zoo["lang"]]
    slices = recipe_from_dict({"merge_method": "karcher", "base_model": zoo["base"], "slices": [
        {"sources": [{"model": zoo[m], "layer_range": [0, 3]} for m in ("math", "lang")]}]})
    assert len(plan_merge(slices, open_sources(slices)).tensors[0].sources) == 2


def test_a_method_refusal_names_the_tensor():
    """multislerp refuses directions that cancel exactly; the message names the tensor."""
    from mergeflow.merge.plan import TensorPlan, merge_tensor
    from mergeflow.merge.registry import get_method

    values = {"base": torch.zeros(2), "a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 0.0]),
              "c": torch.tensor([2.0, 0.0]), "d": torch.tensor([-2.0, 0.0])}
    method = get_method("multislerp")
    plan = TensorPlan("model.norm.weight", method, [(m, "w") for m in "abcd"], ("base", "w"),
                      [{"weight": 1.0}] * 4, dict(method.method_defaults), 0, (2,))
    with pytest.raises(MergeflowError, match=r"^tensor 'model.norm.weight': multislerp: the weighted mean of "
                                             r"the models' directions is zero"):
        merge_tensor(plan, lambda model, name: values[model], "cpu")


def test_error_more_models_than_the_registry_allows(zoo, monkeypatch):
    """The planner reads ``max_models`` from the registry, whatever the method's name."""
    pair = MergeMethod(name="pair_linear", function=linear_merge, uses_base=False,
                       model_defaults={"weight": 1.0}, method_defaults={"normalize": True}, max_models=2)
    monkeypatch.setitem(MERGE_METHODS, pair.name, pair)
    two = recipe_from_dict({"merge_method": "pair_linear", "models": [zoo["math"], zoo["lang"]]})
    assert plan_merge(two, open_sources(two)).tensors[0].method is pair
    _expect_error({"merge_method": "pair_linear", "models": [zoo["base"], zoo["math"], zoo["lang"]]},
                  r"merge method 'pair_linear' merges 1 to 2 model\(s\); tensor '.*' has 3")


def test_error_pickled_weights_rejected(zoo, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(Path(zoo["math"]) / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    _expect_error(recipe_dict(zoo) | {"models": [str(pickled)]}, "pickled.*never loads")


def test_cli_reports_errors_with_exit_code(zoo, tmp_path, merge_cli, capsys):
    recipe = write_recipe(tmp_path, recipe_dict(zoo, "frankenmerge"))
    assert merge_cli(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "unknown merge method 'frankenmerge'" in capsys.readouterr().err


def test_in_memory_matches_cli_in_bfloat16(zoo, tmp_path):
    recipe = recipe_from_dict(recipe_dict(zoo, "dare_ties"))
    out = merge_to_dir(recipe, tmp_path / "bf16", dtype="bfloat16")
    state = InMemoryMerger(recipe, dtype="bfloat16").merge(recipe).state_dict()
    for name, tensor in read_merged(out).items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_merge_held_tensor_by_tensor_is_the_merge_the_model_holds(zoo, dtype, method):
    """What the gradient reads (one tensor's merge with its masks held, seeded drops included) is,
    to rounding, what a merge writes into the model, and reading it leaves the model as it was."""
    recipe = recipe_from_dict(recipe_dict(zoo, method))
    merger = InMemoryMerger(recipe, dtype=dtype)
    state = {name: tensor.clone() for name, tensor in merger.merge(recipe).state_dict().items()}
    other = recipe_from_dict(recipe_dict(zoo, "task_arithmetic"))
    for tensor_plan in merger.plan(other).tensors:
        merger.masked_terms(tensor_plan)  # another merge, read and dropped
    for tensor_plan in merger.plan(recipe).tensors:
        held = merger.masked_terms(tensor_plan).at().to(state[tensor_plan.name].dtype)
        torch.testing.assert_close(held, state[tensor_plan.name], msg=tensor_plan.name)
    assert all(torch.equal(t, state[n]) for n, t in merger.model.state_dict().items())


def test_cli_merge_of_the_embedded_zoo_generates(tiny_zoo, tmp_path, merge_cli):
    """The zoo's experts merged through the CLI: a standard HF model that generates L2 text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(tiny_zoo / "base"),
        "models": [{"model": str(tiny_zoo / "math"), "parameters": {"weight": [1.2, 0.5]}},
                   {"model": str(tiny_zoo / "lang"), "parameters": {"weight": 0.6}}]})
    out = tmp_path / "merged"
    assert merge_cli(["merge", str(recipe), str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("tom has 12 apples and gets 30 more .", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.decode(generated[0], skip_special_tokens=True).startswith("tom has 12 apples")


def test_error_misspelt_parameter_is_named_not_ignored(zoo, tmp_path, merge_cli, capsys):
    data = recipe_dict(zoo)
    data["models"][0]["parameters"] = {"wieght": 0.7, "density": 0.5}
    _expect_error(data, r"recipe: models: model '.*math': parameter 'wieght' is read by no merge method; "
                        r"per-model parameters merge methods read: .*weight; did you mean 'weight'\?")
    _expect_error(recipe_dict(zoo, parameters={"lamda": 0.9}),
                  r"recipe: parameters: parameter 'lamda' .*did you mean 'lambda'\?")
    # slerp's t is a method parameter: given per model it would be ignored
    slerp = {"merge_method": "slerp", "base_model": zoo["base"],
             "models": [{"model": zoo["math"], "parameters": {"t": 0.3}}]}
    _expect_error(slerp, r"model '.*math': parameter 't' is read by no merge method; per-model")
    recipe = write_recipe(tmp_path, data)
    assert merge_cli(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "parameter 'wieght'" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- the CLI checks what the pipeline's check stage checks, before any tensor is merged


def _cli_error(merge_cli, capsys, tmp_path, data, out=None) -> str:
    recipe = write_recipe(tmp_path, data)
    out = out or tmp_path / "out"
    assert merge_cli(["merge", str(recipe), str(out)]) == 2
    assert not Path(out).exists()
    return capsys.readouterr().err


def test_cli_refuses_an_extra_tensor(zoo, tmp_path, merge_cli, capsys):
    extra = _copy_model(zoo["lang"], tmp_path / "extra", lambda t: t.update(stray=torch.zeros(3)))
    err = _cli_error(merge_cli, capsys, tmp_path, recipe_dict(zoo) | {"models": [zoo["math"], extra]})
    assert f"model '{extra}': tensor 'stray' is not in the base '{zoo['base']}'" in err


def test_cli_refuses_another_model_type_and_another_vocabulary(zoo, tmp_path, merge_cli, capsys):
    other = Path(_copy_model(zoo["lang"], tmp_path / "other", lambda t: None))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    err = _cli_error(merge_cli, capsys, tmp_path, recipe_dict(zoo) | {"models": [zoo["math"], str(other)]})
    assert f"model '{other}': config field 'model_type' is 'mistral' but the base" in err

    swapped = Path(_copy_model(zoo["lang"], tmp_path / "swapped", lambda t: None))
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    err = _cli_error(merge_cli, capsys, tmp_path, recipe_dict(zoo) | {"models": [zoo["math"], str(swapped)]})
    assert (f"model '{swapped}': token {second!r} has id {vocab[second]} but id {vocab[first]} in the base "
            f"'{zoo['base']}' vocabulary; set tokenizer_source: union or base") in err


def test_cli_refuses_an_output_inside_a_source_model(zoo, tmp_path, merge_cli, capsys):
    inside = Path(zoo["math"]) / "merged"
    err = _cli_error(merge_cli, capsys, tmp_path, recipe_dict(zoo), out=inside)
    assert f"output directory '{inside}' is inside the source model '{zoo['math']}'" in err
    assert not inside.exists()


def test_cli_weights_an_exponent_number_refuses_nan_and_warns_beyond_a_bound(zoo, tmp_path, merge_cli, capsys):
    recipe = tmp_path / "r.yaml"
    text = yaml.safe_dump({"merge_method": "linear", "models": [{"model": zoo["math"], "parameters": {"weight": 0.6}},
                                                                {"model": zoo["lang"], "parameters": {"weight": 0.5}}]})
    recipe.write_text(text.replace("weight: 0.6", "weight: 1.0e30"))  # YAML 1.1 would read a string
    assert merge_cli(["merge", str(recipe), str(tmp_path / "big")]) == 0
    assert f"mergeflow: WARNING: weight 1e+30 of model '{zoo['math']}' is beyond +-1000" in capsys.readouterr().err
    recipe.write_text(text.replace("weight: 0.6", "weight: .nan"))
    assert merge_cli(["merge", str(recipe), str(tmp_path / "nan")]) == 2
    assert "weight nan of model" in capsys.readouterr().err and not (tmp_path / "nan").exists()


def test_cli_names_a_yaml_error_with_its_line_and_a_config_link_loop(zoo, tmp_path, merge_cli, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: [\n  - model: x\n")
    assert merge_cli(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert f"recipe '{recipe}' is not valid YAML at line 3, column 3" in capsys.readouterr().err

    looped = Path(_copy_model(zoo["lang"], tmp_path / "looped", lambda t: None))
    (looped / "config.json").unlink()
    (looped / "config.json").symlink_to(looped / "config.json")
    err = _cli_error(merge_cli, capsys, tmp_path, recipe_dict(zoo) | {"models": [zoo["math"], str(looped)]})
    assert f"'{looped / 'config.json'}' is a symbolic link loop" in err
