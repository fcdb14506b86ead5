"""The evaluator against hand-computed log-likelihoods and a hand-written greedy loop."""

import math

import pandas as pd
import pytest
import torch

from mergeflow.evaluate import EvalSettings, evaluate_items, extract_number, load_causal_lm


def _manual_loglik(model, tok, prompt, continuation):
    ctx = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_multiple_choice_matches_hand_computation(tiny_zoo, batch_size):
    settings = EvalSettings.from_config({"batch_size": batch_size})
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    items = pd.DataFrame({
        "item_id": ["a", "b"],
        "prompt": ["tom has 3 pens and gets 4 more . how many pens does tom have ? answer",
                   "ann has 12 cups . how many cups does ann have ? answer"],
        "choices": [["3", "7", "8", "4"], ["12", "120", "13"]],
        "answer": [1, 0],
        "target": ["7", "12"],
    })
    out = evaluate_items(model, tok, items, "mc_loglik", settings)
    for i, row in items.iterrows():
        scores = [_manual_loglik(model, tok, row["prompt"], " " + c) for c in row["choices"]]
        assert out["loglik"][i] == pytest.approx(scores[row["answer"]], abs=1e-4)
        assert out["correct"][i] == int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert list(out["item_id"]) == ["a", "b"]


def test_exact_match_matches_a_hand_written_greedy_loop(tiny_zoo):
    settings = EvalSettings.from_config({"batch_size": 2, "max_new_tokens": 4})
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    prompts = ["tom has 3 pens and gets 4 more . how many pens does tom have ? answer",
               "bob has 20 apples and gets 11 more . how many apples does bob have ? answer",
               "eve has 5 cups . how many cups does eve have ? answer"]
    expected = []
    for p in prompts:
        ids = [tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(4):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        expected.append(extract_number(tok.decode(new, skip_special_tokens=True)))
    targets = [expected[0] or "7", "31", "5"]
    items = pd.DataFrame({"item_id": ["x", "y", "z"], "prompt": prompts, "choices": [[], [], []],
                          "answer": [-1, -1, -1], "target": targets})
    out = evaluate_items(model, tok, items, "exact_match", settings)
    assert list(out["correct"]) == [int(e is not None and float(e) == float(t)) for e, t in zip(expected, targets)]
    assert out["loglik"][1] == pytest.approx(_manual_loglik(model, tok, prompts[1], " 31"), abs=1e-4)
    assert all(math.isfinite(v) for v in out["loglik"])


def test_extract_number_gsm8k_style():
    assert extract_number("so she has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert extract_number("the answer is 42.") == "42"
    assert extract_number("-5 degrees") == "-5"
    assert extract_number("no digits here") is None


def test_unknown_scorer_is_named(tiny_zoo):
    from mergeflow.errors import MergeflowError

    settings = EvalSettings.from_config()
    model, tok = load_causal_lm(tiny_zoo / "base", settings)
    items = pd.DataFrame({"item_id": ["a"], "prompt": ["x"], "choices": [["1"]], "answer": [0], "target": ["1"]})
    with pytest.raises(MergeflowError, match="unknown scorer 'bleu'"):
        evaluate_items(model, tok, items, "bleu", settings)
