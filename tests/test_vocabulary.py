"""Every name the config schema accepts is a name the library registers, and the reverse: the
registries and constants are the vocabulary, the schema's enums mirror them."""

import pytest

from mergeflow import irt
from mergeflow.schema import load_schema
from mergeflow.dtypes import DTYPES
from mergeflow.evaluate import SCORERS
from mergeflow.fitness import FITNESS
from mergeflow.fitness.gradient import LOSSES
from mergeflow.merge.registry import MERGE_METHODS
from mergeflow.spaces import SPACES
from mergeflow.zoo.language import CORPORA, SYNTHETIC_TASKS


def node(path: str) -> dict:
    """The schema node at a dotted path (definitions.X, properties.X.properties.Y, ...)."""
    out = load_schema()
    for key in path.split("."):
        out = out[key]
    return out


@pytest.mark.parametrize("path, names", [
    ("definitions.merge_method.enum", MERGE_METHODS),
    ("definitions.dtype.enum", DTYPES),
    ("definitions.search_space.properties.kind.enum", SPACES),
    ("definitions.fitness.properties.kind.enum", FITNESS),
    ("definitions.fitness_anchors.properties.estimator.enum", irt.ESTIMATORS),
    ("definitions.fitness_gradient.properties.loss.enum", LOSSES),
    ("definitions.fitness_anchors.properties.anchors.properties.strategy.enum", irt.STRATEGIES),
    ("properties.irt.properties.kind.enum", irt.KINDS),
    ("definitions.task_own.properties.scorer.enum", [s for s in SCORERS if not s.startswith("lm_eval")]),
    ("definitions.task_lm_eval.properties.scorer.enum", [s for s in SCORERS if s.startswith("lm_eval")]),
    ("definitions.train_phase.properties.corpus.enum", CORPORA),
    ("properties.zoo.properties.tasks.items.enum", SYNTHETIC_TASKS),
])
def test_schema_enum_is_the_registry(path, names):
    assert sorted(node(path)) == sorted(names)


@pytest.mark.parametrize("registry, prefix", [(SPACES, "space_"), (FITNESS, "fitness_")])
def test_each_kind_has_its_own_schema_definition_chosen_by_kind(registry, prefix):
    """A kind's keys are one definition, and the dispatch on ``kind`` names it."""
    definitions = load_schema()["definitions"]
    dispatch = definitions[prefix.rstrip("_") if prefix == "fitness_" else "search_space"]["allOf"]
    chosen = {branch["if"]["properties"]["kind"]["const"]: branch["then"]["$ref"] for branch in dispatch}
    assert chosen == {kind: f"#/definitions/{prefix}{kind}" for kind in registry}
    for kind in registry:
        assert definitions[f"{prefix}{kind}"]["additionalProperties"] is False


def test_fitness_kinds_declare_needs_the_workflow_can_map():
    """Every need a fitness kind declares has a path in the one table that maps them (NEED_PATHS)."""
    from mergeflow.schema import validate_section
    from mergeflow.fitness import NEED_PATHS, need_paths

    examples = {"full": {}, "anchors": {}, "multi_fidelity": {"rungs": [20, 100, 1000]}, "gradient": {}}
    for name, kind in FITNESS.items():
        fitness_cfg = validate_section({"kind": name, **examples[name]}, "fitness", "fitness")
        assert "split" in kind.needs(fitness_cfg) and set(kind.needs(fitness_cfg)) <= set(NEED_PATHS)
        paths = need_paths(fitness_cfg, ["t"])["t"]
        assert paths["split"] == "results/data/t/search.parquet" and all(p.startswith("results/") for p in paths.values())