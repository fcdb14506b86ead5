import sys
from pathlib import Path

# Import the library from this checkout (worktrees included), not from site-packages.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

import pytest  # noqa: E402

# A small zoo, trained just long enough for the experts to beat the base at home.
TINY_ZOO = {
    "seed": 0,
    "model": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2, "max_positions": 64},
    "base": {"corpus": "pretrain", "steps": 150, "batch_size": 32, "lr": 0.003},
    "experts": {
        "math": {"corpus": "math_l1", "steps": 300, "batch_size": 32, "lr": 0.003},
        "lang": {"corpus": "lang_l2", "steps": 120, "batch_size": 32, "lr": 0.003},
    },
    "checkpoint_every": 60,
    "tasks": ["math_l1", "math_l2", "read_l2"],
    "task_items": 400,
}


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A trained tiny zoo (base, math and lang experts, task files), built once per session."""
    import torch

    from mergeflow.zoo.build import build_base, build_expert, write_task_sources

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("zoo")
    build_base(TINY_ZOO, root / "base")
    for name in TINY_ZOO["experts"]:
        build_expert(TINY_ZOO, name, root / "base", root / name, root / "checkpoints" / name)
    write_task_sources(TINY_ZOO, root / "tasks")
    return root
