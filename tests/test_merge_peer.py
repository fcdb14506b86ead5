"""Tensor parity with mergekit on tiny models, for every deterministic method both implement.

mergekit is no dependency of mergeflow: it runs from the virtualenv that ``bench/merge.py``
creates (``MERGEFLOW_PEER_VENV``, default the bench's), and this test is skipped without it.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from factories import make_zoo
from mergeflow.merge import merge_to_dir, recipe_from_dict

PEER_VENV = Path(os.environ.get("MERGEFLOW_PEER_VENV",
                                Path.home() / ".cache" / "mergeflow" / "bench" / "mergekit-0.1.5"))
MERGEKIT = PEER_VENV / "bin" / "mergekit-yaml"
# mergekit-yaml in fresh processes: slow; skipped without the peer's virtualenv
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MERGEKIT.is_file(), reason=f"no mergekit at {MERGEKIT}")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    paths = make_zoo(root, num_layers=2)
    from factories import make_model
    paths["code"] = str(make_model(root / "code", 3, 2, base=Path(paths["base"])))
    return paths


# Recipes of the methods mergekit 0.1.5 added, by case id: (method, models with their weights
# (None: no parameters), parameters, whether the base is named). Parameters are chosen so each
# method's selections bite on the tiny models' task vectors (noise of sd 0.02).
NEW_CASES = {
    "nuslerp": ("nuslerp", (("math", 0.6), ("lang", 0.4)), {}, True),
    "nuslerp-no-base": ("nuslerp", (("math", 0.6), ("lang", 0.4)), {}, False),
    "nuslerp-rows": ("nuslerp", (("math", 0.3), ("lang", 0.7)), {"nuslerp_flatten": False}, True),
    "nuslerp-columns": ("nuslerp", (("math", 0.3), ("lang", 0.7)),
                        {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
    "multislerp": ("multislerp", (("math", 0.5), ("lang", 0.3), ("code", 0.2)), {}, True),
    "multislerp-no-base": ("multislerp", (("math", 0.5), ("lang", 0.3), ("code", 0.2)),
                           {"normalize_weights": False}, False),
    "karcher": ("karcher", (("math", None), ("lang", None), ("code", None)), {}, False),
    # mergekit merges a models recipe's base as one more model for karcher
    "karcher-with-base": ("karcher", (("math", None), ("lang", None)), {"max_iter": 20, "tol": 1e-6}, True),
    "sce": ("sce", (("math", None), ("lang", None), ("code", None)), {}, True),
    "sce-topk": ("sce", (("math", None), ("lang", None), ("code", None)), {"select_topk": 0.3}, True),
    # mergekit's memory option, read and changing no value
    "sce-int8-mask": ("sce", (("math", None), ("lang", None), ("code", None)),
                      {"select_topk": 0.5, "int8_mask": True}, True),
    "model_stock-filter-wise": ("model_stock", (("math", None), ("lang", None), ("code", None)),
                                {"filter_wise": True}, True),
    "nearswap": ("nearswap", (("math", None),), {"t": 0.015}, True),
    "arcee_fusion": ("arcee_fusion", (("math", None),), {}, True),
    "ram": ("ram", (("math", None), ("lang", None), ("code", None)), {"epsilon": 0.02}, True),
    "ramplus_tl": ("ramplus_tl", (("math", None), ("lang", None), ("code", None)),
                   {"epsilon": 0.03, "r": 0.5, "alpha": 0.6}, True),
}


def new_recipe(zoo, case):
    method, models, parameters, with_base = NEW_CASES[case]
    data = {"merge_method": method, "dtype": "float32",
            "models": [{"model": zoo[name], **({} if weight is None else {"parameters": {"weight": weight}})}
                       for name, weight in models]}
    if parameters:
        data["parameters"] = dict(parameters)
    if with_base:
        data["base_model"] = zoo["base"]
    return data


# Variants of the task-vector methods' recipes, by suffix: mergekit's options
VARIANTS = {"-int8-mask": {"int8_mask": True}, "-rescale": {"rescale": True}}


def recipe(zoo, method):
    if method in NEW_CASES:
        return new_recipe(zoo, method)
    if method == "slerp":
        return {"merge_method": method, "base_model": zoo["base"], "parameters": {"t": 0.3},
                "models": [{"model": zoo["base"]}, {"model": zoo["math"]}]}
    models = [{"model": zoo[name], "parameters": {"weight": weight, "density": 0.5}}
              for name, weight in (("math", 0.5), ("lang", 0.3), ("code", 0.2))]
    parameters = {}
    for suffix, options in VARIANTS.items():  # a method's variant: its options added
        if method.endswith(suffix):
            method, parameters = method.removesuffix(suffix), options
    if method in ("linear", "task_arithmetic", "model_stock"):
        for model in models:
            model["parameters"].pop("density")
            if method == "model_stock":
                model.pop("parameters")
    data = {"merge_method": method, "models": models}
    if parameters:
        data["parameters"] = dict(parameters)
    if method != "linear":
        data["base_model"] = zoo["base"]
    return data


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    result = {}
    for file in model_dir.glob("*.safetensors"):
        result.update(load_file(file))
    return result


METHODS = ["linear", "task_arithmetic", "ties", "ties-int8-mask", "ties-rescale", "breadcrumbs", "breadcrumbs-rescale",
           "breadcrumbs_ties", "slerp", "model_stock", *NEW_CASES]

# mergekit-yaml's own two calls, for several recipes in one process (each start costs seconds)
RUN_MERGES = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
    source = open(recipe).read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(source)), out,
              options=MergeOptions(cuda=False, quiet=True), config_source=source)
"""


def run_mergekit(pairs: list[tuple[Path, Path]]) -> None:
    """mergekit merges each recipe file into its output directory."""
    subprocess.run([str(PEER_VENV / "bin" / "python"), "-c", RUN_MERGES, *[str(p) for pair in pairs for p in pair]],
                   check=True, capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})


@pytest.fixture(scope="module")
def mergekit_outputs(zoo, tmp_path_factory):
    """Every method's recipe merged by mergekit, in one process."""
    root = tmp_path_factory.mktemp("mergekit")
    pairs = []
    for method in METHODS:
        (root / f"{method}.yaml").write_text(yaml.safe_dump(recipe(zoo, method)))
        pairs.append((root / f"{method}.yaml", root / method))
    run_mergekit(pairs)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_matches_mergekit(zoo, mergekit_outputs, tmp_path, method):
    ours = tensors(merge_to_dir(recipe_from_dict(recipe(zoo, method)), tmp_path / "mergeflow"))
    theirs = tensors(mergekit_outputs / method)
    assert set(ours) == set(theirs)
    worst = max(float((tensor - theirs[name]).abs().max()) for name, tensor in ours.items())
    print(f"PARITY {method} max|diff| {worst:.2e} over {len(ours)} tensors")
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_argsort_tie_break_matches_mergekit_at_tied_cuts(zoo, tmp_path, method):
    """Fine-tunes whose task vectors sit on a coarse grid tie in magnitude at most cuts; with
    ``tie_break: argsort`` mergeflow keeps the tied entries mergekit keeps (TIES: the first of a
    descending sort; Breadcrumbs: a run of an ascending one), so every entry matches (with the
    default, the tied entries kept by flat index differ)."""
    from safetensors.torch import save_file

    base = tensors(Path(zoo["base"]))
    generator = torch.Generator().manual_seed(5)
    models = {}
    # a grid per model, so that the weighted task vectors do not cancel exactly (a tie of the
    # sign election, which this test is not about)
    for name, step in (("math", 1 / 64), ("lang", 1 / 61), ("code", 1 / 59)):
        out = tmp_path / f"grid-{name}"
        shutil.copytree(zoo[name], out)
        for file in out.glob("*.safetensors"):
            grid = {key: base[key] + torch.round(torch.randn(t.shape, generator=generator) / (8 * step)) * step
                    for key, t in load_file(file).items()}
            save_file(grid, file, metadata={"format": "pt"})
        models[name] = str(out)
    data = recipe({**zoo, **models}, method)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    run_mergekit([(tmp_path / "recipe.yaml", tmp_path / "mergekit")])
    theirs = tensors(tmp_path / "mergekit")
    by_index = tensors(merge_to_dir(recipe_from_dict(data), tmp_path / "index"))
    assert any(not torch.equal(by_index[name], theirs[name]) for name in theirs)
    ours = tensors(merge_to_dir(recipe_from_dict({**data, "parameters": {"tie_break": "argsort"}}), tmp_path / "argsort"))
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_layer_path_recipe_rebuilds_in_mergekit(zoo, tmp_path):
    """The passthrough recipe a layer path writes rebuilds the same weights in mergekit (scales
    folded into o_proj and down_proj by mergekit's per-tensor ``scale``), the weights outside the
    blocks included: one path within its base, one that starts in math and ends in lang (mergekit
    takes the embeddings from the first slice's model, the final norm and head from the last's)."""
    from mergeflow.merge.path import Hop, LayerPath, export_path

    within = LayerPath([Hop(zoo["base"], 0), Hop(zoo["math"], 1, 0.8), Hop(zoo["math"], 1, 1.25),
                        Hop(zoo["lang"], 0, 1.5), Hop(zoo["base"], 1)], base_model=zoo["base"])
    across = LayerPath([Hop(zoo["math"], 0), Hop(zoo["base"], 1, 1.1), Hop(zoo["lang"], 1)], base_model=zoo["base"])
    for name, path in (("within", within), ("across", across)):
        (tmp_path / f"{name}.yaml").write_text(path.to_yaml())
        run_mergekit([(tmp_path / f"{name}.yaml", tmp_path / f"{name}-mergekit")])
        ours = tensors(export_path(path, tmp_path / f"{name}-mergeflow"))
        theirs = tensors(tmp_path / f"{name}-mergekit")
        assert set(ours) == set(theirs)
        assert any(f".{len(path) - 1}." in tensor for tensor in ours)
        for tensor, value in ours.items():
            torch.testing.assert_close(value, theirs[tensor], rtol=0, atol=1e-6, msg=f"{name}: {tensor}")
    assert not torch.equal(tensors(tmp_path / "across-mergekit")["model.norm.weight"],
                           tensors(Path(zoo["base"]))["model.norm.weight"])  # lang's norm, not the base's


ROUND_TRIP = """
import sys, yaml
from mergekit.config import MergeConfiguration
for path in sys.argv[1:]:
    config = MergeConfiguration.model_validate(yaml.safe_load(open(path).read()))
    open(path, "w").write(config.to_yaml())
"""


@pytest.mark.slow
def test_new_method_recipes_round_trip_through_mergekit(zoo, tmp_path):
    """Each new method's recipe as mergeflow writes it is read by mergekit's configuration, and
    what mergekit writes back reads as the same recipe (mergekit drops ``seed``: 0 here)."""
    from mergeflow.merge.recipe import recipe_from_yaml

    recipes = {case: recipe_from_dict(new_recipe(zoo, case)) for case in NEW_CASES}
    for case, ours in recipes.items():
        (tmp_path / f"{case}.yaml").write_text(ours.to_yaml())
    subprocess.run([str(PEER_VENV / "bin" / "python"), "-c", ROUND_TRIP,
                    *[str(tmp_path / f"{case}.yaml") for case in recipes]],
                   check=True, capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    for case, ours in recipes.items():
        assert recipe_from_yaml((tmp_path / f"{case}.yaml").read_text()) == ours, case
