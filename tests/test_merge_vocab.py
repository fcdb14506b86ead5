"""Merging models whose vocabularies differ (``tokenizer_source: union | base | MODEL`` and
``tokenizer.tokens``): the rows by hand, the output model and tokenizer, the refusals, and tensor
parity with mergekit 0.1.5 (slow; skipped without its virtualenv, as ``test_merge_peer``)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from factories import make_zoo, with_added_tokens
from mergeflow import cli
from mergeflow.check import check_merge_sources
from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.merge import InMemoryMerger, merge_to_dir, recipe_from_dict

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# the tiny zoo's tokenizer has 81 tokens; a adds <tool> <call> (81, 82), b <call> <think> (81, 82, special)
BASE_TOKENS = 81


@pytest.fixture(scope="module")
def vzoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vzoo")
    zoo = make_zoo(root, num_layers=2)
    return {**zoo,
            "a": with_added_tokens(Path(zoo["math"]), root / "a", ["<tool>", "<call>"], seed=11),
            "b": with_added_tokens(Path(zoo["lang"]), root / "b", ["<call>", "<think>"], seed=12, special=True)}


def tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def vocab_of(model_dir) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).get_vocab()


def linear(vzoo, source="union", **extra):
    """base 0.2, a 0.5, b 0.3 (weights summing to 1: a row all models share is the row)."""
    return {"merge_method": "linear", "base_model": vzoo["base"], "dtype": "float32",
            "models": [{"model": vzoo[name], "parameters": {"weight": weight}}
                       for name, weight in (("base", 0.2), ("a", 0.5), ("b", 0.3))],
            **({"tokenizer_source": source} if source else {}), **extra}


@pytest.fixture(scope="module")
def union_out(vzoo, tmp_path_factory):
    return merge_to_dir(recipe_from_dict(linear(vzoo)), tmp_path_factory.mktemp("union") / "out")


def test_union_permutes_each_models_rows_and_fills_the_missing_ones(vzoo, union_out):
    """Each model brings its own rows of its tokens; a token it lacks brings the one model's row
    that has it (<tool>, <think>) or, with no base row, the mean of those that have it (<call>
    for the base); the linear merge then runs on all three."""
    ours, vocab = tensors(union_out), vocab_of(union_out)
    assert [vocab[t] for t in ("<tool>", "<call>", "<think>")] == [81, 82, 83] and len(vocab) == 84
    for name in (EMBED, HEAD):
        base, a, b = (tensors(vzoo[m])[name] for m in ("base", "a", "b"))
        merged = ours[name]
        assert merged.shape == (84, 64)
        torch.testing.assert_close(merged[:BASE_TOKENS], 0.2 * base + 0.5 * a[:BASE_TOKENS] + 0.3 * b[:BASE_TOKENS])
        torch.testing.assert_close(merged[81], a[81])  # <tool>: a's row for all three
        torch.testing.assert_close(merged[82], 0.2 * (a[82] + b[81]) / 2 + 0.5 * a[82] + 0.3 * b[81])  # <call>
        torch.testing.assert_close(merged[83], b[82])  # <think>: b's row for all three


def test_the_union_output_loads_and_its_tokenizer_encodes_every_added_token(vzoo, union_out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(union_out)
    assert json.loads((union_out / "config.json").read_text())["vocab_size"] == len(tokenizer) == 84
    for token in ("<tool>", "<call>", "<think>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.get_vocab()[token]]
        assert tokenizer.get_vocab()[token] in tokenizer(f"tom has {token} 3 apples")["input_ids"]
    assert tokenizer.added_tokens_decoder[83].special and not tokenizer.added_tokens_decoder[82].special
    model = AutoModelForCausalLM.from_pretrained(union_out)
    logits = model(**tokenizer("tom <tool> has <call> <think> 3", return_tensors="pt")).logits
    assert logits.shape[-1] == 84 and bool(torch.isfinite(logits).all())


def test_base_and_model_sources_take_that_vocabulary(vzoo, tmp_path):
    """``base``: the base's 81 tokens, every other row dropped; ``b``: b's 83, <call> filled for the
    base with the mean of a's and b's rows (the models that have it), <tool> dropped."""
    base_out = merge_to_dir(recipe_from_dict(linear(vzoo, "base")), tmp_path / "base")
    assert vocab_of(base_out) == vocab_of(vzoo["base"])
    assert json.loads((base_out / "config.json").read_text())["vocab_size"] == BASE_TOKENS
    rows = {m: tensors(vzoo[m])[EMBED] for m in ("base", "a", "b")}
    torch.testing.assert_close(tensors(base_out)[EMBED],
                               0.2 * rows["base"] + 0.5 * rows["a"][:81] + 0.3 * rows["b"][:81])
    b_out = merge_to_dir(recipe_from_dict(linear(vzoo, vzoo["b"])), tmp_path / "b")
    assert vocab_of(b_out) == vocab_of(vzoo["b"])
    merged = tensors(b_out)[EMBED]
    assert merged.shape == (83, 64)
    a, b = rows["a"], rows["b"]
    torch.testing.assert_close(merged[81], 0.2 * (a[82] + b[81]) / 2 + 0.5 * a[82] + 0.3 * b[81])
    torch.testing.assert_close(merged[82], b[82])


def test_token_overrides(vzoo, tmp_path):
    """``source: MODEL`` for the models lacking the token; ``force`` for all of them; a token no
    model has is added, its rows from another token (``model_token``)."""
    tokens = {"<call>": {"source": vzoo["b"]}, "<think>": {"source": {"kind": "zero"}, "force": True},
              "<new>": {"source": {"kind": "model_token", "model": vzoo["a"], "token": "<tool>"}}}
    out = merge_to_dir(recipe_from_dict(linear(vzoo, None, tokenizer={"tokens": tokens})), tmp_path / "out")
    vocab, merged = vocab_of(out), tensors(out)[EMBED]
    a, b = tensors(vzoo["a"])[EMBED], tensors(vzoo["b"])[EMBED]
    assert vocab["<new>"] == 84 and merged.shape == (85, 64)
    torch.testing.assert_close(merged[vocab["<call>"]], 0.2 * b[81] + 0.5 * a[82] + 0.3 * b[81])
    assert not merged[vocab["<think>"]].any()
    torch.testing.assert_close(merged[84], a[81])
    bad = {"<tool>": {"source": vzoo["b"]}}
    with pytest.raises(RecipeError, match=rf"tokenizer.tokens\['<tool>'\]: model '{vzoo['b']}' has no token '<tool>'"):
        merge_to_dir(recipe_from_dict(linear(vzoo, None, tokenizer={"tokens": bad})), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_padding_rows_are_each_models_mean_row(vzoo, tmp_path):
    """``pad_to_multiple_of: 8``: 88 rows for 84 tokens; a linear merge of each model's mean row is
    the mean of the merged rows. The tokenizer keeps its 84 tokens; config.json says 88."""
    out = merge_to_dir(recipe_from_dict(linear(vzoo, None, tokenizer={"pad_to_multiple_of": 8})), tmp_path / "out")
    assert len(vocab_of(out)) == 84 and json.loads((out / "config.json").read_text())["vocab_size"] == 88
    for name in (EMBED, HEAD):
        merged = tensors(out)[name]
        assert merged.shape == (88, 64)
        torch.testing.assert_close(merged[84:], merged[:84].mean(dim=0).expand(4, 64))


def test_one_vocabulary_with_a_tokenizer_source_is_the_plain_merge_byte_for_byte(vzoo, tmp_path):
    data = {"merge_method": "ties", "base_model": vzoo["base"],
            "models": [{"model": vzoo[m], "parameters": {"weight": 0.5, "density": 0.6}} for m in ("math", "lang")]}
    plain = merge_to_dir(recipe_from_dict(data), tmp_path / "plain")
    union = merge_to_dir(recipe_from_dict(data | {"tokenizer_source": "union"}), tmp_path / "union")
    files = sorted(p.name for p in plain.iterdir() if p.name not in ("README.md", "mergeflow_recipe.yaml"))
    assert files == sorted(p.name for p in union.iterdir() if p.name not in ("README.md", "mergeflow_recipe.yaml"))
    assert "tokenizer.json" in files
    for name in files:
        assert (plain / name).read_bytes() == (union / name).read_bytes(), name


def test_without_a_tokenizer_source_the_first_differing_token_is_named(vzoo, tmp_path):
    message = (rf"model '{vzoo['a']}': token '<tool>' \(id 81\) is not in the base '{vzoo['base']}' vocabulary; "
               "set tokenizer_source: union or base to merge models whose vocabularies differ")
    recipe = recipe_from_dict(linear(vzoo, None))
    with pytest.raises(MergeflowError, match=message):
        check_merge_sources(recipe.model_paths(), vzoo["base"])
    with pytest.raises(MergeflowError, match=message):
        merge_to_dir(recipe, tmp_path / "out")
    check_merge_sources(recipe.model_paths(), vzoo["base"], vocabularies_may_differ=True)  # rows may differ


def test_the_in_memory_merger_merges_over_the_output_vocabulary_as_the_cli(vzoo, union_out, tmp_path):
    """Built from a union recipe, the merger holds the sources seen through the output vocabulary:
    every merge with that tokenizer and base (here TIES with other weights, and a merge of two of
    the models, as a search's candidates vary) is bit for bit the CLI's, its tokenizer is the
    output's, and its model's logits cover every added token. A recipe of another tokenizer, or a
    merger built without one, is refused."""
    recipe = recipe_from_dict(linear(vzoo))
    merger = InMemoryMerger(recipe)
    assert merger.tokenizer.get_vocab() == vocab_of(union_out)
    ties = {**linear(vzoo), "merge_method": "ties", "models": [
        {"model": vzoo[name], "parameters": {"weight": weight, "density": 0.6}} for name, weight in (("a", 0.7), ("b", 0.4))]}
    pair = {**linear(vzoo), "models": linear(vzoo)["models"][1:]}  # a and b: other models merged into the rows
    for data in (linear(vzoo), ties, pair, linear(vzoo)):
        state = merger.merge(recipe_from_dict(data)).state_dict()
        streamed = tensors(merge_to_dir(recipe_from_dict(data), tmp_path / f"{data['merge_method']}-{len(data['models'])}",
                                        force=True))
        assert set(streamed) <= set(state) and all(torch.equal(state[k], v) for k, v in streamed.items())
    logits = merger.model(**merger.tokenizer("tom <tool> has <think> 3", return_tensors="pt")).logits
    assert logits.shape[-1] == 84 and bool(torch.isfinite(logits).all())
    with pytest.raises(MergeflowError, match="its tokenizer or base model differ from those of the recipe"):
        merger.merge(recipe_from_dict(linear(vzoo, "base")))
    with pytest.raises(MergeflowError, match=r"tokenizer_source 'union' reconciles vocabularies \(model .*'<tool>'.*"
                                             r"build the in-memory merger from such a recipe"):
        InMemoryMerger(recipe.model_paths(), base_model=recipe.base_model).merge(recipe)


def test_cli(vzoo, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear(vzoo, None)))
    assert cli.main(["merge", str(recipe), str(tmp_path / "refused")]) == 2
    assert f"model '{vzoo['a']}': token '<tool>' (id 81) is not in the base" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    recipe.write_text(yaml.safe_dump(linear(vzoo, "union")))
    assert cli.main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert len(vocab_of(tmp_path / "out")) == 84 and tensors(tmp_path / "out")[HEAD].shape == (84, 64)


# ---- parity with mergekit 0.1.5 (slow: fresh processes)

def parity_recipes(vzoo) -> dict[str, dict]:
    def based(method, source, density=None, **extra):
        return {"merge_method": method, "base_model": vzoo["base"], "dtype": "float32",
                **({"tokenizer_source": source} if source else {}),
                "models": [{"model": vzoo[m], "parameters": {"weight": w, **({"density": density} if density else {})}}
                           for m, w in (("a", 0.6), ("b", 0.4))], **extra}

    tokens = {"<call>": {"source": vzoo["b"]}, "<think>": {"source": {"kind": "zero"}, "force": True},
              "<new>": {"source": {"kind": "model_token", "model": vzoo["a"], "token": "<tool>"}}}
    with_tokens = linear(vzoo, None, tokenizer={"source": "union", "tokens": tokens})
    return {"linear-union": linear(vzoo), "task_arithmetic-union": based("task_arithmetic", "union"),
            "ties-union": based("ties", "union", 0.5), "ties-base": based("ties", "base", 0.5),
            "task_arithmetic-model": based("task_arithmetic", vzoo["b"]), "linear-base": linear(vzoo, "base"),
            "linear-tokens": with_tokens,
            "ties-union-padded": based("ties", None, 0.5, tokenizer={"source": "union", "pad_to_multiple_of": 8})}


@pytest.fixture(scope="module")
def mergekit_outputs(vzoo, tmp_path_factory):
    from test_merge_peer import MERGEKIT, run_mergekit

    if not MERGEKIT.is_file():
        pytest.skip(f"no mergekit at {MERGEKIT}")
    root = tmp_path_factory.mktemp("mergekit")
    pairs = []
    for case, data in parity_recipes(vzoo).items():
        (root / f"{case}.yaml").write_text(yaml.safe_dump(data))
        pairs.append((root / f"{case}.yaml", root / case))
    run_mergekit(pairs)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", ["linear-union", "task_arithmetic-union", "ties-union", "ties-base",
                                  "task_arithmetic-model", "linear-base", "linear-tokens", "ties-union-padded"])
def test_matches_mergekit(vzoo, mergekit_outputs, tmp_path, case):
    """Tensor for tensor, rows matched by token (mergekit orders the models of a union as a set
    does, so its ids of the added tokens may differ from run to run); the same vocabulary."""
    ours_dir = merge_to_dir(recipe_from_dict(parity_recipes(vzoo)[case]), tmp_path / "ours")
    theirs_dir = mergekit_outputs / case
    ours, theirs = tensors(ours_dir), tensors(theirs_dir)
    vocab, their_vocab = vocab_of(ours_dir), vocab_of(theirs_dir)
    assert set(vocab) == set(their_vocab) and set(ours) == set(theirs)
    rows = json.loads((ours_dir / "config.json").read_text())["vocab_size"]
    assert rows == json.loads((theirs_dir / "config.json").read_text())["vocab_size"] == ours[EMBED].shape[0]
    order = torch.tensor([their_vocab[token] for token in sorted(vocab, key=vocab.__getitem__)]
                         + list(range(len(vocab), rows)))  # the padding rows last
    worst = 0.0
    for name, tensor in ours.items():
        expected = theirs[name][order] if name in (EMBED, HEAD) else theirs[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-5, msg=name)
        worst = max(worst, float((tensor - expected).abs().max()))
    print(f"PARITY {case} max|diff| {worst:.2e} over {len(ours)} tensors, {len(vocab)} tokens")


def test_an_aligned_source_reads_any_window_of_its_rows(vzoo):
    """The streaming merge reads blocks that start and end anywhere in a row: every window of an
    aligned tensor is that window of the whole, and the whole is the model's rows by token."""
    from mergeflow.merge.plan import open_sources, plan_merge
    from mergeflow.merge.vocab import align_sources, fill_rows, plan_vocabulary

    recipe = recipe_from_dict(linear(vzoo))
    vocab = plan_vocabulary(recipe, open_sources(recipe))
    sources = align_sources(open_sources(recipe), vocab)
    fill_rows(plan_merge(recipe, sources), recipe, sources, vocab)
    a = sources[vzoo["a"]]
    whole = a.read(HEAD)
    own = tensors(vzoo["a"])[HEAD]
    torch.testing.assert_close(whole[:83], own, rtol=0, atol=0)  # <tool> <call> where a has them
    torch.testing.assert_close(whole[83], tensors(vzoo["b"])[HEAD][82], rtol=0, atol=0)  # <think>: b's
    flat = whole.reshape(-1)
    for start, size in [(0, 1), (5, 64), (63, 130), (64 * 80 + 7, 64 * 3), (64 * 83 + 1, 63), (0, flat.numel())]:
        out = torch.empty(size, dtype=flat.dtype)
        assert torch.equal(a.read_range(HEAD, start, out), flat[start:start + size]), (start, size)


def test_the_evaluator_scores_a_union_merge_on_prompts_with_the_added_tokens(union_out, tmp_path):
    """The respond stage on the union output: prompts holding the added tokens are tokenized to
    their own ids and every item gets a finite log-likelihood per choice."""
    import pandas as pd

    from mergeflow.evaluate import respond

    items = pd.DataFrame({"item_id": ["q0", "q1", "q2"],
                          "prompt": ["tom <tool> has 3 apples", "<think> tom has", "<call> 2 plus 2 is"],
                          "choices": [["3", "4"], ["3", "4"], ["3", "4"]], "answer": [0, 1, 1],
                          "target": ["3", "4", "4"]})
    items.to_parquet(tmp_path / "split.parquet", index=False)
    responses = respond({"path": str(union_out)}, tmp_path / "split.parquet", "mc_loglik", " ",
                        {"batch_size": 4, "max_length": 32, "max_new_tokens": 2}, tmp_path / "responses.parquet")
    assert list(responses["item_id"]) == ["q0", "q1", "q2"]
    assert set(responses["correct"]) <= {0, 1}
    assert all(len(c) == 2 and all(math.isfinite(v) for v in c) for c in responses["choice_logliks"])
