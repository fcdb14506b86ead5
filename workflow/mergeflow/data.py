"""The data stage: load a task's source with ``datasets``, render prompts, and split it.

A task's source is a local parquet / jsonl / csv file or a hub dataset (id, config, split). The
stage writes ``data/{task}/{split}.parquet`` for the disjoint splits ``search`` (fitness during
the search) and ``test`` (the final table), with the columns the evaluator reads: ``item_id``,
``prompt``, ``choices``, ``answer`` (gold index; -1 for generative tasks), ``target`` (gold text),
and ``subscenario`` where the source has one. A task with a ``search_source`` (prompts without
answers) draws its search split from it, without ``answer`` and ``target`` (:data:`PROMPT_COLUMNS`),
and its test split from ``source``; a prompt of the test split found there is left out of the search
split (logged), so the search never adapts on an item the final table scores.
"""

from __future__ import annotations

import logging
import re
import string
from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.errors import DataError, MergeflowError
from mergeflow.lm_eval_tasks import lm_eval_items
from mergeflow.schema import validate_section
from mergeflow.scorers import get_scorer

log = logging.getLogger(__name__)

SPLITS = ("search", "test")
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_source(task: str, source: dict) -> pd.DataFrame:
    """Load a task's rows with ``datasets``: a local file (``path``) or a hub id (``hub``)."""
    import datasets  # heavy (seconds): only where a task source is read, not where the config is checked

    datasets.disable_progress_bars()
    if "path" in source:
        path = Path(source["path"])
        if not path.exists():
            raise MergeflowError(f"task {task!r}: source file {str(path)!r} does not exist")
        fmt = LOCAL_FORMATS.get(path.suffix)
        if fmt is None:
            raise MergeflowError(f"task {task!r}: source {str(path)!r} must end in one of {sorted(LOCAL_FORMATS)}")
        if _local_rows(task, path, fmt) == 0:
            raise MergeflowError(f"task {task!r}: source {str(path)!r} has no rows")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as err:
            raise MergeflowError(f"task {task!r}: cannot read source {str(path)!r} as {fmt} "
                                 f"({_root_cause(err)})") from err
    else:
        split = source["split"]
        try:
            ds = datasets.load_dataset(source["hub"], source.get("name"), split=split,
                                       revision=source.get("revision"))
        except Exception as err:
            what = ", ".join(f"{key} {source[key]!r}" for key in ("name", "revision") if key in source)
            raise MergeflowError(
                f"task {task!r}: cannot load hub dataset {source['hub']!r} ({what + ', ' if what else ''}"
                f"split {split!r}): {err}. Offline, the dataset must already be in the datasets cache "
                "(HF_DATASETS_OFFLINE=1 then reads it from there); or give the task a local source.path"
            ) from err
    frame = ds.to_pandas()
    if len(frame) == 0:
        raise MergeflowError(f"task {task!r}: source {source} has no rows")
    return frame


def task_files(tcfg: dict) -> list[str]:
    """The local files a task's items are rendered from: its source file, or the data files of an
    lm-evaluation-harness task (as the config named them; filled in when the config was read)."""
    if "lm_eval" in tcfg:
        return list(tcfg["resolved"]["files"])
    return [tcfg[key]["path"] for key in ("source", "search_source") if "path" in tcfg.get(key, {})]


def _local_rows(task: str, path: Path, fmt: str) -> int | None:
    """Row count of a local file where it is cheap to know (``datasets`` fails on empty files,
    and cryptically on a file that is not what its suffix says)."""
    if fmt == "parquet":
        import pyarrow  # pyarrow's parquet reader, only for this count
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows
        except pyarrow.ArrowException as err:
            raise MergeflowError(f"task {task!r}: source {str(path)!r} is not a parquet file ({err})") from err
    if fmt == "csv":
        with path.open(errors="replace") as lines:  # a header alone has no rows; read no further than one
            nonblank = (line for line in lines if line.strip())
            next(nonblank, None)
            return None if next(nonblank, None) is not None else 0
    return None if path.stat().st_size else 0


def _root_cause(err: BaseException) -> str:
    """The innermost error's message: ``datasets`` wraps a parse error in "An error occurred while
    generating the dataset", which names neither the file's fault nor its place (the error it was
    raised from does)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}"


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The answer number of a text (a generation or a gold answer): after '####' if present,
    else the last number."""
    if "####" in text:
        text = text.split("####")[-1]
    found = NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def template_fields(template: str, where: str = "template") -> list[str]:
    """The columns a prompt template names (``{column}``); ``where`` names the template in errors
    (its config key). Positional (``{}``), attribute and index fields are refused."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise MergeflowError(f"{where}: {template!r} is not a valid template ({err}); "
                             "a literal brace is written {{ or }}") from None
    for field in fields:
        if field == "" or field.isdigit() or any(c in field for c in ".[]"):
            raise MergeflowError(f"{where}: field {{{field}}} of {template!r} is not a column name; "
                                 "name a column, e.g. {question}")
    return fields


def _missing(value) -> bool:
    """A null cell: None, or a float NaN as pandas reads a null."""
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _unusable(value) -> str | None:
    """Why a cell cannot be a prompt's or an answer's text: null, or empty (an empty question
    would be scored as an item, the model answering the template alone); None when it can."""
    if _missing(value):
        return "is null"
    if isinstance(value, str) and not value.strip():
        return f"is empty ({value!r}); drop the row or fill it"
    return None


def _require_columns(task: str, frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MergeflowError(
            f"task {task!r}: {what} names column(s) {missing} that the dataset lacks; "
            f"its columns are {list(frame.columns)}"
        )


def _choices_list(task: str, item_id: str, column: str, value) -> list[str]:
    """An item's options: a list (or array), or ``{text: [...]}`` as in ARC; anything else —
    a string above all, which would split into characters — is refused."""
    if isinstance(value, dict) and "text" in value:  # e.g. ARC's {"text": [...], "label": [...]}
        value = value["text"]
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise DataError(f"task {task!r}, item {item_id!r}: choices column {column!r} holds "
                        f"{type(value).__name__} {value!r}, not a list of options")
    if len(value) < 2 or any(_missing(v) for v in value):
        raise DataError(f"task {task!r}, item {item_id!r}: choices column {column!r} holds {list(value)!r}; "
                        "it needs at least two options, none of them null")
    return [str(v) for v in value]


def _gold_index(task: str, item_id: str, answer, choices: list[str]) -> int:
    if isinstance(answer, (int, np.integer)) and 0 <= int(answer) < len(choices):
        return int(answer)
    if str(answer) in choices:
        return choices.index(str(answer))
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if str(answer) in letters:
        return letters.index(str(answer))
    raise MergeflowError(f"task {task!r}, item {item_id!r}: answer {answer!r} is neither an index nor one of the choices")


def render_items(task: str, frame: pd.DataFrame, cfg: dict, labelled: bool = True) -> pd.DataFrame:
    """Turn source rows into evaluator items (without few-shot context); not ``labelled``, their
    prompts and choices only (no answer column is read)."""
    template = cfg["template"]
    multiple_choice = get_scorer(cfg["scorer"]).choices
    fields = template_fields(template, f"tasks.{task}.template")
    answer = [cfg["answer"]] if labelled else []
    _require_columns(task, frame, fields, f"template {template!r}")
    _require_columns(task, frame, answer, "'answer'")
    if multiple_choice:
        _require_columns(task, frame, [cfg["choices"]], "'choices'")
    id_col = cfg.get("id_column")
    if id_col is not None:
        _require_columns(task, frame, [id_col], "'id_column'")
    sub_col = cfg.get("subscenario")
    if sub_col is not None:
        _require_columns(task, frame, [sub_col], "'subscenario'")

    rows = []
    for pos, rec in enumerate(frame.to_dict("records")):
        if id_col and _missing(rec[id_col]):
            raise DataError(f"task {task!r}, row {pos}: id column {id_col!r} is null")
        item_id = str(rec[id_col]) if id_col else f"{task}-{pos:06d}"
        for column in [*fields, *answer]:
            if why := _unusable(rec[column]):
                what = "answer" if column in answer and column not in fields else "template field"
                raise DataError(f"task {task!r}, item {item_id!r}: {what} {column!r} {why}")
        prompt = template.format(**{f: rec[f] for f in fields})
        choices = _choices_list(task, item_id, cfg["choices"], rec[cfg["choices"]]) if multiple_choice else []
        row = {"item_id": item_id, "prompt": prompt, "choices": choices}
        if labelled and multiple_choice:
            gold = _gold_index(task, item_id, rec[cfg["answer"]], choices)
            row.update(answer=gold, target=choices[gold])
        elif labelled:
            target = str(rec[cfg["answer"]])
            if extract_number(target) is None:
                raise DataError(f"task {task!r}, item {item_id!r}: answer column {cfg['answer']!r} holds "
                                f"{target!r}, which has no number for exact_match to compare with")
            row.update(answer=-1, target=target)
        if sub_col is not None:
            row["subscenario"] = str(rec[sub_col])
        rows.append(row)
    items = pd.DataFrame(rows)
    dup = items["item_id"][items["item_id"].duplicated()]
    if len(dup):
        raise DataError(f"task {task!r}: item ids of column {id_col!r} are not unique ({len(dup)} repeated, "
                        f"e.g. {dup.iloc[0]!r})")
    return items


def render_pairs(where: str, frame: pd.DataFrame, template: str, answer: str) -> tuple[list[str], list[str]]:
    """Prompts and answer texts of training pairs (a fine-tune's data); ``where`` names the config
    section in errors."""
    fields = template_fields(template, f"{where}.template")
    missing = [c for c in [*fields, answer] if c not in frame.columns]
    if missing:
        raise MergeflowError(f"{where}: template or answer names column(s) {missing} that the dataset lacks; "
                             f"its columns are {list(frame.columns)}")
    prompts, answers = [], []
    for pos, rec in enumerate(frame.to_dict("records")):
        for column in [*fields, answer]:
            if why := _unusable(rec[column]):
                raise DataError(f"{where}: row {pos}: column {column!r} {why}")
        prompts.append(template.format(**{f: rec[f] for f in fields}))
        answers.append(str(rec[answer]))
    return prompts, answers


def fewshot_prefix(examples: pd.DataFrame, separator: str, delimiter: str) -> str:
    return "".join(p + delimiter + t + separator for p, t in zip(examples["prompt"], examples["target"]))


def split_task(task: str, cfg: dict, seed: int, frame: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Disjoint, seeded ``search`` and ``test`` splits (and a few-shot pool) of a task; ``cfg``
    is the task's config section (checked against the schema here, its defaults filled). A task
    of lm-evaluation-harness (``lm_eval``) is split over the documents of its evaluation split,
    rendered by lm-eval (its few-shot examples come from its own few-shot split)."""
    cfg = validate_section(cfg, "task", f"tasks.{task}")
    sizes = {s: cfg["splits"][s] for s in SPLITS}
    if "lm_eval" in cfg:
        return seeded_splits(task, lm_eval_items(task, cfg), sizes, seed)[0]
    if frame is None:
        frame = load_source(task, cfg["source"])
    items = render_items(task, frame, cfg)
    shots = cfg["fewshot"]
    k = shots["k"]
    unlabelled = "search_source" in cfg  # the search split's prompts come without answers
    parts, pool_items = seeded_splits(task, items, {**sizes, "search": 0} if unlabelled else sizes, seed,
                                      shots.get("pool", 4 * k) if k else 0)
    if unlabelled:
        prompts = render_items(task, load_source(task, cfg["search_source"]), cfg, labelled=False)
        # a test item's prompt among them would be adapted on, then scored as held out: left out
        tested = prompts["prompt"].isin(set(parts["test"]["prompt"]))
        if tested.any():
            log.info("task %r: %d of search_source's %d prompts are test items (tasks.%s.source): left out of the "
                     "search split", task, int(tested.sum()), len(prompts), task)
        parts["search"] = prompt_split(task, prompts[~tested], sizes["search"], seed, int(tested.sum()))
    if k:
        shot_rng = np.random.default_rng([seed, 1])
        for split, part in parts.items():
            prefixes = [fewshot_prefix(pool_items.iloc[shot_rng.choice(len(pool_items), k, replace=False)],
                                       shots["separator"], cfg["target_delimiter"])
                        for _ in range(len(part))]
            parts[split] = part.assign(prompt=[p + q for p, q in zip(prefixes, part["prompt"])]).reset_index(drop=True)
    return parts


def seeded_splits(task: str, items: pd.DataFrame, sizes: dict[str, int], seed: int,
                  pool: int = 0) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """The ``test`` and ``search`` splits of ``sizes`` items and a pool of ``pool`` more, disjoint,
    drawn by one seeded permutation of ``items``."""
    need = sizes["test"] + sizes["search"] + pool
    if len(items) < need:
        raise MergeflowError(
            f"task {task!r}: the source has {len(items)} items but the splits need {need} "
            f"(test {sizes['test']} + search {sizes['search']}" + (f" + few-shot pool {pool})" if pool else ")"))
    order = np.random.default_rng(seed).permutation(len(items))
    parts = {"test": items.iloc[order[: sizes["test"]]].reset_index(drop=True),
             "search": items.iloc[order[sizes["test"]: sizes["test"] + sizes["search"]]].reset_index(drop=True)}
    return parts, items.iloc[order[sizes["test"] + sizes["search"]: need]]


def prompt_split(task: str, prompts: pd.DataFrame, size: int, seed: int, tested: int = 0) -> pd.DataFrame:
    """A search split of ``size`` prompts without answers, drawn by a seeded permutation (from those
    left once ``tested`` prompts of the test split were left out)."""
    if len(prompts) < size:
        but = f" once the {tested} that are test items are left out" if tested else ""
        raise MergeflowError(f"task {task!r}: search_source has {len(prompts)} prompts{but} but "
                             f"tasks.{task}.splits.search asks for {size}")
    order = np.random.default_rng([seed, 2]).permutation(len(prompts))
    return prompts.iloc[order[:size]].reset_index(drop=True)


def write_splits(parts: dict[str, pd.DataFrame], out: dict[str, str | Path]) -> None:
    for split, path in out.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        parts[split].to_parquet(path, index=False)


SPLIT_COLUMNS = ("item_id", "prompt", "choices", "answer", "target")
# The columns a split's items are presented to a model from, without their gold answers.
PROMPT_COLUMNS = ("item_id", "prompt", "choices")


def read_split(path: str | Path, columns: tuple[str, ...] = SPLIT_COLUMNS) -> pd.DataFrame:
    """A rendered split, checked: it exists, has the data stage's columns, and is not empty.
    Given ``columns`` (e.g. :data:`PROMPT_COLUMNS`), only those are read and required."""
    if not Path(path).exists():
        raise MergeflowError(f"split file {str(path)!r} does not exist")
    import pyarrow.parquet as pq  # its schema alone: which columns there are

    present = pq.read_schema(path).names
    missing = [c for c in columns if c not in present]
    if missing:
        raise MergeflowError(f"split file {str(path)!r} lacks columns {missing}")
    # the data stage's columns not asked for stay unread (what else the split holds is read)
    frame = pd.read_parquet(path, columns=[c for c in present if c in columns or c not in SPLIT_COLUMNS])
    if len(frame) == 0:
        raise MergeflowError(f"split file {str(path)!r} is empty")
    return frame
