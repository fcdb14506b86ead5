"""Config validation: kinds dispatch their own keys, bad kinds are named with the known ones,
defaults come from the schema, and the older flat fitness form is still read."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from mergeflow.config import validate_config
from mergeflow.errors import MergeflowError
from mergeflow.evolve.stages import EvolveConfig

DEFAULT = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())


def config_with(run: str = "anchored", **evolve) -> dict:
    config = copy.deepcopy(DEFAULT)
    config["runs"][run]["evolve"].update(evolve)
    return config


def test_the_default_validates_with_every_default_filled():
    config = validate_config(copy.deepcopy(DEFAULT))
    assert config["runs"]["anchored"]["evolve"]["fitness"] == {
        "kind": "multi_fidelity", "rungs": [10, 50], "eta": 8, "lowest": "anchors", "estimator": "gmpirt",
        "anchors": {"strategy": "irt", "seed": 0}, "promote": "estimate", "seed": 0}
    anchors = validate_config(config_with(fitness={"kind": "anchors"}))["runs"]["anchored"]["evolve"]["fitness"]
    assert anchors == {"kind": "anchors", "estimator": "gmpirt", "anchors": {"strategy": "irt", "n": 20, "seed": 0}}
    assert config["runs"]["full"]["evolve"]["fitness"] == {"kind": "full"}
    space = config["runs"]["full"]["evolve"]["search_space"]
    assert space["kind"] == "parameter" and space["filters"] == [] and space["method_parameters"] == {}
    assert config["evaluation"]["add_bos"] == "auto" and config["evaluation"]["max_new_tokens"] == 6


def test_an_absent_calibration_space_takes_the_schema_default():
    config = copy.deepcopy(DEFAULT)
    del config["irt"]["calibration"]["search_space"]
    space = validate_config(config)["irt"]["calibration"]["search_space"]
    assert space == {"kind": "parameter", "method": "task_arithmetic", "layer_groups": 2,
                     "parameters": {"weight": {"min": 0.0, "max": 1.5}}, "filters": [], "method_parameters": {}}


@pytest.mark.parametrize("evolve, message", [
    ({"fitness": {"kind": "anchor"}},
     r"at runs\.anchored\.evolve\.fitness\.kind: 'anchor' is not one of \['full', 'anchors', 'multi_fidelity', 'gradient'\]"),
    ({"search_space": {"kind": "dfz", "method": "ties"}},
     r"at runs\.anchored\.evolve\.search_space\.kind: 'dfz' is not one of \['parameter', 'dfs', 'dis'\]"),
    ({"fitness": {"kind": "full", "estimator": "pirt"}},
     r"at runs\.anchored\.evolve\.fitness: Additional properties are not allowed \('estimator' was unexpected\)"),
    ({"fitness": {"kind": "anchors", "anchors": {"n": 0}}},
     r"at runs\.anchored\.evolve\.fitness\.anchors\.n: 0 is less than the minimum of 1"),
    ({"fitness": {"kind": "anchors", "estimator": "irt"}},
     r"at runs\.anchored\.evolve\.fitness\.estimator: 'irt' is not one of"),
])
def test_a_bad_kind_or_a_key_of_another_kind_is_named(evolve, message):
    with pytest.raises(MergeflowError, match=message):
        validate_config(config_with(**evolve))


def test_the_older_flat_fitness_form_reads_as_the_mapping():
    flat = copy.deepcopy(DEFAULT)
    flat["runs"]["anchored"]["evolve"].update(fitness="anchors", estimator="gpirt", anchors={"n": 10})
    mapping = config_with(fitness={"kind": "anchors", "estimator": "gpirt", "anchors": {"n": 10}})
    assert validate_config(flat) == validate_config(mapping)
    assert EvolveConfig.from_config(flat, "anchored") == EvolveConfig.from_config(mapping, "anchored")


@pytest.mark.parametrize("evolve, message", [
    # a misspelt merge parameter: the search would tune a gene nothing reads
    ({"search_space": {"method": "task_arithmetic", "parameters": {"wieght": {"min": 0.0, "max": 1.0}}}},
     r"^config: runs\.full\.evolve\.search_space\.parameters: parameter 'wieght' is read by no merge method "
     r"here \(task_arithmetic\); .*did you mean 'weight'\?"),
    # a real parameter that this space's method does not read is a gene nothing reads, too
    ({"search_space": {"method": "linear", "parameters": {"density": {"min": 0.1, "max": 1.0}}}},
     r"^config: runs\.full\.evolve\.search_space\.parameters: parameter 'density' is read by no merge method "
     r"here \(linear\); per-model parameters they read: weight"),
    ({"search_space": {"method": "ties", "method_parameters": {"lamda": 0.5}}},
     r"^config: runs\.full\.evolve\.search_space\.method_parameters: parameter 'lamda' .*did you mean 'lambda'\?"),
    ({"search_space": {"method": "linear", "parameters": {"weight": {"min": "zero", "max": 1.0}}}},
     r"^config: runs\.full\.evolve\.search_space\.parameters\.weight\.min: 'zero' is not a number"),
    ({"search_space": {"method": "frankenmerge"}},
     r"^config: at runs\.full\.evolve\.search_space\.method: 'frankenmerge' is not one of \['linear', "),
    ({"optimizer": "CMAES2"}, r"^config: runs\.full\.evolve\.optimizer: unknown Nevergrad optimizer 'CMAES2'"),
    ({"optimizer": "cma"}, r"^config: runs\.full\.evolve\.optimizer: unknown Nevergrad optimizer 'cma'; did you mean 'CMA'\?"),
    ({"fitness": {"kind": "anchors", "anchors": {"n": 1001}}},
     r"^config: runs\.full\.evolve\.fitness\.anchors\.n: 1001 anchor items, more than the search split of task "
     r"'math_l2' \(1000, tasks\.math_l2\.splits\.search\)"),
    ({"objectives": {"math_l3": 1.0}}, r"^config: runs\.full\.evolve\.objectives names task 'math_l3'"),
])
def test_what_a_job_would_find_late_is_named_by_key_at_parse_time(evolve, message):
    with pytest.raises(MergeflowError, match=message):
        validate_config(config_with("full", **evolve))


def test_a_template_and_the_calibration_space_are_checked_at_parse_time():
    config = copy.deepcopy(DEFAULT)
    config["tasks"]["math_l1"]["template"] = "{question"
    with pytest.raises(MergeflowError, match=r"^config: tasks\.math_l1\.template: '\{question' is not a valid template"):
        validate_config(config)
    config = copy.deepcopy(DEFAULT)
    config["irt"]["calibration"]["search_space"]["parameters"] = {"t": 0.5}
    with pytest.raises(MergeflowError, match=r"^config: irt\.calibration\.search_space\.parameters: parameter 't' "
                                             r"is read by no merge method here \(task_arithmetic\)"):
        validate_config(config)


def test_layer_groups_are_checked_against_the_base_config_on_disk(tmp_path):
    config = copy.deepcopy(DEFAULT)
    for name in ("base", "math", "lang"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"num_hidden_layers": 3}')
        config["models"][name] = {"path": str(tmp_path / name)}
    with pytest.raises(MergeflowError, match=r"^config: irt\.calibration\.search_space\.layer_groups: 4 must be between 1 "
                                             r"and the base model's 3 layers"):
        validate_config(config)


@pytest.mark.parametrize("section, name", [("runs", "my run/x"), ("models", "../up"), ("tasks", ".hidden")])
def test_a_name_that_is_not_a_safe_path_component_is_refused(section, name):
    config = copy.deepcopy(DEFAULT)
    config[section][name] = config[section].pop(next(iter(config[section])))
    with pytest.raises(MergeflowError, match=rf"config: at {section}: the name '{re.escape(name)}' is not allowed: "
                                             r"a name is part of result paths"):
        validate_config(config)
