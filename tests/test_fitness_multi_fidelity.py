"""The ``multi_fidelity`` fitness kind (successive halving inside a generation, Su & Geiping): rungs
of nested items, promotions, answers reused from lower rungs, brackets, and its checks."""

import copy

import pandas as pd
import pytest

from mergeflow.config import validate_config
from mergeflow.errors import MergeflowError
from mergeflow.evolve import history as hist
from mergeflow.evolve.stages import EvolveConfig, FitnessJob, ask, fitness, promote, tell


def test_multi_fidelity_promotes_the_best_and_scores_only_unseen_items(stages, tmp_path):
    """Rungs of 8 anchors, 20 and all 40 items at η = 2: 4, 2 and 1 candidates per rung."""
    config, _, files, _ = stages
    cfg = EvolveConfig.from_config(config, "multi")
    task_files = {"math_l2": files}
    gen = tmp_path / "gen_0"
    ask(cfg, 0, None, None, str(gen / "candidates.parquet"), str(gen / "asked.pkl"))
    shards, earlier = [], ()
    for rung in range(3):
        out = gen / f"rung_{rung}"
        job = FitnessJob(0, rung, 0, str(gen / "candidates.parquet"),
                         str(gen / f"rung_{rung - 1}" / "promoted.parquet") if rung else None, earlier,
                         str(out / "fitness_0.parquet"), str(out / "responses_0.parquet"))
        rows = fitness(cfg, config["tasks"], config["evaluation"], task_files, job)
        assert len(rows) == [4, 2, 1][rung] and set(rows["items"]) == {[8, 12, 20][rung]}  # only unseen items
        answers = pd.read_parquet(out / "responses_0.parquet")
        assert answers.groupby("recipe_hash").size().eq([8, 20, 40][rung]).all()
        if rung < 2:
            kept = promote(cfg, 0, rung, [str(out / "fitness_0.parquet")], str(out / "promoted.parquet"))
            best = rows.sort_values(["fitness", "index"], ascending=[False, True])["index"].head(len(kept))
            assert kept["index"].tolist() == best.tolist()
        shards.append(str(out / "fitness_0.parquet"))
        earlier = earlier + (str(out / "responses_0.parquet"),)
    top = pd.read_parquet(gen / "rung_2" / "responses_0.parquet")
    assert rows["fitness"].iloc[0] == top["correct"].mean() and rows["sd"].iloc[0] > 0  # the whole split: exact
    history = tell(cfg, 0, str(gen / "asked.pkl"), str(gen / "candidates.parquet"), shards, None,
                   str(gen / "optimizer.pkl"), str(gen / "history.parquet"), str(gen / "best" / "recipe.yaml"))
    assert sorted(history["rung"]) == [0, 0, 1, 2] and sorted(history["items"]) == [8, 8, 20, 40]
    assert hist.best_row(history, cfg.result)["rung"] == 2  # the best is chosen among the most exact fitnesses


def test_a_bracket_starts_every_candidate_of_its_generation_at_its_rung(stages, tmp_path):
    """Brackets [1, 0]: generation 0 puts all 4 candidates on rung 1 (20 items, none seen before)
    and promotes 2 of them to the whole split, as a generation starting at rung 0 does from there."""
    config = copy.deepcopy(stages[0])
    config["runs"]["multi"]["evolve"]["fitness"]["brackets"] = [1, 0]
    cfg = EvolveConfig.from_config(validate_config(config), "multi")
    kind = cfg.kind
    assert [list(kind.climbed(cfg.fitness, g)) for g in range(3)] == [[1, 2], [0, 1, 2], [1, 2]]
    gen = tmp_path / "gen_0"
    ask(cfg, 0, None, None, str(gen / "candidates.parquet"), str(gen / "asked.pkl"))
    shards, earlier = [], ()
    for rung in (1, 2):
        out = gen / f"rung_{rung}"
        job = FitnessJob(0, rung, 0, str(gen / "candidates.parquet"),
                         str(gen / "rung_1" / "promoted.parquet") if rung == 2 else None, earlier,
                         str(out / "fitness_0.parquet"), str(out / "responses_0.parquet"))
        rows = fitness(cfg, config["tasks"], config["evaluation"], {"math_l2": stages[2]}, job)
        assert len(rows) == {1: 4, 2: 2}[rung] and set(rows["items"]) == {20}
        if rung == 1:
            assert len(promote(cfg, 0, 1, [job.out], str(out / "promoted.parquet"))) == 2
        shards.append(job.out)
        earlier += (job.out_responses,)
    history = tell(cfg, 0, str(gen / "asked.pkl"), str(gen / "candidates.parquet"), shards, None,
                   str(gen / "optimizer.pkl"), str(gen / "history.parquet"), str(gen / "best" / "recipe.yaml"))
    assert sorted(history["rung"]) == [1, 1, 2, 2] and sorted(history["items"]) == [20, 20, 40, 40]


@pytest.mark.parametrize("change, message", [
    ({"rungs": [20, 8]}, r"fitness\.rungs \[20, 8\]: each rung must have more items"),
    ({"rungs": [8, 60]}, r"the top rung has 60 items, more than task 'math_l2'\'s search split \(40"),
    ({"eta": 1.5}, r"fitness\.eta: 1\.5 is less than the minimum of 2"),
    ({"rungs": [4, 8, 16, 40]}, r"population 4 is too small for 4 rungs at eta 2: .* at least 5"),
    ({"brackets": [0, 3]}, r"fitness\.brackets \[0, 3\]: a bracket starts at rung 3, but the rungs are 0 to 2"),
    ({"brackets": []}, r"fitness\.brackets: \[\] should be non-empty"),
])
def test_bad_multi_fidelity_settings_are_named(stages, change, message):
    config = copy.deepcopy(stages[0])
    config["runs"]["multi"]["evolve"]["fitness"].update(change)
    with pytest.raises(MergeflowError, match=message):
        validate_config(config)
