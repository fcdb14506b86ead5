"""The irt / anchors / estimate sub-commands on parquet files."""

import argparse
import json

import numpy as np
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


def test_the_irt_commands_are_registered_with_the_cli_and_merge_starts_without_them():
    import subprocess
    import sys

    from mergeflow.cli import COMMAND_MODULES, build_parser

    assert {COMMAND_MODULES[c] for c in ("irt", "anchors", "estimate")} == {"mergeflow.commands.irt"}
    assert {"merge", "irt", "anchors", "estimate"} <= set(build_parser().format_help().split("{")[1].split("}")[0].split(","))
    # a merge's start: its own module only, not the IRT stack (pandas, pyro)
    code = ("import sys; from mergeflow.cli import build_parser; build_parser('merge'); "
            "sys.exit(', '.join(m for m in ('pandas', 'pyro', 'mergeflow.commands.irt') if m in sys.modules) or None)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr == ""


def test_a_missing_fit_directory_is_a_clear_error(tmp_path):
    import pytest

    from mergeflow.errors import MergeflowError
    from mergeflow.irt.fit import load_irt

    with pytest.raises(MergeflowError, match="items.parquet"):
        load_irt(tmp_path)


def write_responses(directory, matrix) -> None:
    directory.mkdir()
    for row, model in enumerate(matrix.models):
        pd.DataFrame({"item_id": matrix.items, "correct": matrix.matrix[row]}).to_parquet(directory / f"{model}.parquet")


def test_cli_messages_name_the_flags(tmp_path, capsys):
    import pytest

    from mergeflow import cli

    sim = simulate_irt(8, 30, seed=1)
    write_responses(tmp_path / "responses", sim.matrix)
    run(["irt", "fit", str(tmp_path / "responses"), "--out", str(tmp_path / "irt"), "--steps", "20"])
    run(["anchors", str(tmp_path / "responses"), "--strategy", "random", "--n", "5", "--out", str(tmp_path / "a.parquet")])
    candidate = str(tmp_path / "responses" / f"{sim.matrix.models[0]}.parquet")
    code = cli.main(["estimate", candidate, "--anchors", str(tmp_path / "a.parquet"), "--irt", str(tmp_path / "irt"),
                     "--method", "mpirt", "--out", str(tmp_path / "e.json")])
    err = capsys.readouterr().err
    assert code == 2 and "`--endpoints NAME ...`" in err
    code = cli.main(["estimate", candidate, "--anchors", str(tmp_path / "a.parquet"), "--irt", str(tmp_path / "irt"),
                     "--method", "mpirt", "--endpoints", "--out", str(tmp_path / "e.json")])
    assert code == 2 and "`--endpoints` names none" in capsys.readouterr().err
    graded = tmp_path / "graded"
    graded.mkdir()
    pd.DataFrame({"model": ["a", "a", "b", "b"], "item_id": ["i", "j", "i", "j"],
                  "correct": [0.3, 1.0, 0.0, 0.7]}).to_parquet(graded / "long.parquet")
    assert cli.main(["irt", "fit", str(graded), "--out", str(tmp_path / "g"), "--scores", "reject"]) == 2
    assert "`--scores threshold`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["irt", "fit", str(graded), "--out", str(tmp_path / "g"), "--steps", "0"])
    assert "argument --steps: 0 is not a positive integer" in capsys.readouterr().err


def test_an_all_correct_matrix_fits_with_a_warning(tmp_path, caplog):
    import logging

    from mergeflow.irt.model import fit_irt
    from mergeflow.irt.responses import load_response_matrix

    sim = simulate_irt(6, 20, seed=2)
    sim.matrix.matrix[:] = 1.0
    write_responses(tmp_path / "responses", sim.matrix)
    matrix = load_response_matrix(tmp_path / "responses")
    with caplog.at_level(logging.WARNING, logger="mergeflow"):
        fit_irt(matrix, steps=5)
    assert "every item is answered alike by all 6 models (20 items all correct, 0 all wrong)" in caplog.text
    caplog.clear()
    matrix.matrix[0, 0] = 0.0  # one item that tells a model apart: no warning
    with caplog.at_level(logging.WARNING, logger="mergeflow"):
        fit_irt(matrix, steps=5)
    assert "answered alike" not in caplog.text


def test_nan_and_fractional_scores_are_counted_and_said(tmp_path, capsys):
    from mergeflow import cli

    sim = simulate_irt(6, 20, seed=3)
    sim.matrix.matrix[0, :3] = np.nan
    sim.matrix.matrix[1, 0] = 0.4
    write_responses(tmp_path / "responses", sim.matrix)
    assert cli.main(["irt", "fit", str(tmp_path / "responses"), "--out", str(tmp_path / "irt"), "--steps", "5"]) == 0
    err = capsys.readouterr().err
    assert "mergeflow: WARNING: 3 of 120 scores in column 'correct' are NaN: those items count as not answered" in err
    assert "1 of 117 scores in column 'correct' are fractional: all are binarized at the mean-preserving threshold" in err


def test_missing_fit_flags_are_named(tmp_path, capsys):
    from mergeflow import cli

    sim = simulate_irt(6, 20, seed=3)
    write_responses(tmp_path / "responses", sim.matrix)
    assert cli.main(["anchors", str(tmp_path / "responses"), "--strategy", "irt", "--n", "4",
                     "--out", str(tmp_path / "a.parquet")]) == 2
    assert "`mergeflow anchors --strategy irt` needs --irt DIR" in capsys.readouterr().err
    assert cli.main(["anchors", str(tmp_path / "responses"), "--strategy", "random", "--n", "4",
                     "--out", str(tmp_path / "a.parquet")]) == 0
    candidate = str(tmp_path / "responses" / f"{sim.matrix.models[0]}.parquet")
    assert cli.main(["estimate", candidate, "--anchors", str(tmp_path / "a.parquet"), "--method", "mean", "gpirt",
                     "--out", str(tmp_path / "e.json")]) == 2
    assert "`mergeflow estimate --method gpirt` needs --irt DIR" in capsys.readouterr().err
