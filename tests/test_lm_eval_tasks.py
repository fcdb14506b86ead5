"""Tasks of lm-evaluation-harness by name (``tasks: {NAME: {lm_eval: TASK}}``,
``mergeflow.lm_eval_tasks``): lm-eval's own task YAMLs for gsm8k (generate_until, its regex
filters, 5-shot), mgsm_direct (a tag; its Japanese and English subtasks) and arc_easy (multiple
choice, acc and acc_norm), pointed at local files in each hub dataset's schema
(``config/examples/data/lm_eval``). Checked here: the config is read and refused as it should be
before any job; items are lm-eval's own contexts and answers (and, on a tiny model, lm-eval's own
log-likelihoods, answers, generations and filtered answers); a zoo-sized workflow runs end to end
on lm-eval tasks. Per-item parity and speed on the zoo and SmolLM2: bench/lm_eval_tasks.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from mergeflow.errors import MergeflowError

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "config" / "examples" / "data" / "lm_eval"
try:
    import lm_eval  # noqa: F401
    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason='lm-eval is not installed: pip install -e ".[lm-eval]"')


def local(name: str, **extra) -> dict:
    """Local files for a task of ours named ``name`` (gsm8k, arc_numbers, mgsm_en, mgsm_ja)."""
    return {"dataset_path": "json",
            "data_files": {split: str(DATA / f"{name}_{split}.jsonl") for split in ("train", "test")}, **extra}


def tasks_config(tasks: dict, runs: dict | None = None, evaluation: dict | None = None) -> dict:
    """A config around ``tasks`` (with their schema defaults), as the workflow reads it."""
    from mergeflow.schema import validate_section

    return {"tasks": {name: validate_section(cfg, "task", f"tasks.{name}") for name, cfg in tasks.items()},
            "runs": runs or {}, "evaluation": evaluation or {}}


def resolved(tasks: dict, runs: dict | None = None) -> dict:
    from mergeflow.lm_eval_tasks import resolve_tasks

    config = tasks_config(tasks, runs)
    resolve_tasks(config)
    return config


GSM8K = {"lm_eval": "gsm8k", "splits": {"search": 12, "test": 8}, **local("gsm8k")}
ARC = {"lm_eval": "arc_easy", "num_fewshot": 3, "splits": {"search": 12, "test": 8}, **local("arc_numbers")}
MGSM = {"lm_eval": "mgsm_direct", "splits": {"search": 12, "test": 8},
        "subtasks": {f"mgsm_direct_{lang}": local(f"mgsm_{lang}") for lang in ("en", "ja")}}


# ---------------------------------------------------------------------------------------------
# Reading the config


@needs_lm_eval
def test_a_task_gets_its_scorer_and_delimiter_from_lm_eval_and_a_tag_one_task_per_subtask():
    config = resolved({"gsm": GSM8K, "arc": ARC, "mgsm": MGSM},
                      {"r": {"tasks": ["gsm", "mgsm"], "evolve": {"objectives": {"mgsm": 0.5, "arc": 1.0}}}})
    tasks = config["tasks"]
    assert list(tasks) == ["gsm", "arc", "mgsm_direct_en", "mgsm_direct_ja"]
    assert (tasks["gsm"]["scorer"], tasks["gsm"]["target_delimiter"]) == ("lm_eval_generate", " ")
    assert tasks["arc"]["scorer"] == "lm_eval_acc_norm"  # acc_norm, where the task lists it
    assert (tasks["mgsm_direct_ja"]["scorer"], tasks["mgsm_direct_ja"]["target_delimiter"]) == ("lm_eval_generate", "")
    spec = tasks["gsm"]["resolved"]["specs"][0]
    assert (spec["task"], spec["metric"], spec["filter"]) == ("gsm8k", "exact_match", "strict-match")
    assert tasks["gsm"]["resolved"]["files"] == sorted(GSM8K["data_files"].values())  # the data rule's inputs
    assert config["runs"]["r"] == {"tasks": ["gsm", "mgsm_direct_en", "mgsm_direct_ja"],
                                   "evolve": {"objectives": {"mgsm_direct_en": 0.5, "mgsm_direct_ja": 0.5, "arc": 1.0}}}
    again = resolved(tasks, config["runs"])  # reading a read config changes nothing
    assert again["tasks"] == tasks


@needs_lm_eval
def test_a_group_stands_for_its_tasks_through_its_subgroups_and_tags():
    from mergeflow.lm_eval_tasks import leaf_tasks

    mmlu = leaf_tasks("mmlu", "tasks.m.lm_eval")  # mmlu -> mmlu_stem, ... (groups) -> their tags -> 57 tasks
    assert len(mmlu) == 57 and "mmlu_abstract_algebra" in mmlu and len(set(mmlu)) == 57
    assert {"mgsm_direct_en", "mgsm_direct_ja"} <= set(leaf_tasks("mgsm_direct", "tasks.m.lm_eval"))
    assert leaf_tasks("gsm8k", "tasks.m.lm_eval") == ["gsm8k"]


@needs_lm_eval
def test_a_pooled_group_is_one_task_whose_items_name_their_subtask():
    from mergeflow.data import split_task

    config = resolved({"mgsm": {**MGSM, "pool": True, "splits": {"search": 150, "test": 40}}})
    task = config["tasks"]["mgsm"]
    assert list(config["tasks"]) == ["mgsm"] and task["resolved"]["documents"] == 200
    parts = split_task("mgsm", task, seed=0)
    assert set(parts["search"]["subscenario"]) == {"mgsm_direct_en", "mgsm_direct_ja"}
    assert {len(parts["search"]), len(parts["test"])} == {150, 40}


@needs_lm_eval
@pytest.mark.parametrize("change, message", [
    ({"lm_eval": "gsm8kk"}, r"tasks\.t\.lm_eval: 'gsm8kk' is not an lm-eval task, group or tag; closest names: gsm8k"),
    ({"lm_eval": "wikitext"}, r"tasks\.t: lm-eval task 'wikitext' has output type 'loglikelihood_rolling', which "
                              "mergeflow does not score"),
    ({"test_split": "validation"}, r"tasks\.t: split 'validation' \(test_split\) of lm-eval task 'gsm8k' does not "
                                   r"exist in its dataset; its splits are \['test', 'train'\]"),
    ({"fewshot_split": "test"}, r"tasks\.t: lm-eval task 'gsm8k' draws its 5 few-shot examples from 'test', its "
                                "evaluation split"),
    ({"data_files": {"train": str(DATA / "gsm8k_test.jsonl"), "test": str(DATA / "gsm8k_test.jsonl")}},
     r"tasks\.t: 200 document\(s\) of lm-eval task 'gsm8k''s evaluation split 'test' are also in its few-shot split "
     "'train'"),
    ({"metric": "acc_norm"}, r"tasks\.t\.metric: 'acc_norm' is not a metric of lm-eval task 'gsm8k'"),
    ({"filter": "loose"}, r"tasks\.t\.filter: 'loose' is not a filter of lm-eval task 'gsm8k'"),
    ({"splits": {"search": 190, "test": 20}}, r"tasks\.t\.splits: the evaluation split has 200 documents but the "
                                              "splits need 210"),
    ({"scorer": "lm_eval_acc"}, r"tasks\.t\.scorer: comes from the lm-eval task; leave it out"),
])
def test_bad_input_stops_before_any_job_naming_the_key(change, message):
    with pytest.raises(MergeflowError, match=message):
        resolved({"t": {**GSM8K, **change}})


@needs_lm_eval
def test_a_pool_of_tasks_scored_differently_is_refused(tmp_path):
    from mergeflow.lm_eval_tasks import fill_task, task_specs

    specs = task_specs("p", {**GSM8K, "lm_eval": "gsm8k"}) + task_specs("p", {**ARC})
    with pytest.raises(MergeflowError, match=r"tasks\.p: the pooled subtasks are scored differently"):
        fill_task("p", tasks_config({"p": {**GSM8K, "pool": True}})["tasks"]["p"], specs)


def test_without_lm_eval_installed_an_lm_eval_task_is_refused_and_the_default_config_reads(monkeypatch):
    """An lm-eval task names the missing extra; a config without one never imports lm-eval."""
    from mergeflow.config import load_config
    from mergeflow.lm_eval_tasks import resolve_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    with pytest.raises(MergeflowError, match=r'config: tasks\.t\.lm_eval: lm-evaluation-harness is not installed '
                                             r'.*pip install -e "\.\[lm-eval\]"'):
        resolve_tasks(tasks_config({"t": GSM8K}))
    assert list(load_config(REPO / "config" / "config.yaml")["tasks"]) == ["math_l2", "math_l1", "read_l2"]


# ---------------------------------------------------------------------------------------------
# The data stage


@needs_lm_eval
@pytest.mark.parametrize("name, chat", [("gsm", False), ("arc", False), ("arc", True), ("mgsm_direct_ja", False)])
def test_items_hold_lm_evals_own_requests(name, chat):
    """Every item's context (or chat turns), choices and generation arguments are those lm-eval's
    own build_all_requests gives the same document, with the few-shot seed it uses by default."""
    from mergeflow.lm_eval_tasks import build_task, lm_eval_items

    extra = {"apply_chat_template": True, "system_instruction": "Answer."} if chat else {}
    task = resolved({"gsm": GSM8K, "arc": {**ARC, **extra}, "mgsm": MGSM})["tasks"][name]
    items = lm_eval_items(name, task)
    peer = build_task(task["resolved"]["specs"][0], name)
    peer.set_fewshot_seed(seed=1234)
    peer.set_config(key="num_fewshot", value=task.get("num_fewshot", peer.config.num_fewshot or 0))
    record = (lambda turns, add_generation_prompt=True: json.dumps({"messages": turns,
                                                                    "add_generation_prompt": add_generation_prompt}))
    peer.build_all_requests(apply_chat_template=chat, fewshot_as_multiturn=chat, chat_template=record if chat else None,
                            system_instruction=extra.get("system_instruction"))
    by_doc: dict[int, list] = {}
    for instance in peer.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    assert sorted(by_doc) == list(items["doc_id"])
    for item in items.itertuples():
        requests = by_doc[item.doc_id]
        context = requests[0].arguments[0]
        if chat:
            turns = json.loads(item.chat)
            assert {k: turns[k] for k in ("messages", "add_generation_prompt")} == json.loads(context)
            assert turns["delimiter"] == "" and turns["messages"][0] == {"role": "system", "content": "Answer."}
        else:
            assert item.prompt == context
        if task["scorer"].startswith("lm_eval_acc"):
            delimiter = "" if chat else task["target_delimiter"]
            assert [r.arguments[1] for r in requests] == [delimiter + c for c in item.choices]
        else:
            until, max_gen_toks = requests[0].arguments[1]["until"], requests[0].arguments[1].get("max_gen_toks", 256)
            assert (list(item.until), item.max_gen_toks) == (until, max_gen_toks)


@needs_lm_eval
def test_few_shot_examples_come_from_the_few_shot_split_never_from_search_or_test_items():
    """gsm8k's 5 examples are train documents (their indices in lm-eval's pool, per item), and
    no train document is a test document (the check that refuses overlapping splits)."""
    from mergeflow.data import split_task

    task = resolved({"gsm": GSM8K})["tasks"]["gsm"]
    parts = split_task("gsm", task, seed=0)
    train = [json.loads(line) for line in (DATA / "gsm8k_train.jsonl").read_text().splitlines()]
    items = pd.concat(parts.values())
    questions = set(items["prompt"].str.extract(r"Question: ([^\n]*)\nAnswer:$", expand=False))
    for item in items.itertuples():
        assert len(item.fewshot) == 5
        for shot in item.fewshot:
            assert f"Question: {train[shot]['question']}\nAnswer: {train[shot]['answer']}\n\n" in item.prompt
            assert train[shot]["question"] not in questions


# ---------------------------------------------------------------------------------------------
# Scoring: the same answers as lm-eval


@needs_lm_eval
def test_generations_are_judged_by_the_task_s_own_filters_and_metric():
    from mergeflow.lm_eval_tasks import judge_generations, lm_eval_items

    task = resolved({"gsm": GSM8K})["tasks"]["gsm"]
    items = lm_eval_items("gsm", task).head(3)
    gold = [t.split("#### ")[-1] for t in items["target"]]
    generations = [f"So it is {gold[0]}.\n#### {gold[0]}", f"The answer is {gold[1]}.", "#### 7,000,001"]
    correct, columns = judge_generations(items, generations)
    assert list(correct) == [1, 0, 0]  # strict-match: the number after ####
    assert columns["filtered"] == [gold[0], "[invalid]", "7,000,001"]
    assert json.loads(columns["metrics"][1]) == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}


@needs_lm_eval
@pytest.mark.slow
def test_a_tiny_model_answers_as_lm_eval_s_hf_model_item_for_item(tmp_path):
    """On a tiny Llama: lm-eval's simple_evaluate (HF backend) over the same task objects against
    our evaluator on our item files: the same contexts, log-likelihoods within 1e-4, acc and
    acc_norm (multiple choice), acc (loglikelihood: greedy or not), generations and filtered
    answers, and each metric under each filter."""
    import lm_eval as harness
    import torch
    from lm_eval.models.huggingface import HFLM

    from factories import make_model
    from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm
    from mergeflow.lm_eval_tasks import build_task, lm_eval_items

    torch.set_num_threads(1)
    model_dir = make_model(tmp_path / "tiny", 0)
    files = {}
    for name, rows in (("gsm8k", 16), ("arc_numbers", 16), ("mgsm_ja", 16)):  # small copies of the local files
        for split in ("train", "test"):
            text = (DATA / f"{name}_{split}.jsonl").read_text().splitlines()
            (tmp_path / f"{name}_{split}.jsonl").write_text("\n".join(text[:rows if split == "test" else 40]) + "\n")
        files[name] = {"dataset_path": "json", "data_files": {s: str(tmp_path / f"{name}_{s}.jsonl") for s in ("train", "test")}}
    # lambada_openai (loglikelihood: the last word after the rest) on GSM8K's questions
    questions = [json.loads(line)["question"] for line in (DATA / "gsm8k_test.jsonl").read_text().splitlines()[:16]]
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": q}) + "\n" for q in questions))
    splits = {"search": 8, "test": 8}
    config = resolved({"gsm": {"lm_eval": "gsm8k", "max_gen_toks": 8, "splits": splits, **files["gsm8k"]},
                       "arc": {"lm_eval": "arc_easy", "num_fewshot": 2, "splits": splits, **files["arc_numbers"]},
                       "mgsm": {"lm_eval": "mgsm_direct_ja", "max_gen_toks": 8, "splits": splits, **files["mgsm_ja"]},
                       "lamb": {"lm_eval": "lambada_openai", "splits": splits, "dataset_path": "json",
                                "data_files": {"test": str(tmp_path / "lambada.jsonl")}}})
    settings = EvalSettings.from_config({"batch_size": 4})
    model, tokenizer = load_causal_lm(model_dir, settings)
    peer = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu", dtype="float32")
    for name, task in config["tasks"].items():
        items = lm_eval_items(name, task)
        ours = evaluate_items(model, tokenizer, items, task["scorer"], settings, task["target_delimiter"])
        spec = task["resolved"]["specs"][0]
        result = harness.simple_evaluate(model=peer, tasks=[build_task(spec, name)], num_fewshot=task.get("num_fewshot"),
                                         log_samples=True, batch_size=4)
        samples = {(s["doc_id"], s["filter"]): s for s in result["samples"][spec["task"]]}  # one per filter
        assert sorted({doc for doc, _ in samples}) == list(items["doc_id"])
        for item, row in zip(items.itertuples(), ours.itertuples()):
            for (doc, filter_), sample in samples.items():
                if doc != item.doc_id:
                    continue
                assert sample["arguments"][0][0] == item.prompt
                if task["scorer"] == "lm_eval_loglik":
                    assert abs(float(sample["resps"][0][0][0]) - row.loglik) < 1e-4
                    assert row.correct == int(sample["acc"])
                elif task["scorer"] == "lm_eval_acc_norm":
                    logliks = [float(r[0][0]) for r in sample["resps"]]
                    assert max(abs(a - b) for a, b in zip(logliks, row.choice_logliks)) < 1e-4
                    assert (row.acc, row.acc_norm) == (int(sample["acc"]), int(sample["acc_norm"]))
                else:
                    assert row.generation == sample["resps"][0][0]
                    assert json.loads(row.metrics)[f"{spec['metric']},{filter_}"] == float(sample[spec["metric"]])
                    if filter_ == spec["filter"]:
                        assert row.filtered == sample["filtered_resps"][0]


@needs_lm_eval
def test_a_loglikelihood_task_is_correct_where_its_answer_is_the_greedy_continuation(tmp_path):
    """lm-eval's loglikelihood output type: the answer's log-likelihood, and acc when every one of
    its tokens is the most likely."""
    import numpy as np
    import torch

    from factories import make_model
    from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm

    torch.set_num_threads(1)
    settings = EvalSettings.from_config({"batch_size": 4})
    model, tokenizer = load_causal_lm(make_model(tmp_path / "tiny", 0), settings)
    prompts = ["tom has 3 apples and", "ann has", "the sum is"]
    # the greedy continuation of the first prompt (two tokens) is correct by construction
    ids = tokenizer(prompts[0], add_special_tokens=True, return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1]:]
    targets = [" " + tokenizer.decode(greedy), " apples", " 9"]
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "prompt": prompts, "choices": [[]] * 3, "answer": [-1] * 3,
                          "target": targets})
    out = evaluate_items(model, tokenizer, items, "lm_eval_loglik", settings, "")
    assert out["correct"].iloc[0] == 1 and set(out.columns) == {"item_id", "correct", "loglik"}
    assert np.all(out["loglik"] < 0)


# ---------------------------------------------------------------------------------------------
# The workflow on lm-eval tasks


def lm_eval_micro_config() -> dict:
    """The micro workflow's zoo with two lm-eval tasks on local files (arc_easy, 2-shot, multiple
    choice; gsm8k, 5-shot, generation), a search on every item of arc's search split and one on
    IRT anchors of it (calibration, fit and anchors read only our item files)."""
    from test_workflow import micro_config

    config = micro_config()
    config["tasks"] = {"arc": {**ARC, "num_fewshot": 2, "splits": {"search": 40, "test": 20}},
                       "gsm": {**GSM8K, "max_gen_toks": 4, "splits": {"search": 20, "test": 10}}}
    config["irt"] = {"steps": 100, "calibration": {"random_merges": 4}}
    space = {"method": "task_arithmetic", "layer_groups": 2, "parameters": {"weight": {"min": 0.0, "max": 1.5}}}
    evolve = {"objectives": {"arc": 1.0}, "population": 3, "generations": 2, "search_space": space}
    config["runs"] = {"full": {"tasks": ["arc", "gsm"], "evolve": {**evolve, "fitness": {"kind": "full"}}},
                      "anchored": {"tasks": ["arc"], "evolve": {**evolve, "fitness": {
                          "kind": "anchors", "anchors": {"strategy": "irt", "n": 8}}}}}
    return config


@needs_lm_eval
@pytest.mark.slow
def test_a_zoo_sized_run_over_lm_eval_tasks_runs_end_to_end(tmp_path):
    from test_workflow import snakemake

    config = lm_eval_micro_config()
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr[-4000:]
    results = tmp_path / "results"
    arc = pd.read_parquet(results / "data" / "arc" / "search.parquet")
    assert len(arc) == 40 and arc["item_id"].str.startswith("arc_easy-").all()
    assert all(len(shots) == 2 for shots in arc["fewshot"]) and arc["prompt"].str.endswith("\nAnswer:").all()
    responses = pd.read_parquet(results / "responses" / "arc" / "test" / "math.parquet")
    assert {"acc", "acc_norm", "choice_logliks"} <= set(responses.columns)
    assert (responses["correct"] == responses["acc_norm"]).all()
    generated = pd.read_parquet(results / "responses" / "gsm" / "test" / "math.parquet")
    assert {"generation", "filtered", "metrics"} <= set(generated.columns) and len(generated) == 10
    assert set(json.loads(generated["metrics"].iloc[0])) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert len(pd.read_parquet(results / "anchors" / "arc" / "irt-8-seed0.parquet")) == 8
    for run in ("full", "anchored"):
        history = pd.read_parquet(results / "runs" / run / "evolve" / "history.parquet")
        assert len(history) == 6 and history["fitness"].between(0, 1).all()
        table = pd.read_parquet(results / "runs" / run / "final" / "test.parquet")
        assert "merged" in set(table["model"])
    assert set(pd.read_parquet(results / "runs" / "full" / "final" / "test.parquet")["task"]) == {"arc", "gsm"}


@needs_lm_eval
@pytest.mark.slow
def test_the_example_config_plans_one_data_job_per_lm_eval_subtask():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile",
                           str(REPO / "config" / "examples" / "lm-eval-tasks.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    planned = done.stdout + done.stderr
    for task in ("gsm8k", "mgsm_direct_en", "mgsm_direct_ja", "arc"):
        assert f"results/data/{task}/search.parquet" in planned
