"""The report's figures, the results README and the final model card, built from small parquet
fixtures without Snakemake."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from mergeflow import figures
from mergeflow.evolve import history as hist
from mergeflow.irt.model import fit_irt
from mergeflow.irt.simulate import simulate_irt
from mergeflow.publish import final_model, results_readme
from mergeflow.report import final_table
from mergeflow.spaces.parameter import ParameterSpace

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("a", "b")


def responses(path, correct, model=None):
    frame = pd.DataFrame({"item_id": [str(i) for i in range(len(correct))], "correct": correct})
    if model:
        frame["model"] = model
    frame.to_parquet(path, index=False)
    return str(path)


def space() -> ParameterSpace:
    return ParameterSpace.from_config({"method": "task_arithmetic", "layer_groups": 2, "filters": [],
                                       "models": ["zoo/math", "zoo/lang"], "base_model": "zoo/base",
                                       "parameters": {"weight": {"min": 0.0, "max": 1.5}},
                                       "method_parameters": {}}, num_layers=4)


@pytest.fixture
def run(tmp_path):
    """A two-objective multi-fidelity history (3 generations of 4 candidates, 2 rungs), its final
    table with an estimate check, and a Pareto members table."""
    rng = np.random.default_rng(0)
    evolve = tmp_path / "runs" / "r" / "evolve"
    previous = None
    for g in range(3):
        candidates = pd.DataFrame({"generation": g, "index": range(4), "genome": [list(rng.random(4)) for _ in range(4)],
                                   "seed": range(4), "recipe_hash": [f"h{g}{i}" for i in range(4)], "recipe": "r"})
        rows = [{"generation": g, "index": i, "rung": 0, "task": t, "fitness": rng.random(), "sd": 0.1, "items": 10,
                 "problem": "", "wall_s": 1.0} for i in range(4) for t in TASKS]
        rows += [{"generation": g, "index": i, "rung": 1, "task": t, "fitness": rng.random(), "sd": 0.0, "items": 90,
                  "problem": "", "wall_s": 1.0} for i in (0, 1) for t in TASKS]
        table = hist.candidate_table({"a": 1.0, "b": 1.0}, candidates, pd.DataFrame(rows), rungs=2)
        hist.extend(previous, table, evolve / "history.parquet")
        previous = evolve / "history.parquet"
    (evolve / "gen_0" / "benchmark").mkdir(parents=True)
    (evolve / "gen_0" / "benchmark" / "fitness_0.tsv").write_text("s\th:m:s\n12.0\t0:00:12\n")
    files = {"responses": [], "merged": []}
    for task in TASKS:
        for model, correct in (("base", [0, 0, 0, 1]), ("math", [1, 1, 0, 0]), ("lang", [0, 1, 0, 0])):
            files["responses"].append(responses(tmp_path / f"{task}-{model}.parquet", correct))
        files["merged"].append(responses(tmp_path / f"{task}-merged.parquet", [1, 1, 1, 0]))
    search = {"a": responses(tmp_path / "a-search.parquet", [1] * 6 + [0] * 4)}
    table_path = tmp_path / "runs" / "r" / "final" / "test.parquet"
    final_table("r", files["responses"], files["merged"], str(evolve / "history.parquet"), list(TASKS),
                ["base", "math", "lang"], table_path, tmp_path / "runs" / "r" / "final" / "summary.md", search, "best")
    members = pd.DataFrame([{"member": m, "task": t, "search_fitness": 0.5 + 0.1 * m * (1 if t == "a" else -1),
                             "accuracy": 0.45 + 0.1 * m * (1 if t == "a" else -1), "generation": 0, "index": m}
                            for m in range(3) for t in TASKS])
    members.to_parquet(tmp_path / "pareto_test.parquet", index=False)
    return {"history": evolve / "history.parquet", "table": table_path, "members": tmp_path / "pareto_test.parquet",
            "root": tmp_path}


def written_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 5000 and path.read_bytes()[:8] == PNG


def test_per_run_figures_are_written_and_deterministic(run, tmp_path):
    out = figures.search_progress("r", run["history"], "best", tmp_path / "progress.png", run["table"])
    again = figures.search_progress("r", run["history"], "best", tmp_path / "again.png", run["table"])
    assert written_png(out) and out.read_bytes() == again.read_bytes()
    assert written_png(figures.best_genome("r", run["history"], "best", space(), tmp_path / "genome.png"))
    assert written_png(figures.pareto_figure("r", run["history"], run["members"], run["table"], tmp_path / "p.png"))


def stepped_history(fitness: list[float], problem: dict[int, str] | None = None) -> pd.DataFrame:
    """One candidate per generation (a search that ends on its last step), on one objective."""
    return pd.DataFrame({"generation": range(len(fitness)), "index": 0, "fitness_a": fitness, "sd_a": 0.05,
                         "loss": [-f for f in fitness], "problem": [(problem or {}).get(g, "") for g in range(len(fitness))]})


def test_the_progress_line_of_a_best_result_is_the_best_so_far_at_the_top_rung():
    history = pd.DataFrame({"generation": [0, 0, 1, 1, 2, 2], "index": [0, 1] * 3, "rung": [0, 1, 1, 0, 0, 0],
                            "fitness_a": [0.9, 0.4, 0.6, 0.95, 0.2, 0.1], "sd_a": 0.0, "problem": ""})
    generations, line, label = figures.progress_line(history, "a", "best")
    # rung 0's 0.9 and 0.95 are lower-fidelity: the line follows rung 1 only, carried over generation 2
    assert generations.tolist() == [0, 1, 2] and line.tolist() == [0.4, 0.6, 0.6] and label == "best so far (rung 1)"


def test_the_progress_line_of_a_last_result_is_the_mean_of_the_last_steps():
    fitness = [0.1, 0.3, 0.2, 0.6, 0.4, 0.9, float("nan")]
    generations, line, label = figures.progress_line(stepped_history(fitness, {6: "not finite"}), "a", "last")
    assert label == f"mean of the last {figures.TREND_STEPS} steps" and figures.TREND_STEPS == 5
    assert line[:3] == pytest.approx([0.1, 0.2, 0.2])  # fewer steps than the window: all of them
    assert line[5] == pytest.approx(np.mean([0.3, 0.2, 0.6, 0.4, 0.9]))
    assert line[6] == pytest.approx(np.mean([0.2, 0.6, 0.4, 0.9]))  # a step with a problem adds nothing


def test_the_progress_figure_draws_a_last_result_s_line(tmp_path):
    history = stepped_history([0.1, 0.3, 0.2, 0.6])
    history.to_parquet(tmp_path / "h.parquet", index=False)
    assert written_png(figures.search_progress("g", tmp_path / "h.parquet", "last", tmp_path / "g.png"))


def test_the_progress_line_of_a_hybrid_search_follows_each_step_s_mean(tmp_path):
    """A hybrid's generations hold several candidates on one minibatch: the line is each step's mean."""
    history = pd.concat([stepped_history([0.1, 0.3, 0.2]), stepped_history([0.3, 0.5, 0.4]).assign(index=1)])
    generations, line, _ = figures.progress_line(history, "a", "last")
    assert generations.tolist() == [0, 1, 2] and np.allclose(line, [0.2, 0.3, 0.3])
    history.to_parquet(tmp_path / "h.parquet", index=False)
    assert written_png(figures.search_progress("g", tmp_path / "h.parquet", "last", tmp_path / "g.png"))


def test_genome_table_has_a_cell_per_model_and_layer_group():
    table = space().genome_table(np.array([0.0, 1.0, 0.5, 0.2]))
    assert table["column"].tolist() == ["layers 0-1", "layers 0-1", "layers 2-3", "layers 2-3"]
    assert table["row"].tolist() == ["math", "lang", "math", "lang"]
    assert np.allclose(table["value"], [0.0, 1.5, 0.75, 0.3])


def test_summary_figures_cover_every_run(run, tmp_path):
    tables = {"r": run["table"], "s": run["table"]}
    assert written_png(figures.accuracy_figure(tables, tmp_path / "acc.png"))
    assert written_png(figures.cost_figure(tables, {"r": ["a", "b"], "s": ["b"]}, tmp_path / "cost.png"))


@pytest.mark.parametrize("order", [["full", "halving"], ["halving", "full"]])
def test_cost_labels_sit_by_their_own_points(order):
    """Two searches of the same cost: the higher one's label above it, the lower one's below,
    whichever comes first; a third between them at its height; one alone above."""
    points = {"full": (4800.0, 0.45), "halving": (4800.0, 0.40), "cheap": (480.0, 0.42)}
    offsets = figures.label_offsets({name: points[name] for name in [*order, "cheap"]})
    assert offsets["full"] > 0 > offsets["halving"] and offsets["cheap"] > 0
    offsets = figures.label_offsets(points | {"psdfs": (5000.0, 0.43)})
    assert offsets["full"] > offsets["psdfs"] > offsets["halving"]


def test_the_cost_figure_labels_each_point_by_its_position(run, tmp_path, monkeypatch):
    table = pd.read_parquet(run["table"])
    lower = table.assign(accuracy=np.where(table["model"] == "merged", table["accuracy"] - 0.1, table["accuracy"]))
    lower.to_parquet(tmp_path / "lower.parquet")
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out: drawn.setdefault("fig", fig))
    figures.cost_figure({"low": tmp_path / "lower.parquet", "high": run["table"]},
                        {"low": ["a"], "high": ["a"]}, tmp_path / "cost.png")
    for ax in drawn["fig"].axes:
        labels = {text.get_text(): text for text in ax.texts if text.get_text() in ("low", "high")}
        assert labels["high"].xy[1] > labels["low"].xy[1]
        assert labels["high"].xyann[1] > 0 > labels["low"].xyann[1]


def test_irt_figure_marks_anchors_and_checked_merges(run, tmp_path):
    sim = simulate_irt(30, 60, seed=1)
    fit = fit_irt(sim.matrix, steps=60, min_steps=60)
    fit.save(tmp_path / "irt")
    long = pd.DataFrame([{"model": m, "item_id": item, "correct": sim.matrix.matrix[r, c]}
                         for r, m in enumerate(sim.matrix.models) for c, item in enumerate(sim.matrix.items)])
    long.to_parquet(tmp_path / "calibration.parquet", index=False)
    pd.DataFrame({"item_id": [1, 5, 9], "weight": [1.0, 1.0, 1.0]}).to_parquet(tmp_path / "anchors.parquet")
    out = figures.irt_fit_figure("a", tmp_path / "irt", [tmp_path / "calibration.parquet"],
                                 [tmp_path / "anchors.parquet"], [run["table"]], tmp_path / "irt.png")
    assert written_png(out)


def test_results_readme_and_model_card(run, tmp_path, monkeypatch):
    monkeypatch.chdir(run["root"].parent)
    root = run["root"].name  # the results directory, relative, as in the workflow
    config = {"seed": 0, "evaluation": {"device": "cpu", "dtype": "float32"},
              "runs": {"r": {"tasks": list(TASKS), "seed": 0, "evolve": {
                  "objectives": {"a": 1.0}, "fitness": {"kind": "multi_fidelity", "rungs": [10, 100], "eta": 2},
                  "optimizer": "CMA", "sigma": 0.35, "population": 4, "generations": 3}}}}
    provenance = run["root"] / "provenance.json"
    provenance.write_text(json.dumps({"run": "r", "config": config, "seeds": {"seed": 0, "run_seed": 0},
                                      "python": "3.11.7", "packages": {"mergeflow": "0.1.0", "torch": "2.13.0+cpu"},
                                      "git": {"commit": "abc123", "dirty": False},
                                      "hardware": {"cpu": "Test CPU", "cpu_count": 2, "machine": "x86_64", "gpus": []},
                                      "models": {"base": {"fingerprint": "f" * 64, "location": "results/zoo/base",
                                                          "parameters": 600000}},
                                      "zoo_fingerprint": "0123456789abcdef"}))
    monkeypatch.setattr("mergeflow.publish.RESULTS", root)
    text = results_readme(["r"], [str(provenance)], {"r": str(run["table"])}, str(run["root"] / "runs/r/final/summary.md"),
                          [f"{root}/runs/r/figures/search_progress.png", f"{root}/figures/accuracy.png"],
                          [f"{root}/runs/r/final/model"], ["config/config.yaml"], run["root"] / "README.md",
                          run["root"] / "requirements.txt")
    assert "`abc123`" in text and "Test CPU (2 cores" in text and "git checkout abc123" in text
    assert "![search progress of run r](runs/r/figures/search_progress.png)" in text
    # the cost table: 12 candidates, 10 items each at rung 0 and 90 more for 2 per generation
    assert "| r | 12 | 1,320 | 12 |" in text
    assert "| base | `results/zoo/base` | 600,000 | `ffffffffffffffff` |" in text
    assert "The embedded zoo's fingerprint: `0123456789abcdef`" in text
    assert "CMA, sigma 0.35" in text and "learning rate" not in text
    pins = (run["root"] / "requirements.txt").read_text()
    assert "pandas==" + pd.__version__ in pins and "mergeflow==" not in pins

    merge = tmp_path / "merge"
    merge.mkdir()
    (merge / "model.safetensors").write_bytes(b"weights")
    (merge / ".snakemake_timestamp").write_text("")
    (merge / "README.md").write_text("---\ntags:\n- merge\n---\n# Merged model\n\n## Lineage\n\n- run: r\n")
    card_dir = final_model("r", merge, run["table"], ["org/base", "math", "lang"], tmp_path / "model")
    card = (card_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == ["org/base", "math", "lang"] and meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "mergeflow"]
    assert "## Lineage" in card and "| a | 4 | 0.750 |" in card
    assert (card_dir / "model.safetensors").stat().st_ino == (merge / "model.safetensors").stat().st_ino
    assert not (card_dir / ".snakemake_timestamp").exists()
