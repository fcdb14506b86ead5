"""The data stage: rendering, disjoint seeded splits, few-shot prompts, and clear errors."""

import pandas as pd
import pytest

from mergeflow.data import split_task
from mergeflow.errors import DataError, MergeflowError


def _source(tmp_path, n=50, fmt="parquet"):
    frame = pd.DataFrame({
        "qid": [f"q{i}" for i in range(n)],
        "question": [f"what is {i} plus 1 ?" for i in range(n)],
        "options": [[str(i + 1), str(i), str(i + 2)] for i in range(n)],
        "label": [0] * n,
        "topic": ["a" if i % 2 else "b" for i in range(n)],
    })
    path = tmp_path / f"src.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def _cfg(path, **over):
    cfg = {"source": {"path": str(path)}, "template": "Q: {question}\nA:", "choices": "options", "answer": "label",
           "id_column": "qid", "subscenario": "topic", "scorer": "mc_loglik", "splits": {"search": 30, "test": 10}}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_splits_are_disjoint_seeded_and_rendered(tmp_path, fmt):
    path = _source(tmp_path, fmt=fmt)
    parts = split_task("t", _cfg(path), seed=3)
    assert len(parts["search"]) == 30 and len(parts["test"]) == 10
    assert not set(parts["search"]["item_id"]) & set(parts["test"]["item_id"])
    row = parts["test"].iloc[0]
    n = int(row["item_id"][1:])
    assert row["prompt"] == f"Q: what is {n} plus 1 ?\nA:"
    assert list(row["choices"]) == [str(n + 1), str(n), str(n + 2)] and row["target"] == str(n + 1)
    assert set(parts["search"]["subscenario"]) == {"a", "b"}
    again = split_task("t", _cfg(path), seed=3)
    pd.testing.assert_frame_equal(parts["search"], again["search"])
    other = split_task("t", _cfg(path), seed=4)
    assert list(other["search"]["item_id"]) != list(parts["search"]["item_id"])


def test_fewshot_examples_come_from_outside_both_splits(tmp_path):
    path = _source(tmp_path)
    parts = split_task("t", _cfg(path, fewshot={"k": 2, "pool": 5}), seed=0)
    evaluated = set(parts["search"]["item_id"]) | set(parts["test"]["item_id"])
    prompt = parts["test"]["prompt"].iloc[0]
    assert prompt.count("Q: ") == 3
    shots = [int(line.split()[3]) for line in prompt.split("\n") if line.startswith("Q:")][:2]
    assert all(f"q{s}" not in evaluated for s in shots)


def test_generative_task_keeps_answer_text(tmp_path):
    path = _source(tmp_path)
    parts = split_task("t", _cfg(path, scorer="exact_match", answer="qid"), seed=0)
    row = parts["test"].iloc[0]
    assert row["answer"] == -1 and row["target"] == row["item_id"] and len(row["choices"]) == 0


def test_template_column_missing_is_named(tmp_path):
    with pytest.raises(MergeflowError, match=r"task 't': template .* names column\(s\) \['passage'\]"):
        split_task("t", _cfg(_source(tmp_path), template="{passage} {question}"), seed=0)


def test_empty_split_is_named(tmp_path):
    with pytest.raises(MergeflowError, match=r"at tasks\.t\.splits\.test: 0 is less than the minimum of 1"):
        split_task("t", _cfg(_source(tmp_path), splits={"search": 10, "test": 0}), seed=0)


def test_too_few_items_are_named(tmp_path):
    with pytest.raises(MergeflowError, match="has 50 items but the splits need 60"):
        split_task("t", _cfg(_source(tmp_path), splits={"search": 50, "test": 10}), seed=0)


def test_empty_source_is_named(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"question": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(MergeflowError, match="has no rows"):
        split_task("t", _cfg(path), seed=0)


@pytest.mark.parametrize("name, text, message", [
    ("src.csv", "", "has no rows"),
    ("src.csv", "question,label\n", "has no rows"),
    ("src.csv", 'question,label\n"what,1\n', r"cannot read source .*src.csv' as csv \(ParserError: .*EOF inside string"),
    ("src.parquet", "not parquet", r"source .*src.parquet' is not a parquet file"),
    ("src.jsonl", "{not json\n", r"cannot read source .*src.jsonl' as json \(ArrowInvalid: JSON parse error"),
])
def test_empty_and_unreadable_sources_are_named(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(MergeflowError, match=message):
        split_task("t", _cfg(path), seed=0)


@pytest.mark.parametrize("column, value, message", [
    ("question", "", r"task 't', item 'q3': template field 'question' is empty \(''\)"),
    ("question", " \n ", r"task 't', item 'q3': template field 'question' is empty"),
    ("qid", None, r"task 't', row 3: id column 'qid' is null"),
    ("qid", "q4", r"task 't': item ids of column 'qid' are not unique \(1 repeated, e.g. 'q4'\)"),
])
def test_empty_prompts_and_bad_ids_are_named(tmp_path, column, value, message):
    frame = pd.read_parquet(_source(tmp_path))
    frame[column] = frame[column].astype(object)
    frame.at[3, column] = value
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=message):
        split_task("t", _cfg(tmp_path / "bad.parquet"), seed=0)


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(MergeflowError, match="source file .*nope.parquet' does not exist"):
        split_task("t", _cfg(tmp_path / "nope.parquet"), seed=0)


def test_a_bad_split_file_is_named(tmp_path):
    from mergeflow.data import read_split

    with pytest.raises(MergeflowError, match="does not exist"):
        read_split(tmp_path / "missing.parquet")
    path = tmp_path / "search.parquet"
    pd.DataFrame({"item_id": ["a"], "prompt": ["p"]}).to_parquet(path)
    with pytest.raises(MergeflowError, match=r"lacks columns \['choices', 'answer', 'target'\]"):
        read_split(path)
    pd.DataFrame({c: [] for c in ["item_id", "prompt", "choices", "answer", "target"]}).to_parquet(path)
    with pytest.raises(MergeflowError, match="is empty"):
        read_split(path)


def _offline(monkeypatch):
    """No hub access, as here and in CI: datasets must find everything locally."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_source_loads_a_dataset_repository_offline(tmp_path, monkeypatch):
    # a dataset repository as the hub serves it (data/<split>-*.parquet), cloned to disk:
    # the same datasets.load_dataset(id, name, split=...) call reads it, offline
    _offline(monkeypatch)
    repo = tmp_path / "org--quiz"
    (repo / "data").mkdir(parents=True)
    frame = pd.read_parquet(_source(tmp_path))
    frame.iloc[:45].to_parquet(repo / "data" / "test-00000-of-00001.parquet")
    frame.iloc[45:].to_parquet(repo / "data" / "train-00000-of-00001.parquet")
    parts = split_task("t", _cfg(None, source={"hub": str(repo), "split": "test"}), seed=3)
    assert len(parts["search"]) == 30 and len(parts["test"]) == 10
    items = set(parts["search"]["item_id"]) | set(parts["test"]["item_id"])
    assert items <= {f"q{i}" for i in range(45)}  # only the requested split
    with pytest.raises(MergeflowError, match=r"task 't'.*split 'validation'"):
        split_task("t", _cfg(None, source={"hub": str(repo), "split": "validation"}), seed=3)


def test_unreachable_hub_dataset_is_named(monkeypatch):
    _offline(monkeypatch)
    source = {"hub": "some-org/not-cached-anywhere", "name": "main", "split": "test"}
    with pytest.raises(MergeflowError, match=r"task 'gsm'.*'some-org/not-cached-anywhere' \(name 'main', split 'test'\).*local source.path"):
        split_task("gsm", _cfg(None, source=source), seed=0)


def _frame(n=50, **columns):
    frame = pd.DataFrame({"qid": [f"q{i}" for i in range(n)], "question": [f"what is {i} plus 1 ?" for i in range(n)],
                          "options": [[str(i + 1), str(i)] for i in range(n)], "label": [0] * n,
                          "solution": [f"it is #### {i + 1}" for i in range(n)]})
    for name, values in columns.items():
        frame[name] = values
    return frame


def test_exact_match_answer_without_a_number_is_named(tmp_path):
    frame = _frame(solution=[f"it is #### {i + 1}" for i in range(49)] + ["it is forty-nine"])
    cfg = _cfg("unused", scorer="exact_match", answer="solution", choices=None, subscenario=None)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(DataError, match=r"task 't', item 'q49': answer column 'solution' holds 'it is forty-nine', "
                                        r"which has no number"):
        split_task("t", cfg, seed=0, frame=frame)


def test_choices_given_as_a_string_are_refused_not_split_into_characters(tmp_path):
    frame = _frame(options=[["1", "0"]] * 10 + ["yes,no"] + [["1", "0"]] * 39)
    cfg = {k: v for k, v in _cfg("unused").items() if k != "subscenario"}
    with pytest.raises(DataError, match=r"task 't', item 'q10': choices column 'options' holds str 'yes,no', "
                                        r"not a list of options"):
        split_task("t", cfg, seed=0, frame=frame)


def test_a_null_template_field_is_named_not_rendered_as_nan(tmp_path):
    frame = _frame(question=[f"what is {i} plus 1 ?" for i in range(7)] + [None] + ["q"] * 42)
    cfg = {k: v for k, v in _cfg("unused").items() if k != "subscenario"}
    with pytest.raises(DataError, match=r"task 't', item 'q7': template field 'question' is null"):
        split_task("t", cfg, seed=0, frame=frame)
    frame = _frame(solution=["#### 1"] * 3 + [None] + ["#### 1"] * 46)
    cfg = {k: v for k, v in cfg.items() if k != "choices"} | {"scorer": "exact_match", "answer": "solution"}
    with pytest.raises(DataError, match=r"task 't', item 'q3': answer 'solution' is null"):
        split_task("t", cfg, seed=0, frame=frame)


@pytest.mark.parametrize("template, match", [
    ("Q: {question\nA:", "not a valid template"),
    ("Q: {}\nA:", r"field \{\} .* is not a column name"),
    ("Q: {q.text}\nA:", r"field \{q\.text\} .* is not a column name"),
])
def test_template_syntax_is_named_by_its_key(tmp_path, template, match):
    cfg = {k: v for k, v in _cfg("unused", template=template).items() if k != "subscenario"}
    with pytest.raises(MergeflowError, match=rf"tasks\.t\.template: .*{match}"):
        split_task("t", cfg, seed=0, frame=_frame())


def test_a_search_source_without_answers_gives_the_search_split_its_prompts(tmp_path):
    """``search_source``: a file with no answer column at all becomes the search split (prompts
    and choices, no ``answer`` or ``target``, with few-shot prefixes from the labelled pool); the
    labelled source gives the test split, the same items as without it, and its prompts are left
    out of the search split."""
    labelled = _source(tmp_path)
    prompts = tmp_path / "prompts.parquet"
    frame = pd.read_parquet(labelled).drop(columns=["label"])
    frame.assign(qid=[f"p{i}" for i in range(len(frame))]).to_parquet(prompts)
    cfg = _cfg(labelled, search_source={"path": str(prompts)}, fewshot={"k": 1, "pool": 5})
    parts = split_task("t", cfg, seed=3)
    search = parts["search"]
    assert len(search) == 30 and search["item_id"].str.startswith("p").all()
    assert {"answer", "target"}.isdisjoint(search.columns) and {"prompt", "choices", "subscenario"} <= set(search.columns)
    assert search["prompt"].str.count("Q: ").eq(2).all()  # one shot from the labelled pool
    assert list(parts["test"]["item_id"]) == list(split_task("t", _cfg(labelled, fewshot={"k": 1, "pool": 5}),
                                                                seed=3)["test"]["item_id"])
    # the prompts file holds every item of the source, the test split's 10 too: those are left out
    tested = set(split_task("t", _cfg(labelled), seed=3)["test"]["prompt"])
    assert len(tested) == 10 and not tested & set(split_task("t", _cfg(labelled, search_source={"path": str(prompts)}),
                                                             seed=3)["search"]["prompt"])
    with pytest.raises(MergeflowError, match=r"task 't': search_source has 40 prompts once the 10 that are test items "
                                             r"are left out but tasks\.t\.splits\.search asks for 45"):
        split_task("t", {**cfg, "splits": {"search": 45, "test": 10}}, seed=3)
