import sys
from pathlib import Path

# Import the library from this checkout (worktrees included), not from site-packages.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A trained tiny zoo (base, math and lang experts, task files), built once per session."""
    import torch

    from factories import build_tiny_zoo

    torch.set_num_threads(1)
    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"))
