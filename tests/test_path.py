"""Layer paths: the fold into plain weights is exact, the in-memory path equals its export, and
the passthrough recipe round-trips."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from factories import make_model
from mergeflow.errors import MergeflowError
from mergeflow.merge.assemble import PathAssembler, reference_logits
from mergeflow.merge.path import Hop, LayerPath, export_path, path_from_dict

IDS = torch.tensor([[1, 5, 9, 12, 3, 7, 20, 4, 11, 2]])


def set_eps(directory, eps: float) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = eps
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two untrained Llamas (3 and 2 layers) whose RMSNorm eps is negligible next to their hidden
    states (untrained, their mean squared state is ~4e-4, so the default 1e-6 is not: see
    test_fold_eps_caveat)."""
    root = tmp_path_factory.mktemp("path_models")
    torch.set_num_threads(1)
    a = make_model(root / "a", 0, num_layers=3)
    b = make_model(root / "b", 1, num_layers=2)
    for directory in (a, b):
        set_eps(directory, 1e-12)
    return str(a), str(b)


def hand_path(a: str, b: str) -> LayerPath:
    # A0, B1 (x0.7), A1 (x1.3), A1 again (x0.9), B0, A2 (x1.1): duplicates, both models, scales
    return LayerPath([Hop(a, 0), Hop(b, 1, 0.7), Hop(a, 1, 1.3), Hop(a, 1, 0.9), Hop(b, 0), Hop(a, 2, 1.1)], a,
                     dtype="float32")


def exported_logits(directory) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def test_fold_is_exact(models, tmp_path):
    """Exported (scales folded into o_proj/down_proj) == the path with explicit scaling, float32."""
    a, b = models
    path = hand_path(a, b)
    out = export_path(path, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config
    reference = reference_logits(path, IDS)
    exported = exported_logits(out)
    assert torch.allclose(exported, reference, atol=1e-5, rtol=0)
    # the scales matter: without them the logits differ by far more than the tolerance
    plain = LayerPath([Hop(h.model, h.layer) for h in path.hops], a)
    assert (reference_logits(plain, IDS) - reference).abs().max() > 1e-2


def test_fold_eps_caveat(models, tmp_path):
    """With eps not negligible the fold is exact only up to eps/S_k^2 in each norm: the
    difference is there, and shrinks with eps."""
    import shutil

    a, b = models
    gaps = []
    for eps in (1e-6, 1e-8):
        copies = []
        for name in (a, b):
            copy = tmp_path / f"{eps}" / name.rsplit("/", 1)[1]
            shutil.copytree(name, copy)
            set_eps(copy, eps)
            copies.append(str(copy))
        path = LayerPath([Hop(copies[0] if h.model == a else copies[1], h.layer, h.scale) for h in hand_path(a, b).hops],
                         copies[0])
        exported = exported_logits(export_path(path, tmp_path / f"{eps}" / "out"))
        gaps.append(float((exported - reference_logits(path, IDS)).abs().max()))
    assert gaps[0] > 1e-5 and gaps[1] < gaps[0] / 10


def test_in_memory_equals_export(models, tmp_path):
    """A hand-written path assembled over resident layers == its exported directory loaded with
    AutoModelForCausalLM (no trust_remote_code); assembly copies no weights."""
    a, b = models
    path = hand_path(a, b)
    assembler = PathAssembler([a, b])
    model = assembler.merge(path)
    hops = model.model.layers
    assert hops[2].layer is hops[3].layer is assembler.layers[a][1]  # a duplicated layer is one module
    with torch.inference_mode():
        memory = model(input_ids=IDS).logits
    exported = exported_logits(export_path(path, tmp_path / "out"))
    assert torch.allclose(memory, exported, atol=1e-5, rtol=0)


def test_the_outer_weights_follow_mergekit_in_memory_and_in_the_export(models, tmp_path):
    """A path that starts and ends in B, on A's config: B's embeddings, final norm and LM head (as
    mergekit's passthrough takes them from the first and last slices' models), the same in memory,
    in the export and by definition; with A's they would differ."""
    from safetensors.torch import load_file

    a, b = models
    path = LayerPath([Hop(b, 1), Hop(a, 1, 1.2), Hop(b, 0)], a, dtype="float32")
    assert {name: path.outer_model(name) for name in ("model.embed_tokens.weight", "model.norm.weight",
                                                      "lm_head.weight")} == {
        "model.embed_tokens.weight": b, "model.norm.weight": b, "lm_head.weight": b}
    out = export_path(path, tmp_path / "out")
    weights = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    theirs = load_file(f"{b}/model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(weights[name], theirs[name])
    reference = reference_logits(path, IDS)
    with torch.inference_mode():
        memory = PathAssembler([a, b]).merge(path)(input_ids=IDS).logits
    exported = exported_logits(out)
    assert torch.allclose(exported, reference, atol=1e-5, rtol=0) and torch.allclose(memory, exported, atol=1e-5, rtol=0)
    on_a = LayerPath([Hop(a, 0), *path.hops, Hop(a, 2)], a)  # the same blocks between A's outer weights
    assert (reference_logits(on_a, IDS) - reference).abs().max() > 1e-3


def test_generation_uses_a_cache_slot_per_hop(models, tmp_path):
    """Greedy generation with a KV cache: the in-memory path (layers repeated) and the export agree."""
    from transformers import AutoModelForCausalLM

    a, b = models
    path = hand_path(a, b)
    model = PathAssembler([a, b]).merge(path)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    memory = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kwargs)
    exported = AutoModelForCausalLM.from_pretrained(export_path(path, tmp_path / "out"), dtype=torch.float32)
    assert torch.equal(memory, exported.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), **kwargs))


def test_recipe_is_a_mergekit_passthrough_and_round_trips(models):
    a, b = models
    path = hand_path(a, b)
    data = yaml.safe_load(path.to_yaml())
    assert data["merge_method"] == "passthrough"
    first, second = data["slices"][0]["sources"][0], data["slices"][1]["sources"][0]
    assert first == {"model": a, "layer_range": [0, 1]}
    scale = second["parameters"]["scale"]  # 1/S_1 on o_proj and down_proj, 1 elsewhere
    assert scale == [{"filter": "self_attn.o_proj", "value": pytest.approx(1 / 0.7)},
                     {"filter": "mlp.down_proj", "value": pytest.approx(1 / 0.7)}, {"value": 1.0}]
    back = path_from_dict(data)
    assert [(h.model, h.layer) for h in back.hops] == [(h.model, h.layer) for h in path.hops]
    assert [h.scale for h in back.hops] == pytest.approx([h.scale for h in path.hops])
    # consecutive layers of one model without scales make one slice
    plain = LayerPath([Hop(a, 0), Hop(a, 1), Hop(a, 2)], a)
    assert yaml.safe_load(plain.to_yaml())["slices"] == [{"sources": [{"model": a, "layer_range": [0, 3]}]}]


def test_bad_paths_are_refused_by_name(models, tmp_path):
    a, b = models
    with pytest.raises(MergeflowError, match="not positive"):
        LayerPath([Hop(a, 0), Hop(b, 1, -0.5)], a).to_yaml()
    with pytest.raises(MergeflowError, match="no layer 5"):
        export_path(LayerPath([Hop(a, 0), Hop(b, 5)], a), tmp_path / "x")
    wide = make_model(tmp_path / "wide", 3, num_layers=2, hidden=96, intermediate=128)
    with pytest.raises(MergeflowError, match="hidden_size 96"):
        export_path(LayerPath([Hop(a, 0), Hop(str(wide), 1)], a), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("key, value, message", [
    ("max_position_embeddings", 32, "max_position_embeddings 32, fewer than model"),
    ("rope_parameters", {"rope_theta": 500000.0, "rope_type": "default"}, "rope_parameters"),
    ("num_key_value_heads", 4, "num_key_value_heads 4"),
])
def test_a_source_whose_attention_or_positions_differ_is_refused_by_name(models, tmp_path, key, value, message):
    """The exported model runs every hop with the base's heads and rotary encoding up to the
    base's max_position_embeddings: a source trained otherwise is named before any tensor is read."""
    a, _ = models
    other = make_model(tmp_path / "other", 5, num_layers=2)
    config = json.loads((other / "config.json").read_text())
    config[key] = value
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeflowError, match=message):
        export_path(LayerPath([Hop(a, 0), Hop(str(other), 1)], a), tmp_path / "z")
    assert not (tmp_path / "z").exists()


def test_pareto_members_of_a_data_flow_run_are_exported_and_scored(models, tmp_path):
    """A Pareto member that is a layer path (deeper than its base) becomes a plain model that the
    evaluator loads and scores; its card lists the path."""
    import pandas as pd

    from mergeflow.merge.recipe import recipe_hash
    from mergeflow.report import pareto_members

    a, b = models
    path = hand_path(a, b)
    front = pd.DataFrame([{"generation": 0, "index": 3, "recipe_hash": recipe_hash(path), "recipe": path.to_yaml(),
                           "fitness_t": 0.5, "problem": ""}])
    front.to_parquet(tmp_path / "pareto.parquet")
    items = pd.DataFrame({"item_id": ["i0", "i1"], "prompt": ["tom has 3", "ann has 5"],
                          "choices": [["apples", "pens"], ["pens", "apples"]], "answer": [0, 1], "target": ["", ""]})
    items.to_parquet(tmp_path / "test.parquet")
    tasks = {"t": {"split": str(tmp_path / "test.parquet"), "scorer": "mc_loglik", "delimiter": " "}}
    table = pareto_members("dfs", str(tmp_path / "pareto.parquet"), tasks, {}, tmp_path / "members",
                           tmp_path / "table.parquet", tmp_path / "pareto.md")
    member = tmp_path / "members" / "member_00"
    assert json.loads((member / "config.json").read_text())["num_hidden_layers"] == 6
    assert "## Layer path" in (member / "README.md").read_text() and "Pareto member 0" in (member / "README.md").read_text()
    assert len(table) == 1 and table["items"].iloc[0] == 2
