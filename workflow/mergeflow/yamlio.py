"""Reading the YAML a user writes (recipes, configs): numbers as YAML 1.2 reads them, and errors
that name the file and line.

PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: ``1.0e+30`` is a number
but ``1e30`` and ``1.0e30`` are strings, so ``weight: 1.0e30`` would be refused as "not a number".
Every YAML 1.2 reader (and mergekit's users' intuition) takes them as numbers; so do we.
"""

from __future__ import annotations

import re

import yaml

from mergeflow.errors import MergeflowError


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (``1e30``, ``1.0e30``, ``.5E-3``)."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X)
Loader.yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp) for tag, regexp in Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"] + [("tag:yaml.org,2002:float", _FLOAT)]


def load_yaml(text: str, where: str):
    """Parse YAML text; ``where`` (``"recipe 'r.yaml'"``) names it in the error, with the line."""
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MergeflowError(f"{where} is not valid YAML{at}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise MergeflowError(f"{where} is not valid YAML: {err}") from None
