"""Loading response parquet into a models × items matrix, and bad input."""

import numpy as np
import pandas as pd
import pytest

from mergeflow.errors import MergeflowError
from mergeflow.irt.responses import load_response_matrix, mean_preserving_threshold


def long_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "model": ["a", "a", "a", "b", "b"],
        "item_id": [1, 2, 3, 1, 3],
        "correct": [1, 0, 1, 0, 1],
        "subscenario": ["x", "x", "y", "x", "y"],
    })


def test_long_format_frame_with_missing_items():
    matrix = load_response_matrix(long_frame())
    assert matrix.models == ["a", "b"]
    assert matrix.items == [1, 2, 3]
    assert np.isnan(matrix.matrix[1, 1])  # b never answered item 2
    assert matrix.matrix[0].tolist() == [1, 0, 1]
    assert matrix.subscenarios == {1: "x", 2: "x", 3: "y"}


def test_per_model_files_take_the_model_from_the_file_stem(tmp_path):
    directory = tmp_path / "responses"
    directory.mkdir()
    for name, correct in [("base", [1, 0]), ("merge-1", [1, 1])]:
        pd.DataFrame({"item_id": ["q1", "q2"], "correct": correct, "loglik": [-0.1, -2.0]}).to_parquet(
            directory / f"{name}.parquet")
    matrix = load_response_matrix(directory)
    assert matrix.models == ["base", "merge-1"]
    assert matrix.items == ["q1", "q2"]
    assert matrix.matrix.tolist() == [[1, 0], [1, 1]]
    same = load_response_matrix(sorted(directory.glob("*.parquet")))
    assert np.array_equal(same.matrix, matrix.matrix)


def test_non_binary_scores_are_thresholded_preserving_the_mean():
    frame = pd.DataFrame({"model": ["a"] * 4 + ["b"] * 4, "item_id": list(range(4)) * 2,
                          "correct": [0.9, 0.2, 0.7, 0.1, 0.8, 0.6, 0.3, 0.0]})
    matrix = load_response_matrix(frame)
    assert set(np.unique(matrix.matrix)) <= {0.0, 1.0}
    assert matrix.threshold is not None
    assert abs(matrix.matrix.mean() - frame["correct"].mean()) <= 0.13


def test_non_binary_scores_can_be_rejected():
    frame = long_frame().assign(correct=[0.5, 0, 1, 1, 0])
    with pytest.raises(MergeflowError, match="non-binary"):
        load_response_matrix(frame, scores="reject")


def test_scores_outside_unit_interval_are_rejected():
    with pytest.raises(MergeflowError, match="outside"):
        load_response_matrix(long_frame().assign(correct=[2, 0, 1, 1, 0]))


def test_mean_preserving_threshold():
    scores = np.array([0.0, 0.1, 0.2, 0.9, 1.0])
    c = mean_preserving_threshold(scores)
    assert abs((scores > c).mean() - scores.mean()) <= 0.2


def test_missing_column_duplicates_and_missing_file(tmp_path):
    with pytest.raises(MergeflowError, match="correct"):
        load_response_matrix(long_frame().drop(columns="correct"))
    with pytest.raises(MergeflowError, match="more than one response"):
        load_response_matrix(pd.concat([long_frame(), long_frame()]))
    with pytest.raises(MergeflowError, match="does not exist"):
        load_response_matrix(tmp_path / "nope.parquet")
