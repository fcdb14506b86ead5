"""Stage library functions called as their rules call them, in-process on the tiny zoo: the
calibration population, the baseline and final merges with their lineage, provenance and the job
logs. Each fitness kind's ask / fitness / tell has its own module (tests/test_fitness_*.py); the
slow end-to-end run (tests/test_workflow.py) drives the same functions through Snakemake."""

import json

import pandas as pd
import yaml

from mergeflow.baseline import baseline_model
from mergeflow.final import final_merge
from mergeflow.logs import setup_job
from mergeflow.provenance import write_provenance


def test_calibration_population_holds_endpoints_and_random_merges(stages):
    _, root, _, _ = stages
    calibration = pd.read_parquet(root / "calibration.parquet")
    assert sorted(calibration["model"].unique()) == [f"random-{i:03d}" for i in range(4)]
    assert calibration.groupby("model").size().eq(40).all()


def test_baseline_and_final_merges_carry_their_lineage(stages, tmp_path):
    config, _, _, paths = stages
    baseline_model(config["baseline"], paths["base"], [paths["math"], paths["lang"]], str(tmp_path / "b.yaml"),
                   str(tmp_path / "baseline"))
    recipe = yaml.safe_load((tmp_path / "b.yaml").read_text())
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.5, 0.5]
    history = pd.DataFrame({"generation": [0, 0], "index": [0, 1], "loss": [-0.2, -0.3], "fitness": [0.2, 0.3],
                            "recipe": ["", ""], "problem": ["", ""]})
    history.to_parquet(tmp_path / "history.parquet", index=False)
    final_merge(str(tmp_path / "b.yaml"), str(tmp_path / "final"), {"run": "r"}, str(tmp_path / "history.parquet"),
                "best")
    card = (tmp_path / "final" / "README.md").read_text()
    assert "- run: r" in card and "found in generation 0 as candidate 1 of 2 evaluated" in card
    final_merge(str(tmp_path / "b.yaml"), str(tmp_path / "last"), {"run": "r"}, str(tmp_path / "history.parquet"),
                "last")  # a search that ends on its last candidate: the same one here, by another rule
    assert "found in generation 0 as candidate 1 of 2" in (tmp_path / "last" / "README.md").read_text()


def test_provenance_and_job_logs(stages, tmp_path):
    config, _, _, _ = stages
    checks = []
    for name, fingerprint in (("base", "a" * 64), ("math", "b" * 64)):
        checks.append(tmp_path / f"{name}.json")
        checks[-1].write_text(json.dumps({"model": name, "fingerprint": fingerprint, "location": f"results/zoo/{name}",
                                          "parameters": 10, "tensors": 3}))
    record = write_provenance(config | {"zoo": {"seed": 0, "experts": {"math": {}}}}, "full", tmp_path / "provenance.json",
                              checks)
    written = json.loads((tmp_path / "provenance.json").read_text())
    assert written["seeds"] == record["seeds"] == {"seed": 0, "run_seed": 0, "zoo_seed": 0}
    assert written["models"]["math"] == {"fingerprint": "b" * 64, "location": "results/zoo/math", "parameters": 10}
    other = write_provenance(config | {"zoo": {"seed": 0, "experts": {"math": {}}}}, "full", tmp_path / "other.json", checks[:1])
    assert len(written["zoo_fingerprint"]) == 16 and other["zoo_fingerprint"] != written["zoo_fingerprint"]
    logger = setup_job(tmp_path / "job.log", threads=1)
    logger.info("hello from a job")
    assert "hello from a job" in (tmp_path / "job.log").read_text()
