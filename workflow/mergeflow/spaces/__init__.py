"""Search spaces: what a genome in [0, 1]^d (what Nevergrad proposes) stands for.

A space kind is one module here plus one entry in :data:`SPACES`, and its keys are one
definition in the config schema (``space_<kind>``; the schema's ``search_space.kind`` enum is
this registry's keys, which a test checks). Every kind is a class that subclasses
:class:`~mergeflow.spaces.base.Space` (which lists what a kind provides and its defaults) and
maps a genome to a candidate and back: a merge recipe, or for the data-flow kinds (``dfs``,
``dis``) a layer path (their ``candidates`` is ``path``: see
:data:`mergeflow.merge.candidates.CANDIDATE_TYPES`).

Kinds are built from the ``search_space`` mapping with the run's ``base_model`` and ``models``
(paths) filled in, through :func:`build_space`, which validates the mapping against the schema
and fills its defaults first.
"""

from __future__ import annotations

from mergeflow.schema import validate_section
from mergeflow.spaces.base import ModelConfigs, Space
from mergeflow.spaces.dfs import DfsSpace
from mergeflow.spaces.dis import DisSpace
from mergeflow.spaces.parameter import ParameterSpace

# kind -> its class
SPACES: dict[str, type[Space]] = {
    "parameter": ParameterSpace,
    "dfs": DfsSpace,
    "dis": DisSpace,
}


def build_space(cfg: dict, where: str = "search_space") -> Space:
    """The space a ``search_space`` mapping describes; bad keys are named with ``where``."""
    cfg = validate_section(cfg, "search_space", where)
    return SPACES[cfg["kind"]].build(cfg, where)


def space_models(cfg: dict) -> tuple[str | None, list[str] | None]:
    """The model names a ``search_space`` mapping reads: (base, sources); None where the config's
    ``base_model`` / ``endpoints`` apply."""
    return SPACES[cfg.get("kind", "parameter")].model_names(cfg)


def check_space(cfg: dict, where: str, models: ModelConfigs) -> None:
    """Check a ``search_space`` mapping before any job, given its models' configs where they are
    on disk; errors name the key."""
    cfg = validate_section(cfg, "search_space", where)
    SPACES[cfg["kind"]].check(cfg, where, models)


__all__ = ["SPACES", "DfsSpace", "DisSpace", "ModelConfigs", "ParameterSpace", "Space", "build_space",
           "check_space", "space_models"]
