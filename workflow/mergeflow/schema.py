"""The config schema's mechanics: load it, check a section against it, fill its defaults.

The schema (``workflow/schemas/config.schema.yaml``) holds every config key, type, enum (the
registries' names, which a test checks) and default. This module reads it and nothing else of
mergeflow, so every layer can check the section it takes (a ``search_space``, a task, the
``evaluation`` settings) with the workflow's messages and defaults.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

from mergeflow.errors import MergeflowError

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


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


def check_instance(instance, schema: dict, root: dict, where: str) -> None:
    """Raise ``MergeflowError`` naming the key of the most relevant schema violation."""
    errors = list(jsonschema.Draft202012Validator({**schema, "definitions": root["definitions"]}).iter_errors(instance))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        path = ".".join([where, *(str(p) for p in err.absolute_path)] if where else [str(p) for p in err.absolute_path])
        message = err.message
        if "propertyNames" in err.schema_path:  # a name that becomes a path component of results
            message = (f"the name {err.instance!r} is not allowed: a name is part of result paths, so it holds "
                       "letters, digits, '_', '.' and '-' only, and starts with a letter, digit or '_'")
        raise MergeflowError(f"config: at {path or 'top level'}: {message}")


def validate_section(instance: dict, definition: str, where: str) -> dict:
    """A copy of one config section (e.g. a ``search_space``) checked against the schema's
    ``definitions.<definition>``, with its defaults filled: how the library takes a section
    outside the workflow, with the same messages and defaults."""
    root = load_schema()
    schema = {"$ref": f"#/definitions/{definition}"}
    instance = copy.deepcopy(instance)
    check_instance(instance, schema, root, where)
    fill_defaults(instance, schema, root)
    return instance


def section_defaults(section: str) -> dict:
    """The schema's defaults of a top-level section (e.g. ``irt``), for the CLI's options."""
    root = load_schema()
    instance: dict = {}
    fill_defaults(instance, root["properties"][section], root)
    return instance
