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
    with pytest.raises(MergeflowError, match="unknown scorer .bleu."):
        evaluate_items(model, tok, items, "bleu", settings)


def _items(prompts, choices, answers):
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(len(prompts))], "prompt": prompts, "choices": choices,
                         "answer": answers, "target": [c[a] for c, a in zip(choices, answers)]})


PROMPTS = ["tom has 3 pens and gets 4 more . how many pens does tom have ? answer",
           "ann has 12 cups . how many cups does ann have ? answer"]
CHOICES = [["3", "7", "8", "4"], ["12", "120", "13", "1"]]


def test_per_choice_logliks_and_generations_are_kept(tiny_zoo):
    settings = EvalSettings.from_config({"batch_size": 2, "max_new_tokens": 4})
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    out = evaluate_items(model, tok, _items(PROMPTS, CHOICES, [1, 0]), "mc_loglik", settings)
    for k, (prompt, choices) in enumerate(zip(PROMPTS, CHOICES)):
        expected = [_manual_loglik(model, tok, prompt, " " + c) for c in choices]
        assert out["choice_logliks"][k] == pytest.approx(expected, abs=1e-4)
    generative = _items(PROMPTS, [["7"], ["12"]], [0, 0]).assign(choices=[[], []], answer=-1)
    out = evaluate_items(model, tok, generative, "exact_match", settings)
    assert list(out.columns) == ["item_id", "correct", "loglik", "generation"]
    assert all(isinstance(g, str) for g in out["generation"])


def test_length_normalised_scorer_ranks_by_loglik_per_character(tiny_zoo):
    settings = EvalSettings.from_config()
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    items = _items(PROMPTS, CHOICES, [1, 0])
    plain = evaluate_items(model, tok, items, "mc_loglik", settings)
    norm = evaluate_items(model, tok, items, "mc_loglik_norm", settings)
    for k, choices in enumerate(CHOICES):
        per_char = [ll / len(c) for ll, c in zip(plain["choice_logliks"][k], choices)]
        assert norm["correct"][k] == int(max(range(len(choices)), key=per_char.__getitem__) == items["answer"][k])
    assert list(norm["loglik"]) == list(plain["loglik"])


def test_a_prompt_ending_in_space_scores_the_answer_with_that_space(tiny_zoo):
    """As lm-eval: "answer " + "7" is scored as "answer" + " 7", not as a doubled space."""
    settings = EvalSettings.from_config()
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    spaced = evaluate_items(model, tok, _items([p + " " for p in PROMPTS], CHOICES, [1, 0]), "mc_loglik", settings,
                            delimiter="")
    plain = evaluate_items(model, tok, _items(PROMPTS, CHOICES, [1, 0]), "mc_loglik", settings)
    assert list(spaced["choice_logliks"]) == list(plain["choice_logliks"])


def test_bos_follows_the_tokenizer_unless_set(tiny_zoo):
    import copy

    from tokenizers import processors

    from mergeflow.evaluate import encode_requests, tokenizer_adds_bos

    _, tok = load_causal_lm(tiny_zoo / "math", EvalSettings.from_config())
    bare = copy.deepcopy(tok)
    bare.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert tokenizer_adds_bos(tok) and not tokenizer_adds_bos(bare)
    pair = [(PROMPTS[0], " 7")]
    cases = [(tok, "auto", True), (bare, "auto", False), (tok, False, False), (bare, True, True)]
    for tokenizer, setting, bos in cases:
        (ctx, cont), = encode_requests(tokenizer, pair, EvalSettings.from_config({"add_bos": setting}))
        assert (ctx[0] == tok.bos_token_id) == bos
        assert ctx[int(bos):] == tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
        assert cont == tok(" 7", add_special_tokens=False)["input_ids"]


def test_context_length_comes_from_the_model_and_truncation_warns(tiny_zoo, caplog):
    from mergeflow.evaluate import context_length

    settings = EvalSettings.from_config()
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    assert settings.max_length == "model" and context_length(model, settings) == model.config.max_position_embeddings
    with caplog.at_level("WARNING", logger="mergeflow.evaluate"):
        assert context_length(model, EvalSettings.from_config({"max_length": 1000})) == 1000
    assert "longer than the model's context length" in caplog.text
    caplog.clear()
    long_prompt = " ".join([PROMPTS[0]] * 5)  # well past the 64 positions of the tiny models
    with caplog.at_level("WARNING", logger="mergeflow.evaluate"):
        out = evaluate_items(model, tok, _items([long_prompt, PROMPTS[1]], CHOICES, [1, 0]), "mc_loglik", settings)
    assert "4 of 8 scored sequences are longer than the context length 64" in caplog.text
    assert all(math.isfinite(v) for row in out["choice_logliks"] for v in row)


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_packed_scoring_matches_one_pass_per_request(tiny_zoo, batch_size):
    """Shared contexts and prefixes, continuations of several lengths, and contexts cut to the
    context length differently per continuation: each as its own unpadded pass would score it."""
    from mergeflow.evaluate import continuation_logliks

    model, tok = load_causal_lm(tiny_zoo / "math", EvalSettings.from_config())
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx_a, ctx_b = [tok.bos_token_id] + enc(PROMPTS[0]), [tok.bos_token_id] + enc(PROMPTS[1]) * 3
    requests = [(ctx_a, enc(" " + c)) for c in ("3", "30", "31", "4", "3")] + \
               [(ctx_b, enc(" " + c)) for c in ("12", "1", "120")] + [(ctx_a, enc(" 12 pens"))]
    max_length = 40  # ctx_b is longer: its requests keep different tails of it
    got = continuation_logliks(model, requests, batch_size, max_length)
    for (ctx, cont), value in zip(requests, got):
        full = (ctx + cont)[-(max_length + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), dim=-1)
        n = len(full)
        expected = sum(logp[n - 1 - len(cont) + j, t].item() for j, t in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)


def test_a_sliding_window_model_is_scored_one_sequence_per_request(tiny_zoo):
    """A window shorter than the sequences: the packed mask would ignore it, so each request is
    scored as a plain sequence under the model's own mask."""
    from mergeflow.evaluate import continuation_logliks, shares_contexts

    model, tok = load_causal_lm(tiny_zoo / "math", EvalSettings.from_config())
    ctx = [tok.bos_token_id] + tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    requests = [(ctx, tok(" " + c, add_special_tokens=False)["input_ids"]) for c in CHOICES[0]]
    packed = continuation_logliks(model, requests, 3, 64)
    model.config.sliding_window = 8
    assert shares_contexts(model, 64) is False and shares_contexts(model, 8) is True
    plain = continuation_logliks(model, requests, 3, 64)
    assert plain == pytest.approx(packed, abs=1e-4)  # Llama applies no window: same scores either way


def test_generation_from_the_scoring_pass_matches_generate(tiny_zoo, monkeypatch):
    """exact_match decodes from the pass that scores the gold answer; it generates what the
    model's ``generate`` does: prompts of several lengths, one ending in a space (its gold
    context lacks the space, which is packed after it and generated from: still one tree), one
    cut to the context length, one repeated."""
    import mergeflow.evaluate as evaluate
    from mergeflow.evaluate import generate_greedy

    packed = []
    pack = evaluate.pack_requests
    monkeypatch.setattr(evaluate, "pack_requests", lambda *a, **k: packed.append(pack(*a, **k)) or packed[-1])

    settings = EvalSettings.from_config({"batch_size": 3, "max_new_tokens": 5})
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    prompts = [PROMPTS[0], PROMPTS[1] + " ", " ".join([PROMPTS[0]] * 5), "bob has 20 apples . how many apples ? answer",
               PROMPTS[0]]
    items = pd.DataFrame({"item_id": [f"g{k}" for k in range(len(prompts))], "prompt": prompts,
                          "choices": [[] for _ in prompts], "answer": -1, "target": ["7", "12", "7", "20", "7"]})
    out = evaluate_items(model, tok, items, "exact_match", settings)
    assert list(out["generation"]) == generate_greedy(model, tok, prompts, settings)
    trees, _, starts = packed[0]
    # one tree per distinct prompt and one more for the cut prompt (its gold and its generation keep
    # different tails); the spaced prompt's tree generates after its space
    assert len(starts) == 1 and len(trees) == 5


def test_generation_stops_once_every_answer_holds_a_stop_string(tiny_zoo):
    """Tokens after a stop string are cut, so they are not generated: with every row stopped after
    its first token, the packed pass is the batch's only forward; without, decoding goes on."""
    from mergeflow.evaluate import _encode, score_requests

    settings = EvalSettings.from_config({"max_new_tokens": 6})
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    contexts = [[tok.bos_token_id] + _encode(tok, p) for p in ["ann has 12 cups . how many cups ? answer",
                                                              "tom has 3 pens . how many pens ? answer"]]
    forwards = []
    hook = model.get_decoder().register_forward_hook(lambda *args: forwards.append(1))
    try:
        for stopped, expected in [(lambda tokens: True, 1), (lambda tokens: False, 6)]:
            forwards.clear()
            _, tokens = score_requests(model, [(c, []) for c in contexts], 8, 64, max_new_tokens=6, stopped=stopped)
            assert len(forwards) == expected and all(len(t) == (1 if expected == 1 else 6) for t in tokens)
    finally:
        hook.remove()


@pytest.mark.parametrize("scorer", ["mc_loglik", "exact_match"])
def test_a_prefix_every_prompt_shares_is_read_once_and_changes_nothing(tiny_zoo, monkeypatch, scorer):
    """A long common head (a system prompt, a few-shot block) is run once per batch and its
    keys and values handed to every row: the scores and generations are those of reading it per row."""
    import mergeflow.evaluate as evaluate

    settings = EvalSettings.from_config({"batch_size": 4, "max_new_tokens": 4})
    model, tok = load_causal_lm(tiny_zoo / "math", settings)
    head = " ".join([PROMPTS[1]] * 2) + " "
    prompts = [head + p for p in (PROMPTS[0], PROMPTS[1], PROMPTS[0] + " answer", "bob has 20 apples . answer")]
    items = _items(prompts, [CHOICES[0], CHOICES[1], CHOICES[0], CHOICES[1]], [0, 1, 2, 0]).assign(
        target=["7", "12", "7", "20"])
    if scorer == "exact_match":
        items = items.assign(choices=[[] for _ in prompts], answer=-1)
    calls = []
    shared = evaluate._shared_prefix
    monkeypatch.setattr(evaluate, "_shared_prefix", lambda trees: calls.append(shared(trees)) or calls[-1])
    once = evaluate_items(model, tok, items, scorer, settings)
    assert calls and min(calls) >= evaluate.SHARED_PREFIX_MIN
    monkeypatch.setattr(evaluate, "_shared_prefix", lambda trees: 0)
    per_row = evaluate_items(model, tok, items, scorer, settings)
    assert once["loglik"].to_numpy() == pytest.approx(per_row["loglik"].to_numpy(), abs=1e-4)
    assert list(once["correct"]) == list(per_row["correct"])
    if scorer == "exact_match":
        assert list(once["generation"]) == list(per_row["generation"])


def test_answers_do_not_depend_on_the_batch_size(tiny_zoo):
    """What lets the workflow leave evaluation.batch_size out of its jobs' parameters: on the zoo's
    multiple-choice and generation tasks, every model's correctness and generations are the same
    at every batch size; log-likelihoods differ in their last float digits only."""
    tasks = {"mc_loglik": "math_l2", "exact_match": "math_l1"}
    for scorer, task in tasks.items():
        source = pd.read_parquet(tiny_zoo / "tasks" / f"{task}.parquet").head(120)
        items = pd.DataFrame({"item_id": source["item_id"], "prompt": source["question"], "choices": source["choices"],
                              "answer": source["answer"], "target": source["target"]})
        for name in ("base", "math", "lang"):
            out = {}
            for batch_size in (1, 5, 64):
                settings = EvalSettings.from_config({"batch_size": batch_size})
                model, tok = load_causal_lm(tiny_zoo / name, settings)
                out[batch_size] = evaluate_items(model, tok, items, scorer, settings)
            for batch_size in (5, 64):
                assert out[batch_size]["correct"].tolist() == out[1]["correct"].tolist(), (scorer, name, batch_size)
                assert (out[batch_size]["loglik"] - out[1]["loglik"]).abs().max() < 1e-4
                if scorer == "exact_match":
                    assert out[batch_size]["generation"].tolist() == out[1]["generation"].tolist()


def test_requests_whose_continuation_outgrows_the_window_get_a_tree_each():
    """A continuation longer than the window leaves a one-token context, which unrelated requests
    would share: one tree of all their continuations (quadratic in their length). Each gets its
    own; requests truncated in their context alone still share theirs."""
    from mergeflow.evaluate import pack_requests

    long = [([0] * 5, [0] * 5 + [7] + list(range(100, 164))), ([1] * 5, [1] * 5 + [7] + list(range(200, 264)))]
    short = [(list(range(300, 400)), [1]), (list(range(300, 400)), [2])]  # the same long context, two choices
    trees, reads, _ = pack_requests(long + short, max_length=64)
    assert len(trees) == 3 and max(len(tree.tokens) for tree in trees) == 64  # the window, less its last token
    assert reads[2][0] == reads[3][0] and all(len(tokens) == 64 for _, _, tokens in reads[:2])
