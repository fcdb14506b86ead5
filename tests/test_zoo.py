"""The embedded zoo: real HF directories, and experts that are better than the base at home."""

import numpy as np
import pytest
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm
from mergeflow.zoo import language
from mergeflow.zoo.build import build_tokenizer


def test_tokenizer_splits_digits_and_decodes_numbers_whole():
    tok = build_tokenizer()
    ids = tok("tom has 42 apples .", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["\u2581tom", "\u2581has", "\u2581", "4", "2", "\u2581apples", "\u2581."]
    assert tok.decode(ids) == "tom has 42 apples ."
    assert tok.unk_token_id not in tok(language.L2_OF["apples"] + " " + language.L2_OF["?"])["input_ids"]


def test_languages_are_a_cipher_of_each_other():
    sentence, answer, x, y = language.math_question(np.random.default_rng(0))
    l1, l2 = sentence.render(), sentence.render(l2=True)
    assert answer == x + y
    assert len(l1.split()) == len(l2.split())
    for w1, w2 in zip(l1.split(), l2.split()):
        assert w2 == (w1 if w1.isdigit() else language.L2_OF[w1])


def test_zoo_models_load_with_auto_classes(tiny_zoo):
    for name in ["base", "math", "lang"]:
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo / name)
        tok = AutoTokenizer.from_pretrained(tiny_zoo / name)
        assert model.config.model_type == "llama"
        assert (tiny_zoo / name / "model.safetensors").exists()
        out = model.generate(**tok("tom has", return_tensors="pt"), max_new_tokens=3, do_sample=False)
        assert out.shape[1] > 3
    assert sorted(p.name for p in (tiny_zoo / "checkpoints" / "math").iterdir()) == ["step_00060", "step_00120", "step_00180", "step_00240"]


def _items(zoo, task, n=200):
    frame = pd.read_parquet(zoo / "tasks" / f"{task}.parquet").iloc[:n]
    return frame.assign(prompt=frame["question"])


def test_math_expert_beats_base_on_l1_math(tiny_zoo):
    settings = EvalSettings.from_config({"batch_size": 64})
    items = _items(tiny_zoo, "math_l1")
    acc = {}
    for name in ["base", "math"]:
        model, tok = load_causal_lm(tiny_zoo / name, settings)
        acc[name] = evaluate_items(model, tok, items, "mc_loglik", settings)["correct"].mean()
    assert acc["math"] > acc["base"] + 0.1, acc


def test_language_expert_beats_base_on_l2_text(tiny_zoo):
    rng = np.random.default_rng(123)
    texts = [language.lang_l2_text(rng) for _ in range(64)]
    nll = {}
    for name in ["base", "lang"]:
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo / name)
        tok = AutoTokenizer.from_pretrained(tiny_zoo / name)
        batch = tok(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.inference_mode():
            nll[name] = model(**batch, labels=labels).loss.item()
    assert nll["lang"] < nll["base"] - 0.1, nll


@pytest.mark.slow
def test_pinned_kernels_give_the_same_zoo_on_another_code_path(tmp_path):
    """zoo.kernels: avx2 trains with AVX2 kernels on one thread: the same weights whether the
    libraries would dispatch for this CPU or for an AVX2 one (the machine's other code path).
    A native zoo records nothing new, so the default's zoo jobs stand as they were."""
    import json
    import os
    import subprocess

    from test_workflow import micro_config, snakemake_command

    config = micro_config()
    config["zoo"]["kernels"] = "avx2"
    targets = ["results/zoo/base", "results/zoo/math"]
    avx2_machine = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    weights = {}
    for name, env in (("here", {}), ("avx2", avx2_machine)):
        workdir = tmp_path / name
        workdir.mkdir()
        done = subprocess.run(snakemake_command(workdir, config, *targets, cores=2), capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = {m: (workdir / "results" / "zoo" / m / "model.safetensors").read_bytes() for m in ("base", "math")}
        record = json.loads((workdir / "results" / "zoo" / "math" / "zoo.json").read_text())
        assert record["kernels"] == "avx2" and record["cpu_capability"] == "AVX2"
    assert weights["here"] == weights["avx2"]
