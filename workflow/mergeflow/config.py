"""Cross-references in a config that a JSON schema cannot express, checked before any job runs.

The schema (``workflow/schemas/config.schema.yaml``) checks keys and types; this module checks
that names point at things that exist: the base model and endpoints are models, runs name known
tasks, local model directories exist (or are built by the zoo; hub models are fetched by a
job), task sources exist (or are written by the zoo).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.scorers import get_scorer

RESULTS = Path("results")
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def zoo_model_dirs(config: dict) -> dict[str, Path]:
    """Model directories that the zoo stage builds, by zoo name."""
    zoo = config.get("zoo")
    if not zoo:
        return {}
    names = ["base"] + sorted(zoo["experts"])
    return {name: RESULTS / "zoo" / name for name in names}


def zoo_task_files(config: dict) -> dict[str, Path]:
    zoo = config.get("zoo")
    if not zoo:
        return {}
    return {name: RESULTS / "zoo" / "tasks" / f"{name}.parquet" for name in zoo.get("tasks", [])}


def hub_model_dir(spec: dict) -> Path:
    """Where the fetch stage puts a hub model: ``results/hub/ORG--NAME[@REVISION]``."""
    revision = spec.get("revision")
    return RESULTS / "hub" / (spec["hub"].replace("/", "--") + (f"@{revision}" if revision else ""))


def run_merge_dir(run: str) -> Path:
    """Where a run's final merge is written (``final_merge``): what ``{run: NAME}`` models read."""
    return RESULTS / "runs" / run / "final" / "merge"


def local_model_dir(spec: dict) -> Path:
    """A model's local directory: its ``path``, another run's final merge, or the directory its
    hub id is fetched to."""
    if "path" in spec:
        return Path(spec["path"])
    if "run" in spec:
        return run_merge_dir(spec["run"])
    return hub_model_dir(spec)


def model_location(spec: dict) -> str:
    """What the merger and ``from_pretrained`` are given: always a local directory."""
    return str(local_model_dir(spec))


def run_tasks(config: dict, run: str) -> list[str]:
    return list(config["runs"][run].get("tasks") or config["tasks"])


def search_model_names(config: dict, run: str) -> list[str]:
    """The models a run's search reads, by name: its space's base and sources (the config's
    base_model and endpoints where the space names none)."""
    from mergeflow.spaces import space_models

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
    import json

    spec = config["models"][name]
    if "run" in spec:
        return model_config_json(config, search_model_names(config, spec["run"])[0])
    config_file = local_model_dir(spec) / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def check_path_sources(config: dict, run: str) -> None:
    """A data-flow run's models chain their layers: each needs the hidden size of the path's
    base (checked where the configs are on disk)."""
    from mergeflow.spaces import candidates_of

    if candidates_of(config["runs"][run]["evolve"]["search_space"]) != "path":
        return
    from mergeflow.merge.path import chain_mismatch

    names = search_model_names(config, run)
    configs = {name: model_config_json(config, name) for name in names if name in config["models"]}
    known = {name: c for name, c in configs.items() if c is not None}
    base = names[0]
    for name, model_config in known.items():
        why = base in known and chain_mismatch(name, model_config, base, known[base])
        if why:
            raise MergeflowError(f"config: runs.{run}.evolve.search_space: {why}; a layer path chains their layers, "
                                 "so they must agree")


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
    written = {str(p) for p in zoo_task_files(config).values()}
    for task, tcfg in config["tasks"].items():
        if get_scorer(tcfg["scorer"]).choices and "choices" not in tcfg:
            raise MergeflowError(f"config: task {task!r} uses scorer {tcfg['scorer']} but names no 'choices' column")
        src = tcfg["source"]
        if "path" in src and src["path"] not in written and not Path(src["path"]).exists():
            raise MergeflowError(f"config: task {task!r}: source file {src['path']!r} does not exist")
    from mergeflow.fitness import FITNESS

    for run, rcfg in config["runs"].items():
        for task in rcfg.get("tasks") or []:
            if task not in config["tasks"]:
                raise MergeflowError(f"config: run {run!r} names task {task!r}, which is not one of tasks {sorted(config['tasks'])}")
        if "evolve" in rcfg:
            for task in rcfg["evolve"]["objectives"]:
                if task not in config["tasks"]:
                    raise MergeflowError(f"config: runs.{run}.evolve.objectives names task {task!r}, which is not one of "
                                         f"tasks {sorted(config['tasks'])}")
            FITNESS[rcfg["evolve"]["fitness"]["kind"]].check(config, run)
    check_run_sources(config)
    check_before_jobs(config)


def base_layers(config: dict, name: str) -> int | None:
    """The layer count of model ``name`` from its ``config.json`` where that is already on disk
    (a zoo or hub model before its job has run: None)."""
    import json

    config_file = local_model_dir(config["models"][name]) / "config.json"
    if not config_file.is_file():
        return None
    layers = json.loads(config_file.read_text()).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


def check_before_jobs(config: dict) -> None:
    """What jobs would otherwise find out late, checked at parse time and named by key: task
    templates, each run's optimizer, search space (methods, parameters, ranges, layer groups
    against the base's layers when its config is on disk) and anchor set against the search
    splits, and the IRT calibration's search space."""
    from mergeflow.data import template_fields
    from mergeflow.evolve.search import check_optimizer
    from mergeflow.fitness import FITNESS
    from mergeflow.spaces import check_space

    try:
        for task, tcfg in config["tasks"].items():
            template_fields(tcfg["template"], f"tasks.{task}.template")
        spaces = {"irt.calibration.search_space": (config["irt"]["calibration"]["search_space"], config["base_model"])}
        for run, rcfg in config["runs"].items():
            if "evolve" not in rcfg:
                continue
            ecfg, where = rcfg["evolve"], f"runs.{run}.evolve"
            check_optimizer(ecfg["optimizer"], f"{where}.optimizer")
            space = ecfg["search_space"]
            spaces[f"{where}.search_space"] = (space, search_model_names(config, run)[0])
            kind = FITNESS[ecfg["fitness"]["kind"]]
            anchors = kind.anchor_set(ecfg["fitness"]) if kind.anchor_set else None
            for task in ecfg["objectives"] if anchors else []:
                size = config["tasks"][task]["splits"]["search"]
                if anchors["n"] > size:
                    key = "rungs[0]" if ecfg["fitness"]["kind"] == "multi_fidelity" else "anchors.n"
                    raise MergeflowError(f"{where}.fitness.{key}: {anchors['n']} anchor items, more than the search "
                                         f"split of task {task!r} ({size}, tasks.{task}.splits.search)")
        for where, (space, base) in spaces.items():
            check_space(space, where, base_layers(config, base) if base in config["models"] else None)
        for run, rcfg in config["runs"].items():
            if "evolve" in rcfg:
                check_path_sources(config, run)
    except MergeflowError as err:
        message = str(err)
        raise type(err)(message if message.startswith("config:") else f"config: {message}") from None


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The config schema: keys, types, enums (the registries' names) and every default. Shared:
    never modify it."""
    return yaml.safe_load(SCHEMA.read_text())


def _resolve(schema: dict, root: dict) -> dict:
    """Follow ``$ref``; keys beside the reference (such as ``default``) take precedence."""
    while "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def fill_defaults(instance, schema: dict, root: dict) -> None:
    """Insert the schema's ``default`` values for absent keys, recursively (objects only); an
    ``allOf`` of ``if``/``then`` (a dispatch on ``kind``) or a ``oneOf`` fills from the branch that applies."""
    import jsonschema

    schema = _resolve(schema, root)
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        sub = _resolve(sub, root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            fill_defaults(instance[key], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in set(instance) - set(schema.get("properties", {})):
            fill_defaults(instance[key], extra, root)
    def applies(sub: dict) -> bool:
        return jsonschema.Draft202012Validator({**sub, "definitions": root["definitions"]}).is_valid(instance)

    for branch in schema.get("allOf", []):
        if "if" not in branch:
            fill_defaults(instance, branch, root)
        elif applies(branch["if"]):
            fill_defaults(instance, branch["then"], root)
    for branch in schema.get("oneOf", []):
        if applies(branch):
            fill_defaults(instance, branch, root)
            break


def _check(instance, schema: dict, root: dict, where: str) -> None:
    """Raise ``MergeflowError`` naming the key of the most relevant schema violation."""
    import jsonschema

    errors = list(jsonschema.Draft202012Validator({**schema, "definitions": root["definitions"]}).iter_errors(instance))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        path = ".".join([where, *(str(p) for p in err.absolute_path)] if where else [str(p) for p in err.absolute_path])
        raise MergeflowError(f"config: at {path or 'top level'}: {err.message}")


def validate_section(instance: dict, definition: str, where: str) -> dict:
    """A copy of one config section (e.g. a ``search_space``) checked against the schema's
    ``definitions.<definition>``, with its defaults filled: how the library takes a section
    outside the workflow, with the same messages and defaults."""
    root = load_schema()
    schema = {"$ref": f"#/definitions/{definition}"}
    instance = copy.deepcopy(instance)
    _check(instance, schema, root, where)
    fill_defaults(instance, schema, root)
    return instance


def section_defaults(section: str) -> dict:
    """The schema's defaults of a top-level section (e.g. ``irt``), for the CLI's options."""
    root = load_schema()
    instance: dict = {}
    fill_defaults(instance, root["properties"][section], root)
    return instance


def upgrade_config(config: dict) -> dict:
    """Accept the older flat ``fitness: anchors`` (with ``estimator`` and ``anchors`` beside it)
    as the mapping ``fitness: {kind: anchors, estimator: ..., anchors: ...}``."""
    for rcfg in (config.get("runs") or {}).values():
        ecfg = rcfg.get("evolve") if isinstance(rcfg, dict) else None
        if isinstance(ecfg, dict) and isinstance(ecfg.get("fitness"), str):
            fitness = {"kind": ecfg["fitness"]}
            for key in ("estimator", "anchors"):
                if key in ecfg:
                    value = ecfg.pop(key)
                    if fitness["kind"] == "anchors":
                        fitness[key] = value
            ecfg["fitness"] = fitness
    return config


def validate_config(config: dict) -> dict:
    """Validate against the JSON schema, fill defaults, cross-check; errors name the key at fault."""
    schema = load_schema()
    upgrade_config(config)
    _check(config, schema, schema, "")
    fill_defaults(config, schema, schema)
    check_config(config)
    return config


def load_config(path: str | Path) -> dict:
    """Read and validate a config file."""
    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"config file {str(path)!r} does not exist")
    return validate_config(yaml.safe_load(path.read_text()))
