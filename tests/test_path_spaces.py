"""The ``dfs`` and ``dis`` search spaces decode genomes into the paths the papers describe
(hand-checked small cases), and bad configs stop with the key named."""

from __future__ import annotations

import numpy as np
import pytest

from mergeflow.schema import validate_section
from mergeflow.errors import MergeflowError
from mergeflow.merge.path import Hop, LayerPath
from mergeflow.spaces import DfsSpace, DisSpace, ModelConfigs, check_space
from mergeflow.spaces.parameter import Range


def dfs(repeats=2, max_layers=None) -> DfsSpace:
    # A: 3 layers, B: 2 layers -> M = 5 (A0 A1 A2 B0 B1), T = 10 slots
    return DfsSpace("A", "B", 3, 2, repeats, max_layers, Range(0.5, 1.5))


def dfs_genome(space: DfsSpace, on: list[int], w: dict[tuple[int, int], float] | None = None) -> np.ndarray:
    x = np.full(space.dim, 0.2)
    x[on] = 0.9
    x[space.slots:] = space.scale.encode(1.0)
    for (i, j), value in (w or {}).items():
        x[space.slots + i * space.layers + j] = space.scale.encode(value)
    return x


def hops(path: LayerPath) -> list[tuple[str, int, float]]:
    return [(h.model, h.layer, round(h.scale, 6)) for h in path.hops]


def test_dfs_layout_and_initial_genome_is_model_a():
    space = dfs()
    assert (space.layers, space.slots, space.dim) == (5, 10, 10 + 25)
    path = space.to_recipe(np.asarray(space.initial_genome(None)))
    assert hops(path) == [("A", 0, 1.0), ("A", 1, 1.0), ("A", 2, 1.0)]
    assert path.base_model == "A"


def test_dfs_path_is_the_included_slots_in_order_with_w_between_layers():
    space = dfs()
    # slots: rep 0 = A0 A1 A2 B0 B1 (0-4), rep 1 = A0 A1 A2 B0 B1 (5-9)
    # on: A0, A1, B0 (rep 0), then A1, A2 (rep 1): going back to A1 means the next repetition
    x = dfs_genome(space, [0, 1, 3, 6, 7], {(1, 3): 0.8, (3, 1): 1.2, (1, 2): 0.6})
    assert hops(space.to_recipe(x)) == [("A", 0, 1.0), ("A", 1, 1.0), ("B", 0, 0.8), ("A", 1, 1.2), ("A", 2, 0.6)]


def test_dfs_forces_a_first_and_last_layer():
    space = dfs()
    # only B1 (rep 0) and B0 (rep 1) on: A0 is put before, A2 after; W applies to the forced hops too
    x = dfs_genome(space, [4, 8], {(0, 4): 1.4, (3, 2): 0.7})
    assert hops(space.to_recipe(x)) == [("A", 0, 1.0), ("B", 1, 1.4), ("B", 0, 1.0), ("A", 2, 0.7)]
    # nothing on: A's first and last layer
    assert hops(space.to_recipe(dfs_genome(space, []))) == [("A", 0, 1.0), ("A", 2, 1.0)]
    # A0 on in the second repetition only: no second A0 is added
    assert hops(space.to_recipe(dfs_genome(space, [5, 7])))[:2] == [("A", 0, 1.0), ("A", 2, 1.0)]


def test_dfs_depth_limit_and_layer_used_at_most_r_times():
    space = dfs(repeats=2, max_layers=4)
    everything = space.to_recipe(dfs_genome(space, list(range(10))))
    # every slot, twice A0 A1 A2 B0 B1, then A2 because a path ends with A's last layer
    assert [(h.model, h.layer) for h in everything.hops] == [("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1)] * 2 + [("A", 2)]
    assert space.problem(everything) == "path of 11 layers is deeper than max_layers 4"
    assert space.problem(space.to_recipe(np.asarray(space.initial_genome(None)))) is None


def test_dfs_from_recipe_inverts_to_recipe():
    space = dfs()
    x = dfs_genome(space, [0, 1, 3, 6, 7], {(1, 3): 0.8, (3, 1): 1.2, (1, 2): 0.6})
    path = space.to_recipe(x)
    assert hops(space.to_recipe(space.from_recipe(path))) == hops(path)
    with pytest.raises(MergeflowError, match="no slot left"):
        space.from_recipe(LayerPath([Hop("A", 0), Hop("A", 0), Hop("A", 0)], "A"))


def dis(models=("M1", "M2"), max_layers=None) -> DisSpace:
    return DisSpace("BASE", list(models), 3, max_layers, Range(0.1, 2.0))


def dis_genome(space: DisSpace, positions: list[tuple[float, tuple[int, ...], list[int]]]) -> np.ndarray:
    """Per position: (scale, ordering, included model indices)."""
    orderings = space.orderings
    x = []
    for scale, order, included in positions:
        x += [space.scale.encode(scale), (orderings.index(order) + 0.5) / len(orderings)]
        x += [0.9 if k in included else 0.1 for k in range(len(space.models))]
    return np.asarray(x)


def test_dis_stacks_in_order_falls_back_when_empty_and_scales_the_next_input():
    space = dis()
    assert space.dim == 3 * (2 + 2)
    x = dis_genome(space, [(0.5, (1, 0), [0, 1]),   # position 0: M2 then M1, output x0.5
                           (1.5, (0, 1), []),       # position 1: empty -> BASE layer 1, output x1.5
                           (0.8, (0, 1), [1])])     # position 2: M2 only; its output scale meets the final norm
    assert hops(space.to_recipe(x)) == [("M2", 0, 1.0), ("M1", 0, 1.0), ("BASE", 1, 0.5), ("M2", 2, 1.5)]
    assert hops(space.to_recipe(space.from_recipe(space.to_recipe(x)))) == hops(space.to_recipe(x))


def test_dis_initial_genome_is_the_base_or_the_sources():
    space = dis()
    assert hops(space.to_recipe(np.asarray(space.initial_genome(None)))) == [("BASE", i, 1.0) for i in range(3)]
    both = space.to_recipe(np.asarray(space.initial_genome({"M1": 1.0, "M2": 0.5})))
    assert hops(both) == [(m, i, 1.0) for i in range(3) for m in ("M1", "M2")]


def test_dis_orderings_are_all_permutations_and_depth_limit():
    space = dis(models=("M1", "M2", "M3"), max_layers=5)
    assert len(space.orderings) == 6 and space.orderings[3] == (1, 2, 0)
    x = dis_genome(space, [(1.0, (1, 2, 0), [0, 1, 2])] * 3)
    path = space.to_recipe(x)
    assert [h.model for h in path.hops[:3]] == ["M2", "M3", "M1"] and len(path) == 9
    assert space.problem(path) == "path of 9 layers is deeper than max_layers 5"


@pytest.mark.parametrize("cfg, message", [
    ({"kind": "dfs", "a": "math", "b": "lang", "repeats": 0}, "repeats"),
    ({"kind": "dfs", "a": "math", "b": "lang", "scale": {"min": 0.0, "max": 2.0}}, r"scale\.min: 0\.0 is not positive"),
    ({"kind": "dfs", "a": "math", "b": "math"}, "a and b are both"),
    ({"kind": "dfs", "a": "math"}, "'b' is a required property"),
    ({"kind": "dis", "scale": {"min": -1.0, "max": 2.0}}, r"scale\.min: -1\.0 is not positive"),
])
def test_bad_space_configs_name_the_key(cfg, message):
    with pytest.raises(MergeflowError, match=message) as err:
        check_space(cfg, "runs.dfs.evolve.search_space", ModelConfigs())
    assert "runs.dfs.evolve.search_space" in str(err.value)


def test_defaults_come_from_the_schema():
    filled = validate_section({"kind": "dfs", "a": "x", "b": "y"}, "search_space", "s")
    assert filled["repeats"] == 3 and filled["scale"] == {"min": 0.5, "max": 1.5}
    assert validate_section({"kind": "dis"}, "search_space", "s")["scale"] == {"min": 0.1, "max": 2.0}
