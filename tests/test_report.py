"""The final tables on small parquet fixtures: a run's test table and summary, the estimate check
of a search on anchors, and the table over runs."""

import pandas as pd
import pytest

from mergeflow.evolve import history as hist
from mergeflow.report import MERGED, compare_runs, final_table


def responses(path, correct: list[int]):
    pd.DataFrame({"item_id": [str(i) for i in range(len(correct))], "correct": correct}).to_parquet(path, index=False)
    return str(path)


@pytest.fixture
def run_files(tmp_path):
    """Two tasks, two models, a two-candidate history scored on 10 anchors per task, two
    benchmark files, and the final merge's test and search-split responses."""
    files = {"responses": [], "merged": [], "search": {}}
    for task in ("a", "b"):
        for model, correct in (("base", [0, 0, 0, 1]), ("math", [1, 1, 0, 0])):
            files["responses"].append(responses(tmp_path / f"{task}-{model}.parquet", correct))
        files["merged"].append(responses(tmp_path / f"{task}-merged.parquet", [1, 1, 1, 0]))
        files["search"][task] = responses(tmp_path / f"{task}-search.parquet", [1] * 6 + [0] * 4)
    candidates = pd.DataFrame({"generation": 0, "index": [0, 1], "genome": [[0.1], [0.2]], "seed": [1, 2],
                               "recipe_hash": ["x", "y"], "recipe": ["r0", "r1"]})
    shards = pd.DataFrame([{"generation": 0, "index": i, "rung": 0, "task": t, "fitness": f, "sd": 0.05, "items": 10,
                            "problem": "", "wall_s": 1.0}
                           for i, f in enumerate([0.5, 0.7]) for t in ("a", "b")])
    evolve = tmp_path / "evolve"
    hist.extend(None, hist.candidate_table({"a": 1.0, "b": 1.0}, candidates, shards), evolve / "history.parquet")
    (evolve / "gen_0" / "benchmark").mkdir(parents=True)
    for job, seconds in (("ask", 1.5), ("fitness_0", 10.0)):
        (evolve / "gen_0" / "benchmark" / f"{job}.tsv").write_text(f"s\th:m:s\n{seconds}\t0:00:01\n")
    files["history"] = str(evolve / "history.parquet")
    return files


def test_final_table_holds_every_model_the_search_cost_and_the_estimate_check(run_files, tmp_path):
    table = final_table("r", run_files["responses"], run_files["merged"], run_files["history"], ["a", "b"],
                        ["base", "math"], tmp_path / "test.parquet", tmp_path / "summary.md", run_files["search"],
                        "best")
    assert table.equals(pd.read_parquet(tmp_path / "test.parquet"))
    acc = table.set_index(["model", "task"])["accuracy"]
    assert acc[("base", "a")] == 0.25 and acc[("math", "b")] == 0.5 and acc[(MERGED, "a")] == 0.75
    merged = table[table["model"] == MERGED].set_index("task")
    assert merged["search_items"].tolist() == [40, 40] and merged["search_wall_s"].tolist() == [11.5, 11.5]
    # the best candidate (fitness 0.7, sd 0.05, 10 anchors per task) against its whole search split (0.6)
    assert merged.loc["a", "estimated_fitness"] == 0.7 and merged.loc["a", "estimate_items"] == 10
    assert merged.loc["a", "search_split_accuracy"] == 0.6 and merged.loc["a", "search_split_items"] == 10
    summary = (tmp_path / "summary.md").read_text()
    assert "| merged | 0.750 | 0.750 | 40 | 12 |" in summary
    assert "| merged | a | 0.700 ± 0.050 (10) | 0.600 (10) | +10.0 | no |" in summary  # 10 > 1.96 × 5 points


def test_a_run_without_a_search_has_no_cost_columns(run_files, tmp_path):
    table = final_table("plain", run_files["responses"], [], None, ["a", "b"], ["base", "math"],
                        tmp_path / "t.parquet", tmp_path / "s.md")
    assert "search_items" not in table and MERGED not in set(table["model"])
    assert "## The search's estimate" not in (tmp_path / "s.md").read_text()


def test_compare_runs_lists_shared_models_once_and_each_runs_merge(run_files, tmp_path):
    tables = {}
    for run in ("one", "two"):
        tables[run] = str(tmp_path / f"{run}.parquet")
        final_table(run, run_files["responses"], run_files["merged"], run_files["history"], ["a", "b"],
                    ["base", "math"], tables[run], tmp_path / f"{run}.md")
    table = compare_runs(tables, tmp_path / "summary.md")
    assert list(dict.fromkeys(table["model"])) == ["base", "math", "merged (one)", "merged (two)"]
    assert "# All runs: test-split accuracy" in (tmp_path / "summary.md").read_text()
