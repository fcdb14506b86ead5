"""The check stage names the model and tensor at fault before any heavy work."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeflow.check import run_check, run_model_check, weights_fingerprint
from mergeflow.errors import MergeflowError


def _models(zoo, **extra):
    models = {name: {"path": str(zoo / name)} for name in ["base", "math", "lang"]}
    models.update({k: {"path": str(v)} for k, v in extra.items()})
    return models


def test_check_passes_and_writes_report(tiny_zoo, tmp_path):
    report = run_check(_models(tiny_zoo), "base", tmp_path / "check.json")
    assert json.loads((tmp_path / "check.json").read_text()) == report
    assert report["models"]["math"]["parameters"] == report["models"]["base"]["parameters"]


def test_missing_model_directory_is_named(tiny_zoo, tmp_path):
    with pytest.raises(MergeflowError, match="model 'ghost': directory .* does not exist"):
        run_check(_models(tiny_zoo, ghost=tmp_path / "ghost"), "base", tmp_path / "c.json")


def test_shape_mismatch_is_named(tiny_zoo, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_zoo / "math", bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeflowError, match=rf"model 'bad': tensor '{key}' has shape \[129, 64\] but the base"):
        run_check(_models(tiny_zoo, bad=bad), "base", tmp_path / "c.json")


def test_missing_safetensors_file_is_named(tiny_zoo, tmp_path):
    bad = tmp_path / "noweights"
    shutil.copytree(tiny_zoo / "math", bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(MergeflowError, match="model 'noweights': no safetensors file in"):
        run_check(_models(tiny_zoo, noweights=bad), "base", tmp_path / "c.json")


def test_missing_shard_named_in_index_is_named(tiny_zoo, tmp_path):
    bad = tmp_path / "sharded"
    shutil.copytree(tiny_zoo / "math", bad)
    names = list(load_file(bad / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    (bad / "model.safetensors").rename(bad / "model-00001-of-00002.safetensors")
    with pytest.raises(MergeflowError, match="safetensors file 'model-00002-of-00002.safetensors' named in"):
        run_check(_models(tiny_zoo, sharded=bad), "base", tmp_path / "c.json")


def test_tokenizer_mismatch_is_named(tiny_zoo, tmp_path):
    bad = tmp_path / "othertok"
    shutil.copytree(tiny_zoo / "math", bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["\u2581zzz"] = vocab.pop("\u2581tom")
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MergeflowError, match=r"model 'othertok': token '\u2581zzz' \(id \d+\) is not in the base "
                                             r"'base' vocabulary; set the config's tokenizer_source"):
        run_check(_models(tiny_zoo, othertok=bad), "base", tmp_path / "c.json")


def test_a_missing_tokenizer_json_is_named_not_blamed_on_sentencepiece(tiny_zoo, tmp_path):
    bad = tmp_path / "notok"
    shutil.copytree(tiny_zoo / "math", bad)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(MergeflowError, match=r"model 'notok': '.*notok/tokenizer\.json' is missing .*copy the tokenizer "
                                             r"files") as err:
        run_check(_models(tiny_zoo, notok=bad), "base", tmp_path / "c.json")
    assert "sentencepiece" not in str(err.value)


def test_nan_weights_fail_the_check_of_any_model(tiny_zoo, tmp_path):
    """Not only the endpoints a merge reads: every model's check reads every tensor."""
    bad = tmp_path / "extra"
    shutil.copytree(tiny_zoo / "math", bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 3] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeflowError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj\.weight' of model 'extra' "
                                             r"contains NaN or Inf"):
        run_model_check("extra", _models(tiny_zoo, extra=bad), "base", tmp_path / "check" / "extra.json")
    assert not (tmp_path / "check" / "extra.json").exists()


def test_a_models_check_records_the_fingerprint_of_its_weights(tiny_zoo, tmp_path):
    model = tmp_path / "math"
    shutil.copytree(tiny_zoo / "math", model)
    report = run_model_check("math", _models(tiny_zoo, math=model), "base", tmp_path / "math.json")
    assert report["model"] == "math" and report["fingerprint"] == weights_fingerprint("math", model)
    assert json.loads((tmp_path / "math.json").read_text()) == report
    assert weights_fingerprint("math", model) == weights_fingerprint("math", tiny_zoo / "math")  # content, not place
    # weights replaced by others of the same size and names: a new fingerprint
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] *= 1.5
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert (model / "model.safetensors").stat().st_size == (tiny_zoo / "math" / "model.safetensors").stat().st_size
    assert weights_fingerprint("math", model) != report["fingerprint"]


@pytest.mark.parametrize("fault, message", [
    ("loop", r"'{path}' is a symbolic link loop"),
    ("dangling", r"'{path}' is a link to '.*nowhere.json', which does not exist"),
])
def test_an_unreadable_config_is_named_with_the_real_reason(tiny_zoo, tmp_path, fault, message):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_zoo / "math", bad)
    config = bad / "config.json"
    config.unlink()
    config.symlink_to(config if fault == "loop" else tmp_path / "nowhere.json")
    with pytest.raises(MergeflowError, match="model 'bad': " + message.format(path=config)):
        run_model_check("bad", _models(tiny_zoo, bad=bad), "base", tmp_path / "c.json")
