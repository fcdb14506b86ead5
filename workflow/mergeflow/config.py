"""The whole config: validated against the schema, upgraded from older spellings, and
cross-checked before any job runs.

The schema (``workflow/schemas/config.schema.yaml``, read by :mod:`mergeflow.schema`) checks
keys and types; this module checks what it cannot express: names point at things that exist
(the base model and endpoints are models, runs name known tasks, local model directories and
task sources exist or are built by the zoo, hub models are fetched by a job), and each run's
search space, fitness kind and optimizer accept the rest of the config. The checks that belong
to one kind of space or fitness live in that kind (its ``check``); this module only calls them.

It sits on top of the library: the workflow, the CLI, benches and tests import it, no library
module does.
"""

from __future__ import annotations

import json
from pathlib import Path


from mergeflow.data import template_fields
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import chat_keys
from mergeflow.evolve.search import check_optimizer
from mergeflow.fitness import FITNESS
from mergeflow.gguf import gguf_architecture, gguf_file
from mergeflow.lm_eval_tasks import resolve_tasks
from mergeflow.locations import local_model_dir, zoo_model_dirs, zoo_task_files
from mergeflow.schema import check_instance, fill_defaults, load_schema
from mergeflow.scorers import get_scorer
from mergeflow.spaces import SPACES, ModelConfigs, check_space, space_models
from mergeflow.yamlio import load_yaml


def run_tasks(config: dict, run: str) -> list[str]:
    return list(config["runs"][run].get("tasks") or config["tasks"])


def task_evaluation(config: dict, task: str) -> dict:
    """The ``evaluation`` settings a task's items are scored with: the config's, with the task's
    own chat keys where it has them (unchanged, and so the same job parameters, where it has none)."""
    return {**config["evaluation"], **chat_keys(config["tasks"][task])}


def search_model_names(config: dict, run: str) -> list[str]:
    """The models a run's search reads, by name: its space's base and sources (the config's
    base_model and endpoints where the space names none)."""
    base, names = space_models(config["runs"][run]["evolve"]["search_space"])
    return list(dict.fromkeys([base or config["base_model"], *(names or config["endpoints"])]))


def check_run_sources(config: dict) -> None:
    """Models that are another run's final merge (``{run: NAME}``): the run exists and searches,
    only search spaces read them (every run's table reads the base and the endpoints, so one
    there would make each run wait for itself), and no run reads its own merge, even through
    other runs."""
    models, runs = config["models"], config["runs"]
    for name, spec in models.items():
        if "run" not in spec:
            continue
        if spec["run"] not in runs or "evolve" not in runs[spec["run"]]:
            raise MergeflowError(f"config: model {name!r} is the final merge of run {spec['run']!r}, which is not a "
                                 f"searching run of runs {sorted(runs)}")
        if name == config["base_model"] or name in config["endpoints"]:
            raise MergeflowError(f"config: model {name!r} is a run's final merge and cannot be the base_model or an "
                                 "endpoint; name it in a run's search_space (dfs: a / b, dis: models)")
    searching = [r for r in runs if "evolve" in runs[r]]
    needs = {r: {models[m]["run"] for m in search_model_names(config, r) if m in models and "run" in models[m]}
             for r in searching}

    def visit(run: str, trail: list[str]) -> None:
        if run in trail:
            raise MergeflowError(f"config: runs {' -> '.join(trail[trail.index(run):] + [run])} read each other's "
                                 "final merge in a circle")
        for other in sorted(needs.get(run, ())):
            visit(other, trail + [run])

    for run in searching:
        visit(run, [])


def model_config_json(config: dict, name: str) -> dict | None:
    """Model ``name``'s ``config.json`` where it is already on disk; for another run's merge,
    its search's base model's (a parameter merge keeps the base's shapes)."""
    spec = config["models"][name]
    if "run" in spec:
        return model_config_json(config, search_model_names(config, spec["run"])[0])
    if "finetune" in spec:  # a fine-tune keeps its model's shapes
        return model_config_json(config, spec["finetune"]["from"])
    config_file = local_model_dir(spec) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def model_configs(config: dict, names: list[str]) -> ModelConfigs:
    """What a search space may check its models by before any job: the ``config.json`` of each
    of ``names`` (the first is the space's base) already on disk."""
    on_disk = {name: model_config_json(config, name) for name in names if name in config["models"]}
    return ModelConfigs(names[0], {name: c for name, c in on_disk.items() if c is not None})


def check_gguf_models(config: dict) -> None:
    """Each GGUF model's file exists (or its package is installed), is a whole GGUF file, and holds
    the base's architecture: read from the files' headers, before the conversion's heavy work."""
    found = {}
    try:
        for name, spec in config["models"].items():
            if "gguf" in spec:
                path = gguf_file(name, spec)
                found[name] = (path, gguf_architecture(name, path))
    except MergeflowError as err:
        raise MergeflowError(f"config: {err}") from None
    base = config["base_model"]
    if base in found:
        architecture = found[base][1]
    else:
        base_config = model_config_json(config, base)
        architecture = base_config.get("model_type") if base_config else None
    for name, (path, declared) in found.items():
        if architecture is not None and declared != architecture:
            raise MergeflowError(f"config: model {name!r}: GGUF file {str(path)!r} holds a {declared!r} model, but the "
                                 f"base {base!r} is a {architecture!r} model")


def check_finetuned_models(config: dict) -> None:
    """Each fine-tune starts from another configured model (not, through others, from itself), and
    its local data file exists: before any model is loaded."""
    models = config["models"]
    for name, spec in models.items():
        if "finetune" not in spec:
            continue
        where = f"config: model {name!r}: finetune"
        trail = [name]
        while "finetune" in models[trail[-1]]:
            start = models[trail[-1]]["finetune"]["from"]
            if start not in models:
                raise MergeflowError(f"{where}.from {start!r} is not one of models {sorted(models)}")
            if start in trail:
                raise MergeflowError(f"{where}: models {' -> '.join(trail + [start])} are fine-tuned from each "
                                     "other in a circle")
            trail.append(start)
        if "run" in models[trail[-1]]:
            raise MergeflowError(f"{where} starts from a run's final merge ({trail[-1]!r}), which is built after "
                                 "the models are checked; fine-tune a base, hub, GGUF or local model")
        template_fields(spec["finetune"]["template"], f"models.{name}.finetune.template")
        source = spec["finetune"]["source"]
        if "path" in source and not Path(source["path"]).is_file():
            raise MergeflowError(f"{where}.source: file {source['path']!r} does not exist")


def check_tokenizer_source(config: dict) -> None:
    """``tokenizer_source`` is base, union or a model; every search space's candidates are recipes
    (layer paths take their embeddings from one model: no vocabulary to reconcile)."""
    source = config.get("tokenizer_source")
    if source is None:
        return
    if source not in ("base", "union") and source not in config["models"]:
        raise MergeflowError(f"config: tokenizer_source {source!r} is neither base, union nor one of models "
                             f"{sorted(config['models'])}")
    spaces = {"irt.calibration.search_space": config["irt"]["calibration"]["search_space"]}
    spaces.update({f"runs.{run}.evolve.search_space": rcfg["evolve"]["search_space"]
                   for run, rcfg in config["runs"].items() if "evolve" in rcfg})
    for where, space in spaces.items():
        if SPACES[space["kind"]].candidates != "recipe":
            raise MergeflowError(f"config: {where}.kind is {space['kind']!r}: tokenizer_source reconciles the "
                                 "vocabularies of parameter merges only (a layer path's embeddings are one model's)")


def check_config(config: dict) -> None:
    """Raise ``MergeflowError`` naming the first key whose reference cannot be resolved."""
    models = config["models"]
    if config["base_model"] not in models:
        raise MergeflowError(f"config: base_model {config['base_model']!r} is not one of models {sorted(models)}")
    for name in config["endpoints"]:
        if name not in models:
            raise MergeflowError(f"config: endpoint {name!r} is not one of models {sorted(models)}")
        if name == config["base_model"]:
            raise MergeflowError(f"config: endpoint {name!r} is also the base_model")
    built = {str(p) for p in zoo_model_dirs(config).values()}
    for name, spec in models.items():
        path = local_model_dir(spec)
        if "path" in spec and str(path) not in built and not path.is_dir():
            raise MergeflowError(f"config: model {name!r}: directory {str(path)!r} does not exist")
    check_gguf_models(config)
    check_finetuned_models(config)
    check_tokenizer_source(config)
    written = {str(p) for p in zoo_task_files(config).values()}
    for task, tcfg in config["tasks"].items():
        if "lm_eval" in tcfg:  # checked when resolved (resolve_lm_eval_tasks)
            continue
        if get_scorer(tcfg["scorer"]).choices and "choices" not in tcfg:
            raise MergeflowError(f"config: task {task!r} uses scorer {tcfg['scorer']} but names no 'choices' column")
        for key in ("source", "search_source"):
            src = tcfg.get(key, {})
            if "path" in src and src["path"] not in written and not Path(src["path"]).exists():
                raise MergeflowError(f"config: task {task!r}: {key} file {src['path']!r} does not exist")
    for run, rcfg in config["runs"].items():
        for task in rcfg.get("tasks") or []:
            if task not in config["tasks"]:
                raise MergeflowError(f"config: run {run!r} names task {task!r}, which is not one of tasks {sorted(config['tasks'])}")
        if "evolve" in rcfg:
            for task in rcfg["evolve"]["objectives"]:
                if task not in config["tasks"]:
                    raise MergeflowError(f"config: runs.{run}.evolve.objectives names task {task!r}, which is not one of "
                                         f"tasks {sorted(config['tasks'])}")
                fitness = rcfg["evolve"]["fitness"]
                if "search_source" in config["tasks"][task] and FITNESS[fitness["kind"]].reads_answers(fitness):
                    raise MergeflowError(f"config: runs.{run}.evolve.fitness: task {task!r}'s search prompts have no "
                                         f"answers (tasks.{task}.search_source), and fitness kind {fitness['kind']!r} "
                                         "as configured reads them; search it with a label-free fitness "
                                         "(config/README.md: gradient's loss: entropy)")
            FITNESS[rcfg["evolve"]["fitness"]["kind"]].check(config, run)
    check_run_sources(config)
    check_before_jobs(config)


def check_before_jobs(config: dict) -> None:
    """What jobs would otherwise find out late, checked at parse time and named by key: task
    templates, each run's optimizer and search space (its kind's own checks, given the models'
    ``config.json`` where they are on disk), and the IRT calibration's search space."""
    try:
        for task, tcfg in config["tasks"].items():
            if "template" in tcfg:
                template_fields(tcfg["template"], f"tasks.{task}.template")
        base = config["base_model"]
        spaces = {"irt.calibration.search_space": (config["irt"]["calibration"]["search_space"],
                                                   [base, *config["endpoints"]])}
        for run, rcfg in config["runs"].items():
            if "evolve" in rcfg:
                where = f"runs.{run}.evolve"
                check_optimizer(rcfg["evolve"]["optimizer"], f"{where}.optimizer")
                spaces[f"{where}.search_space"] = (rcfg["evolve"]["search_space"], search_model_names(config, run))
        for where, (space, names) in spaces.items():
            check_space(space, where, model_configs(config, names))
    except MergeflowError as err:
        message = str(err)
        raise type(err)(message if message.startswith("config:") else f"config: {message}") from None


def upgrade_config(config: dict) -> dict:
    """Read older spellings as today's: the flat ``fitness: KIND`` (with the kind's keys beside it,
    e.g. ``estimator`` and ``anchors``) as the mapping ``fitness: {kind: KIND, ...}`` (each kind
    names the keys it took that way, its ``flat_keys``),
    and ``fitness.learning_rate`` (read by the optimizer, not the fitness) as the run's
    ``learning_rate`` beside ``optimizer`` and ``sigma``."""
    for run, rcfg in (config.get("runs") or {}).items():
        ecfg = rcfg.get("evolve") if isinstance(rcfg, dict) else None
        if not isinstance(ecfg, dict):
            continue
        if isinstance(ecfg.get("fitness"), str):
            fitness = {"kind": ecfg["fitness"]}
            kind = FITNESS.get(fitness["kind"])
            for key in sorted({key for other in FITNESS.values() for key in other.flat_keys}):
                if key in ecfg:
                    value = ecfg.pop(key)
                    if kind is not None and key in kind.flat_keys:
                        fitness[key] = value
            ecfg["fitness"] = fitness
        fitness = ecfg.get("fitness")
        if isinstance(fitness, dict) and "learning_rate" in fitness:
            if "learning_rate" in ecfg:
                raise MergeflowError(f"config: runs.{run}.evolve: learning_rate is given twice, under fitness (its "
                                     "older place) and beside optimizer; keep the one beside optimizer")
            ecfg["learning_rate"] = fitness.pop("learning_rate")
    return config


def validate_config(config: dict) -> dict:
    """Validate against the JSON schema, fill defaults, cross-check; errors name the key at fault."""
    schema = load_schema()
    upgrade_config(config)
    check_instance(config, schema, schema, "")
    fill_defaults(config, schema, schema)
    resolve_lm_eval_tasks(config)
    check_config(config)
    return config


def resolve_lm_eval_tasks(config: dict) -> None:
    """The config's lm-evaluation-harness tasks checked and filled in (``lm_eval_tasks.resolve_tasks``),
    each with the evaluation's chat keys it does not set itself: its items are rendered with them
    (the data stage builds lm-eval's chat turns and system instruction)."""
    for tcfg in config["tasks"].values():
        if "lm_eval" in tcfg:
            for key, value in chat_keys(config["evaluation"]).items():
                tcfg.setdefault(key, value)
    resolve_tasks(config)


def load_config(path: str | Path) -> dict:
    """Read and validate a config file."""
    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"config file {str(path)!r} does not exist")
    return validate_config(load_yaml(path.read_text(), f"config file {str(path)!r}"))
