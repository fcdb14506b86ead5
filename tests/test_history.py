"""The history's owner: rows from candidates and fitness shards, losses, the best candidate,
the Pareto front, and per-objective reads — on small parquet fixtures."""

import numpy as np
import pandas as pd
import pytest

from mergeflow.errors import MergeflowError
from mergeflow.evolve import history as hist


def candidates(generation: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"generation": generation, "index": range(n), "genome": [[0.1 * i] for i in range(n)],
                         "seed": range(n), "recipe_hash": [f"h{generation}{i}" for i in range(n)],
                         "recipe": [f"recipe {generation}.{i}" for i in range(n)]})


def shard_rows(generation: int, fitness: dict[int, dict[str, float]], items: dict[str, int],
               problem: dict[int, str] | None = None) -> pd.DataFrame:
    return pd.DataFrame([{"generation": generation, "index": i, "rung": 0, "task": t, "fitness": f, "sd": 0.01, "items": items[t],
                          "problem": (problem or {}).get(i, ""), "wall_s": 1.0}
                         for i, per in fitness.items() for t, f in per.items()], columns=hist.SHARD_COLUMNS)


def test_one_objective_rows_have_the_documented_columns_in_order(tmp_path):
    table = hist.candidate_table({"a": 1.0}, candidates(0, 3), shard_rows(0, {i: {"a": 0.1 * i} for i in range(3)}, {"a": 20}))
    assert list(table.columns) == [*hist.CANDIDATE_COLUMNS, "fitness_a", "sd_a", "items", "problem", "fitness", "loss",
                                   "loss_a"]
    assert table["items"].tolist() == [20, 20, 20] and table["loss"].tolist() == pytest.approx([0, -0.1, -0.2])
    assert hist.task_items(table.iloc[0], "a") == 20


def test_several_objectives_weight_the_fitness_and_count_items_per_objective(tmp_path):
    fitness = {0: {"a": 0.2, "b": 0.8}, 1: {"a": 0.6, "b": 0.0}}
    # two shards (odd and even candidates), read back as tell reads them
    rows = shard_rows(0, fitness, {"a": 20, "b": 50})
    for k in (0, 1):
        rows[rows["index"] % 2 == k].to_parquet(tmp_path / f"fitness_{k}.parquet", index=False)
    shards = pd.concat([pd.read_parquet(tmp_path / f"fitness_{k}.parquet") for k in (0, 1)], ignore_index=True)
    table = hist.candidate_table({"a": 3.0, "b": 1.0}, candidates(0, 2), shards)
    assert table["fitness"].tolist() == pytest.approx([(3 * 0.2 + 0.8) / 4, (3 * 0.6) / 4])
    assert table["items"].tolist() == [70, 70]
    assert [hist.task_items(table.iloc[0], t) for t in ("a", "b")] == [20, 50]
    assert hist.losses(table, ["b", "a"]) == [[-0.8, -0.2], [-0.0, -0.6]]
    assert hist.objectives_of(table) == ["a", "b"]


def test_a_problem_or_a_nan_gets_the_worst_loss_on_every_objective():
    fitness = {0: {"a": 0.5, "b": 0.5}, 1: {"a": float("nan"), "b": 0.9}, 2: {"a": 0.4, "b": 0.4}}
    table = hist.candidate_table({"a": 1.0, "b": 1.0}, candidates(0, 3),
                                 shard_rows(0, fitness, {"a": 5, "b": 5}, problem={2: "merged weights hold NaN"}))
    assert table["loss"].tolist() == [-0.5, hist.WORST_LOSS, hist.WORST_LOSS]
    assert table["loss_b"].tolist() == [-0.5, hist.WORST_LOSS, hist.WORST_LOSS]
    assert np.isnan(table["fitness"][1]) and np.isnan(table["fitness"][2])


def test_shards_that_miss_a_candidate_are_refused():
    with pytest.raises(MergeflowError, match=r"cover candidates \[0, 1\], expected \[0, 1, 2\]"):
        hist.candidate_table({"a": 1.0}, candidates(0, 3), shard_rows(0, {0: {"a": 0.1}, 1: {"a": 0.2}}, {"a": 5}))


def test_extend_best_row_and_generation_reads(tmp_path):
    first = hist.candidate_table({"a": 1.0}, candidates(0, 2), shard_rows(0, {0: {"a": 0.3}, 1: {"a": 0.5}}, {"a": 5}))
    hist.extend(None, first, tmp_path / "gen_0.parquet")
    second = hist.candidate_table({"a": 1.0}, candidates(1, 2), shard_rows(1, {0: {"a": 0.5}, 1: {"a": 0.4}}, {"a": 5}))
    history = hist.extend(tmp_path / "gen_0.parquet", second, tmp_path / "gen_1.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "gen_1.parquet"), history)
    best = hist.best_row(history, "best")  # 0.5 twice: the earliest wins
    assert (best["generation"], best["index"]) == (0, 1)
    assert hist.task_estimate(best, "a") == (0.5, 0.01)
    assert hist.generation(history, 1)["recipe_hash"].tolist() == ["h10", "h11"]


def test_pareto_front_keeps_only_non_dominated_candidates():
    history = pd.DataFrame({"fitness_a": [0.1, 0.5, 0.4, 0.2, 0.9], "fitness_b": [0.9, 0.5, 0.4, 0.8, 0.9],
                            "problem": ["", "", "", "", "NaN weights"], "recipe_hash": list("wxyzv")})
    front = hist.pareto_front(history, ["a", "b"])
    assert sorted(front["recipe_hash"]) == ["w", "x", "z"]  # y is beaten by x; v had a problem


def extra_shard(generation: int, per_task: dict[int, dict[str, list[float]]], problem: dict[int, str] | None = None):
    """A shard with a kind's extra column ``signal`` (a vector per candidate and task)."""
    fitness = {i: {t: 0.5 for t in tasks} for i, tasks in per_task.items()}
    rows = shard_rows(generation, fitness, {t: 4 for tasks in per_task.values() for t in tasks}, problem)
    rows["signal"] = [per_task[i][t] for i, t in zip(rows["index"], rows["task"])]
    return rows


def test_a_kind_s_extra_column_is_the_objectives_weighted_mean_and_nan_for_a_problem():
    shards = extra_shard(0, {0: {"a": [1.0, 2.0], "b": [3.0, 6.0]}, 1: {"a": [9.0, 9.0], "b": [9.0, 9.0]}},
                         problem={1: "merged weights hold NaN"})
    table = hist.candidate_table({"a": 3.0, "b": 1.0}, candidates(0, 2), shards)
    assert list(table.columns)[-1] == "signal"  # after the losses
    assert table["signal"].iloc[0] == pytest.approx([(3 * 1.0 + 3.0) / 4, (3 * 2.0 + 6.0) / 4])
    assert len(table["signal"].iloc[1]) == 2 and np.isnan(table["signal"].iloc[1]).all()
    told = hist.extras(table, ("signal",))
    assert [sorted(e) for e in told] == [["signal"], ["signal"]] and told[0]["signal"].dtype == np.float64
    assert hist.extras(table, ()) is None  # a kind without extras tells the loss alone


def test_extras_survive_the_history_file_and_come_back_in_index_order(tmp_path):
    table = hist.candidate_table({"a": 1.0}, candidates(0, 2), extra_shard(0, {1: {"a": [2.0]}, 0: {"a": [1.0]}}))
    history = hist.extend(None, table.sort_values("index", ascending=False), tmp_path / "h.parquet")
    told = hist.extras(pd.read_parquet(tmp_path / "h.parquet"), ["signal"])
    assert [e["signal"].tolist() for e in told] == [[1.0], [2.0]] and len(history) == 2


def test_the_last_result_is_the_last_candidate_without_a_problem():
    first = hist.candidate_table({"a": 1.0}, candidates(0, 1), shard_rows(0, {0: {"a": 0.9}}, {"a": 5}))
    second = hist.candidate_table({"a": 1.0}, candidates(1, 1), shard_rows(1, {0: {"a": 0.1}}, {"a": 5}))
    third = hist.candidate_table({"a": 1.0}, candidates(2, 1), shard_rows(2, {0: {"a": 0.5}}, {"a": 5},
                                                                          problem={0: "fitness is not finite"}))
    history = pd.concat([first, second, third], ignore_index=True)
    assert hist.best_row(history, "best")["generation"] == 0  # the highest fitness
    assert hist.best_row(history, "last")["generation"] == 1  # the last step that was scored
    with pytest.raises(MergeflowError, match="unknown search result 'first'"):
        hist.best_row(history, "first")
