"""The irt / anchors / estimate sub-commands on parquet files."""

import argparse
import json

import pandas as pd

from mergeflow.commands import irt as irt_commands
from mergeflow.irt.simulate import simulate_irt


def run(argv):
    parser = argparse.ArgumentParser(prog="mergeflow")
    irt_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_fit_anchors_estimate_end_to_end(tmp_path):
    sim = simulate_irt(25, 120, seed=6)
    responses = tmp_path / "responses"
    responses.mkdir()
    for row, model in enumerate(sim.matrix.models):
        pd.DataFrame({"item_id": sim.matrix.items, "correct": sim.matrix.matrix[row],
                      "loglik": 0.0}).to_parquet(responses / f"{model}.parquet")
    run(["irt", "fit", str(responses), "--out", str(tmp_path / "irt"), "--steps", "40"])
    assert (tmp_path / "irt" / "posterior.safetensors").exists()
    run(["anchors", str(responses), "--irt", str(tmp_path / "irt"), "--strategy", "irt",
         "--n", "12", "--seed", "2", "--out", str(tmp_path / "anchors" / "task.parquet")])
    anchors = pd.read_parquet(tmp_path / "anchors" / "task.parquet")
    assert len(anchors) == 12
    candidate = responses / f"{sim.matrix.models[0]}.parquet"
    run(["estimate", str(candidate), "--anchors", str(tmp_path / "anchors" / "task.parquet"),
         "--irt", str(tmp_path / "irt"), "--method", "mean", "pirt", "gpirt", "gmpirt",
         "--endpoints", sim.matrix.models[1], sim.matrix.models[2],
         "--calibration", str(responses), "--out", str(tmp_path / "estimates.json")])
    rows = json.loads((tmp_path / "estimates.json").read_text())
    assert [row["method"] for row in rows] == ["mean", "pirt", "gpirt", "gmpirt"]
    assert all(0 <= row["estimate"] <= 1 for row in rows)


def test_the_irt_commands_are_registered_with_the_cli():
    from mergeflow.cli import COMMAND_MODULES

    assert "mergeflow.commands.irt" in COMMAND_MODULES


def test_a_missing_fit_directory_is_a_clear_error(tmp_path):
    import pytest

    from mergeflow.errors import MergeflowError
    from mergeflow.irt.model import load_irt

    with pytest.raises(MergeflowError, match="items.parquet"):
        load_irt(tmp_path)
