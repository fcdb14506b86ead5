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


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The micro workflow (``test_workflow.micro_config``) run to the end, once per session: the
    workflow tests read it, and the data-flow tests start from a copy of it."""
    from test_workflow import micro_config, snakemake

    workdir = tmp_path_factory.mktemp("run")
    config = micro_config()
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config
