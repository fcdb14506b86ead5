"""Tasks of lm-evaluation-harness by name: ``tasks: {NAME: {lm_eval: TASK, splits: ...}}``.

The installed lm-eval (the ``lm-eval`` extra) is asked for the task through its own
``TaskManager``, and every document of the task's evaluation split is rendered into our item
files by lm-eval's own code: ``fewshot_context`` (the description, the few-shot examples its
sampler draws with its seed, ``doc_to_text``, ``target_delimiter``, ``fewshot_delimiter``, a
system instruction and, with ``apply_chat_template``, the chat turns), ``doc_to_choice`` and
``doc_to_target``. Documents are rendered in the split's order from a freshly seeded sampler, so
each item's context is the one lm-eval builds for that document when it evaluates the split.

Three stages meet lm-eval:

- reading the config (:func:`resolve_tasks`, before any job): the name is looked up (a group or
  tag becomes one task per subtask, or one pooled task), every subtask is built once (its data
  loaded through ``datasets`` as lm-eval loads it), and what can only fail later is checked now;
  the task's ``scorer`` and ``target_delimiter`` are filled in from its output type and metric;
- the data stage (:func:`lm_eval_items`): items with the whole rendered context (``prompt``), the
  chat turns where the chat template is applied (``chat``), the choices and gold answer, the
  generation arguments (``until``, ``max_gen_toks``), the document's index (``doc_id``) in the
  evaluation split and the few-shot examples' indices (``fewshot``) in the few-shot pool;
- judging generations (:func:`judge_generations`): the task's filter pipeline and its
  ``process_results`` (its metric) applied to our greedy generations by lm-eval's own code.

Few-shot examples never come from our search or test items: those are documents of the
evaluation split, and a task whose few-shot pool is that split, or holds any document equal to
one of it (the same file under two split names), is refused before any job. So no item's context
holds another item, whichever seeded subsets the search and test splits are.

lm-eval is imported only here and only for a config that names an lm-eval task.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from mergeflow.errors import DataError, MergeflowError

log = logging.getLogger(__name__)

# Output types -> our scorer; a multiple-choice task's by the metric that is an item's correctness.
MULTIPLE_CHOICE = {"acc": "lm_eval_acc", "acc_norm": "lm_eval_acc_norm"}
SCORERS = {"generate_until": "lm_eval_generate", "loglikelihood": "lm_eval_loglik"}
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood")
# Our keys that override the task's dataset (per task, or per subtask of a group).
DATASET_KEYS = ("dataset_path", "dataset_name", "data_files", "test_split", "fewshot_split")
INSTALL = 'install mergeflow with the extra: pip install -e ".[lm-eval]"'


def require_lm_eval(where: str) -> None:
    """lm-eval is importable, or an error naming ``where`` (the config key that needs it)."""
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        raise MergeflowError(f"{where}: lm-evaluation-harness is not installed ({err}); {INSTALL}") from None


@lru_cache(maxsize=1)
def _manager():
    import datasets
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()
    return TaskManager()  # indexes lm-eval's task library: seconds, once per process


def task_manager(where: str):
    """lm-eval's task manager (its index of every task, group and tag)."""
    require_lm_eval(where)
    return _manager()


def closest_names(name: str) -> list[str]:
    """lm-eval's task, group and tag names closest to ``name``."""
    return difflib.get_close_matches(name, _manager().all_tasks, n=5, cutoff=0.6)


def leaf_tasks(name: str, where: str) -> list[str]:
    """The tasks ``name`` stands for: itself, or a group's or tag's tasks, in lm-eval's order
    (groups and tags within a group expanded too). Each is then built by its own name, as
    ``lm_eval --tasks SUBTASK`` builds it: a group that overrides its members' configs is refused
    where it does so member by member, and its group-wide overrides are not applied."""
    entry = task_manager(where).task_index.get(name)
    if entry is None:
        close = closest_names(name)
        raise MergeflowError(f"{where}: {name!r} is not an lm-eval task, group or tag"
                             + (f"; closest names: {', '.join(close)}" if close else "; see lm_eval ls tasks"))
    kind = entry.kind.name
    if kind == "TAG":
        members: list = sorted(entry.tags)
    elif kind == "GROUP":
        members = entry.cfg["task"] if isinstance(entry.cfg["task"], list) else [entry.cfg["task"]]
    elif kind == "TASK":
        return [name]
    else:
        raise MergeflowError(f"{where}: lm-eval task {name!r} is defined in Python ({kind}), not by a task "
                             "config; mergeflow renders config-defined tasks only")
    leaves: list[str] = []
    for member in members:
        if not isinstance(member, str):
            raise MergeflowError(f"{where}: lm-eval group {name!r} defines its member {member!r} inline; mergeflow "
                                 "takes groups whose members are task names; name the tasks instead")
        leaves += [leaf for leaf in leaf_tasks(member, where) if leaf not in leaves]
    return leaves


def _lm_eval_overrides(entry, own: dict) -> dict:
    """lm-eval config keys that override a registered task's config: our dataset keys (a new
    ``dataset_path`` without ``dataset_name`` drops the task's, which names a config of its hub
    dataset), ``data_files`` merged into the task's ``dataset_kwargs``, and the generation keys
    merged into its ``generation_kwargs``."""
    over: dict[str, Any] = {}
    if "dataset_path" in own:
        over["dataset_path"] = own["dataset_path"]
        over["dataset_name"] = own.get("dataset_name")
    elif "dataset_name" in own:
        over["dataset_name"] = own["dataset_name"]
    if "data_files" in own:
        over["dataset_kwargs"] = {**(entry.cfg.get("dataset_kwargs") or {}), "data_files": own["data_files"]}
    for key in ("test_split", "fewshot_split"):
        if key in own:
            over[key] = own[key]
    generation = {key: own[key] for key in ("until", "max_gen_toks") if key in own}
    if generation:
        over["generation_kwargs"] = {**(entry.cfg.get("generation_kwargs") or {}), **generation}
    return over


def build_task(spec: dict, where: str):
    """The lm-eval task of a spec (``{"task": NAME, "overrides": {...}}``), built by lm-eval's own
    task factory from its registered config with our overrides (its data loaded as lm-eval loads
    it). A split the config names that the dataset lacks is named with the dataset's splits."""
    manager = task_manager(where)
    entry = manager.task_index[spec["task"]]
    overrides = spec["overrides"]
    try:
        # The factory is how lm-eval itself builds a registered task with overrides (a group's
        # members); TaskManager.load takes a dict spec only as a whole new config.
        return manager._factory.build(entry, overrides=copy.deepcopy(overrides), registry=manager.task_index)
    except KeyError as err:
        config = {**entry.cfg, **overrides}
        splits = {key: config[key] for key in ("test_split", "validation_split", "training_split", "fewshot_split")
                  if config.get(key) is not None}
        missing = [key for key, split in splits.items() if split == (err.args[0] if err.args else None)]
        if not missing:
            raise MergeflowError(f"{where}: lm-eval cannot build task {spec['task']!r}: KeyError {err}") from err
        raise MergeflowError(
            f"{where}: split {splits[missing[0]]!r} ({missing[0]}) of lm-eval task {spec['task']!r} does not exist in "
            f"its dataset; its splits are {_dataset_splits(config)}") from None
    except MergeflowError:
        raise
    except Exception as err:
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise MergeflowError(
            f"{where}: lm-eval cannot build task {spec['task']!r} ({type(cause).__name__}: {cause}); a hub dataset "
            "must already be in the datasets cache offline (HF_DATASETS_OFFLINE=1), or point the task at local files "
            "with dataset_path and data_files") from err


def _dataset_splits(config: dict) -> list[str]:
    """The split names of a task config's dataset, loaded as lm-eval loads it."""
    import datasets

    try:
        data = datasets.load_dataset(path=config["dataset_path"], name=config.get("dataset_name"),
                                     **{k: v for k, v in (config.get("dataset_kwargs") or {}).items()
                                        if k != "trust_remote_code"})
    except Exception as err:  # the split error is the one to report; the dataset's own is for lm-eval
        return [f"unknown ({type(err).__name__})"]
    return sorted(data)


@lru_cache(maxsize=None)
def _built(spec_json: str):
    """A task built once per process for judging (its sampler is never used)."""
    return build_task(json.loads(spec_json), f"lm-eval task {json.loads(spec_json)['task']!r}")


def _doc_key(doc) -> str:
    return json.dumps(doc, sort_keys=True, default=str)


def _fewshot_source(lm_task) -> str:
    """The split the few-shot examples are drawn from, as lm-eval's ``fewshot_docs`` chooses it."""
    config = lm_task.config
    if lm_task.fewshot_cfg.split is not None:
        return lm_task.fewshot_cfg.split
    if config.fewshot_config is not None and lm_task.fewshot_cfg.samples is not None:
        return "the task's fixed samples"
    for split in (config.training_split, config.validation_split, config.test_split):
        if split is not None:
            return split
    return "none"


def _eval_split(lm_task) -> str:
    return lm_task.config.test_split if lm_task.config.test_split is not None else lm_task.config.validation_split


def generation_arguments(lm_task) -> tuple[list[str], int, dict]:
    """A generate_until task's stop strings, most new tokens (lm-eval's HF default 256) and the
    rest of its generation arguments, as lm-eval's HF model normalises them."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = dict(normalize_gen_kwargs(copy.deepcopy(lm_task.config.generation_kwargs or {}), 256))
    until = kwargs.pop("until", None) or []
    return [until] if isinstance(until, str) else list(until), int(kwargs.pop("max_gen_toks")), kwargs


def check_task(key: str, tcfg: dict, leaf: str, spec: dict) -> dict:
    """Build a subtask and check what could only fail in a job; returns what the config needs
    of it: its scorer, target delimiter and document count."""
    where = f"config: tasks.{key}"
    manager = task_manager(f"{where}.lm_eval")
    output_type = manager.task_index[leaf].cfg.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise MergeflowError(f"{where}: lm-eval task {leaf!r} has output type {output_type!r}, which mergeflow does "
                             f"not score (it scores {', '.join(OUTPUT_TYPES)})")
    lm_task = build_task(spec, where)
    config = lm_task.config
    if config.repeats not in (None, 1):
        raise MergeflowError(f"{where}: lm-eval task {leaf!r} repeats each request {config.repeats} times; mergeflow "
                             "answers each item once")
    if lm_task.multiple_input:
        raise MergeflowError(f"{where}: lm-eval task {leaf!r} has one context per choice (doc_to_text gives an "
                             "index, as winogrande); mergeflow scores the choices after one context")
    metric = spec["metric"]
    metrics = list(lm_task._metric_fn_list)
    if output_type == "multiple_choice":
        if metric not in MULTIPLE_CHOICE:
            raise MergeflowError(f"{where}.metric: {metric!r} is not an item's correctness for multiple choice; "
                                 f"use one of {sorted(MULTIPLE_CHOICE)}")
        scorer = MULTIPLE_CHOICE[metric]
    elif output_type == "loglikelihood":
        if metric != "acc":
            raise MergeflowError(f"{where}.metric: {metric!r}: a loglikelihood task's item is correct when its answer "
                                 "is the greedy continuation (acc)")
        scorer = SCORERS[output_type]
    else:
        if metric not in metrics:
            raise MergeflowError(f"{where}.metric: {metric!r} is not a metric of lm-eval task {leaf!r} ({metrics})")
        filters = [ensemble.name for ensemble in lm_task._filters]
        if spec["filter"] not in filters:
            raise MergeflowError(f"{where}.filter: {spec['filter']!r} is not a filter of lm-eval task {leaf!r} "
                                 f"({filters})")
        _, _, rest = generation_arguments(lm_task)
        if rest.get("do_sample") or float(rest.get("temperature") or 0.0) > 0.0:
            raise MergeflowError(f"{where}: lm-eval task {leaf!r} samples its generations ({rest}); mergeflow "
                                 "generates greedily")
        scorer = SCORERS[output_type]
    docs = lm_task.eval_docs
    shots = num_fewshot(tcfg, lm_task)
    if shots:
        if getattr(lm_task, "sampler", None) is None:
            raise MergeflowError(f"{where}: lm-eval task {leaf!r} has no split to draw {shots} few-shot examples from; "
                                 "set fewshot_split, or num_fewshot: 0")
        source, evaluated = _fewshot_source(lm_task), _eval_split(lm_task)
        if source == evaluated:
            raise MergeflowError(
                f"{where}: lm-eval task {leaf!r} draws its {shots} few-shot examples from {source!r}, its evaluation "
                "split, whose documents are the search and test items; set fewshot_split to another split")
        pool = {_doc_key(doc) for doc in lm_task.sampler.fewshot_docs()}
        shared = [i for i, doc in enumerate(docs) if _doc_key(doc) in pool]
        if shared:
            raise MergeflowError(
                f"{where}: {len(shared)} document(s) of lm-eval task {leaf!r}'s evaluation split {evaluated!r} are "
                f"also in its few-shot split {source!r} (e.g. document {shared[0]}); the few-shot split must not "
                "overlap the evaluation split")
    delimiter = "" if output_type == "loglikelihood" else config.target_delimiter
    return {"scorer": scorer, "target_delimiter": delimiter, "documents": len(docs)}


def num_fewshot(tcfg: dict, lm_task) -> int:
    """Few-shot examples per item: ours, else the task's own, else none (as lm_eval's)."""
    if "num_fewshot" in tcfg:
        return int(tcfg["num_fewshot"])
    return int(lm_task.config.num_fewshot or 0)


def _default_metric(leaf: str, where: str) -> tuple[str, str | None]:
    """A subtask's metric and filter when the config names none: acc_norm for multiple choice
    where the task lists it (else acc), acc for loglikelihood, else the task's first metric and filter."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    cfg = task_manager(where).task_index[leaf].cfg
    output_type = cfg.get("output_type", "generate_until")
    listed = cfg.get("metric_list")
    names = ([m.get("metric") for m in listed if isinstance(m, dict)] if listed
             else list(DEFAULT_METRIC_REGISTRY.get(output_type, [])))
    if output_type == "multiple_choice":
        return ("acc_norm" if "acc_norm" in names else "acc"), None
    if output_type == "loglikelihood":
        return "acc", None
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)]
    return (names[0] if names else "exact_match"), (filters[0] if filters else "none")


def task_specs(key: str, tcfg: dict) -> list[tuple[str, dict]]:
    """The subtasks a config task stands for and their specs: lm-eval's name, our overrides as
    lm-eval config keys, and the metric and filter that judge an item."""
    where = f"config: tasks.{key}"
    leaves = leaf_tasks(tcfg["lm_eval"], f"{where}.lm_eval")
    chosen = tcfg.get("subtasks")
    if chosen is not None:
        unknown = [name for name in chosen if name not in leaves]
        if unknown:
            raise MergeflowError(f"{where}.subtasks: {unknown} are not subtasks of {tcfg['lm_eval']!r} ({leaves})")
        leaves = [leaf for leaf in leaves if leaf in chosen]
    manager = task_manager(where)
    specs = []
    for leaf in leaves:
        own = {k: tcfg[k] for k in (*DATASET_KEYS, "until", "max_gen_toks") if k in tcfg}
        own.update((chosen or {}).get(leaf) or {})
        metric, filter_ = _default_metric(leaf, where)
        specs.append((leaf, {"task": leaf, "overrides": _lm_eval_overrides(manager.task_index[leaf], own),
                             "metric": tcfg.get("metric", metric), "filter": tcfg.get("filter", filter_)}))
    return specs


def _local_files(data_files) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for value in data_files.values() for f in _local_files(value)]
    return [f for value in data_files or [] for f in _local_files(value)]


def resolve_tasks(config: dict) -> None:
    """The config's lm-eval tasks, checked and filled in place before any job: a group or tag
    becomes one task per subtask (named as in lm-eval; runs' ``tasks`` and ``objectives`` that
    name the group name each of them, at the group's weight), unless ``pool``; each task gets its
    ``scorer``, ``target_delimiter`` and ``resolved`` (its subtasks' specs, the local files it
    reads). A config without lm-eval tasks is left alone (and lm-eval is not imported)."""
    tasks = config["tasks"]
    if not any("lm_eval" in tcfg for tcfg in tasks.values()):
        return
    resolved: dict[str, dict] = {}
    became: dict[str, list[str]] = {}
    for key, tcfg in tasks.items():
        if "lm_eval" not in tcfg:
            resolved[key] = tcfg
            continue
        for name in ("scorer", "target_delimiter"):
            if name in tcfg and "resolved" not in tcfg:
                raise MergeflowError(f"config: tasks.{key}.{name}: comes from the lm-eval task; leave it out")
        specs = task_specs(key, tcfg)
        if tcfg.get("pool") or (len(specs) == 1 and specs[0][0] == tcfg["lm_eval"]):
            entries = {key: (tcfg, specs)}
        else:
            entries = {}
            for leaf, spec in specs:
                own = {k: v for k, v in tcfg.items() if k not in ("subtasks", "resolved", "scorer", "target_delimiter")}
                entries[leaf] = ({**own, "lm_eval": leaf, **((tcfg.get("subtasks") or {}).get(leaf) or {})},
                                 [(leaf, spec)])
        became[key] = list(entries)
        for name, (entry, leaf_specs) in entries.items():
            if name in resolved or (name != key and name in tasks):
                raise MergeflowError(f"config: tasks.{key}: its subtask {name!r} is also a task of its own")
            resolved[name] = fill_task(name, entry, leaf_specs)
    config["tasks"] = resolved
    for rcfg in config["runs"].values():
        if rcfg.get("tasks"):
            rcfg["tasks"] = [t for name in rcfg["tasks"] for t in became.get(name, [name])]
        if "evolve" in rcfg:
            objectives = rcfg["evolve"]["objectives"]
            rcfg["evolve"]["objectives"] = {t: w for name, w in objectives.items() for t in became.get(name, [name])}


def fill_task(key: str, tcfg: dict, specs: list[tuple[str, dict]]) -> dict:
    """One config task over its subtasks (one, or a pool), checked, with its scorer, target
    delimiter and ``resolved`` filled in."""
    where = f"config: tasks.{key}"
    checked = {leaf: check_task(key, tcfg, leaf, spec) for leaf, spec in specs}
    ways = {(c["scorer"], c["target_delimiter"]) for c in checked.values()}
    if len(ways) > 1:
        raise MergeflowError(f"{where}: the pooled subtasks are scored differently ("
                             + "; ".join(f"{leaf}: {c['scorer']}, delimiter {c['target_delimiter']!r}"
                                         for leaf, c in checked.items()) + "); pool subtasks scored alike")
    scorer, delimiter = ways.pop()
    documents = sum(c["documents"] for c in checked.values())
    need = tcfg["splits"]["search"] + tcfg["splits"]["test"]
    if documents < need:
        raise MergeflowError(f"{where}.splits: the evaluation split has {documents} documents but the splits need "
                             f"{need} (search {tcfg['splits']['search']} + test {tcfg['splits']['test']})")
    files = [f for _, spec in specs for f in _local_files(spec["overrides"].get("dataset_kwargs", {}).get("data_files"))]
    import lm_eval

    # the version renders the items: a data job reruns when it changes (its parameters are the task's config)
    return {**tcfg, "scorer": scorer, "target_delimiter": delimiter,
            "resolved": {"specs": [spec for _, spec in specs], "files": sorted(set(files)), "documents": documents,
                         "lm_eval_version": lm_eval.__version__}}


# ---------------------------------------------------------------------------------------------
# The data stage


def lm_eval_items(task: str, tcfg: dict) -> pd.DataFrame:
    """Every document of the task's evaluation split (of each subtask, pooled) as an item, in
    the split's order; ``tcfg`` is the resolved task config."""
    frames = [_render(task, tcfg, spec) for spec in tcfg["resolved"]["specs"]]
    items = pd.concat(frames, ignore_index=True)
    if tcfg.get("pool"):
        items["subscenario"] = items["lm_eval_task"]
    return items


class _Recorded:
    """What lm-eval's few-shot sampler draws while in use: per call, the drawn documents' indices
    in its pool (the sampler's own ``sample`` is back in place after the ``with``)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.at = {id(doc): i for i, doc in enumerate(sampler.fewshot_docs())}
        self.drawn: list[list[int]] = []

    def __enter__(self) -> "_Recorded":
        draw = self.sampler.sample

        def sample(*args, **kwargs):
            docs = draw(*args, **kwargs)
            self.drawn.append([self.at[id(doc)] for doc in docs])
            return docs

        self.sampler.sample = sample
        return self

    def __exit__(self, *exc) -> None:
        del self.sampler.sample  # the instance attribute: the class's method again


def _chat_recorder(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """lm-eval's chat template callable, recording the turns instead of rendering them: the
    model's tokenizer renders them in the evaluator (``mergeflow.evaluate.item_prompts``)."""
    return json.dumps({"messages": messages, "add_generation_prompt": add_generation_prompt})


def _render(task: str, tcfg: dict, spec: dict) -> pd.DataFrame:
    """One subtask's items, rendered by lm-eval's own functions."""
    from lm_eval.api.utils import ends_with_whitespace

    where = f"task {task!r} (lm-eval {spec['task']!r})"
    lm_task = build_task(spec, where)  # fresh: its sampler is seeded and drawn from here
    shots = num_fewshot(tcfg, lm_task)
    docs = list(lm_task.eval_docs)
    system = tcfg.get("system_instruction")
    chat = bool(tcfg.get("apply_chat_template"))

    def contexts(apply_chat: bool) -> tuple[list[str], list[list[int]]]:
        lm_task.set_fewshot_seed(seed=tcfg["fewshot_seed"])  # as lm-eval seeds it before building requests
        if not shots:
            return [render(doc, apply_chat) for doc in docs], [[] for _ in docs]
        with _Recorded(lm_task.sampler) as recorded:
            return [render(doc, apply_chat) for doc in docs], recorded.drawn

    def render(doc, apply_chat: bool) -> str:
        return lm_task.fewshot_context(doc, shots, system_instruction=system, apply_chat_template=apply_chat,
                                       fewshot_as_multiturn=tcfg["fewshot_as_multiturn"],
                                       chat_template=_chat_recorder if apply_chat else None,
                                       gen_prefix=lm_task.doc_to_prefix(doc))

    prompts, fewshot = contexts(False)
    output_type = lm_task.OUTPUT_TYPE
    rows = []
    for doc_id, (doc, prompt) in enumerate(zip(docs, prompts)):
        item_id = f"{spec['task']}-{doc_id:06d}"
        if not isinstance(prompt, str):
            raise DataError(f"{where}, item {item_id!r}: the rendered context is {type(prompt).__name__}, not text")
        target = lm_task.doc_to_target(doc)
        choices: list[str] = []
        answer = -1
        if output_type == "multiple_choice":
            choices = list(lm_task.doc_to_choice(doc))
            if isinstance(target, str):
                if target not in choices:
                    raise DataError(f"{where}, item {item_id!r}: gold answer {target!r} is not one of its choices {choices}")
                target = choices.index(target)
            if not isinstance(target, (int, np.integer)) or not 0 <= int(target) < len(choices):
                raise DataError(f"{where}, item {item_id!r}: gold answer {target!r} is not one choice of {choices} "
                                "(mergeflow scores one gold choice an item)")
            answer, target = int(target), choices[int(target)]
        elif output_type == "generate_until" and lm_task.config.doc_to_choice is not None:
            target = lm_task.doc_to_choice(doc)[target]
        if isinstance(target, list):  # several gold answers: the first is scored as the gold continuation
            target = target[0]
        rows.append({"item_id": item_id, "prompt": prompt, "choices": [str(c) for c in choices], "answer": answer,
                     "target": str(target), "doc_id": doc_id, "fewshot": fewshot[doc_id],
                     "lm_eval_task": spec["task"], "lm_eval": json.dumps(spec, sort_keys=True)})
    items = pd.DataFrame(rows)
    if output_type == "generate_until":
        until, max_gen_toks, _ = generation_arguments(lm_task)
        items["until"] = [until] * len(items)
        items["max_gen_toks"] = max_gen_toks
    if chat:
        turns, again = contexts(True)
        if again != fewshot:
            raise MergeflowError(f"{where}: lm-eval drew other few-shot examples for the chat turns than for the text")
        gen_prefix = lm_task.config.gen_prefix
        delimiter = lm_task.config.target_delimiter if gen_prefix and not ends_with_whitespace(gen_prefix) else ""
        if output_type == "loglikelihood":
            delimiter = ""
        items["chat"] = [json.dumps({**json.loads(t), "delimiter": delimiter}) for t in turns]
    return items


# ---------------------------------------------------------------------------------------------
# Judging generations


def judge_generations(items: pd.DataFrame, generations: list[str]) -> tuple[np.ndarray, dict]:
    """Generations judged as lm-eval judges its own: each subtask's filter pipelines (regex,
    take_first, ...) applied to them, then its ``process_results`` (the metric) on each filter's
    answer. Returns each item's correctness (the spec's metric under its filter, 0 or 1) and the
    columns ``filtered`` (that filter's answer) and ``metrics`` (JSON: every metric under every
    filter, named as lm-eval reports them, ``metric,filter``)."""
    require_lm_eval("judging lm-eval generations")
    from lm_eval.api.instance import Instance

    correct = np.zeros(len(items), dtype=np.int8)
    filtered = [""] * len(items)
    scores = [""] * len(items)
    for spec_json, positions in items.groupby("lm_eval", sort=False).indices.items():
        spec = json.loads(spec_json)
        lm_task = _built(spec_json)
        docs = lm_task.eval_docs
        instances = []
        for i in positions:
            instance = Instance(request_type="generate_until", doc=docs[int(items["doc_id"].iloc[i])],
                                arguments=("", {}), idx=0, metadata=(spec["task"], int(items["doc_id"].iloc[i]), 1))
            instance.resps = [generations[i]]
            instances.append(instance)
        for ensemble in lm_task._filters:  # the task's filter pipelines, as its apply_filters runs them
            ensemble.apply(instances)
        for i, instance in zip(positions, instances):
            results = {name: lm_task.process_results(instance.doc, [answer])
                       for name, answer in instance.filtered_resps.items()}
            value = results[spec["filter"]][spec["metric"]]
            if value not in (0, 1):
                raise MergeflowError(f"lm-eval task {spec['task']!r}, item {items['item_id'].iloc[i]!r}: metric "
                                     f"{spec['metric']!r} gave {value!r}; an item's correctness must be 0 or 1")
            correct[i] = int(value)
            filtered[i] = str(instance.filtered_resps[spec["filter"]])
            scores[i] = json.dumps({f"{metric},{name}": float(v) for name, result in results.items()
                                    for metric, v in result.items() if isinstance(v, (int, float))}, sort_keys=True)
    return correct, {"filtered": filtered, "metrics": scores}
