"""A merge writes its directory whole or not at all, never over a model it reads or an earlier
result (unless ``--force``), and names a source file it cannot read."""

import hashlib
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from factories import make_zoo
from mergeflow import cli
from mergeflow.errors import MergeflowError, SourceFileError
from mergeflow.merge import merge_to_dir, recipe_from_dict


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("zoo"), num_layers=2)


def recipe_data(zoo, *models: str) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": zoo["base"],
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models or (zoo["math"], zoo["lang"])]}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def digest(directory: Path) -> dict[str, str]:
    """Every file of a directory tree and its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_non_empty_output_is_refused_and_force_replaces_it_whole(zoo, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_data(zoo))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an older model")
    assert cli.main(["merge", str(recipe), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output directory {str(out)!r} is not empty" in err and "--force" in err
    assert (out / "model.safetensors").read_bytes() == b"an older model"
    assert cli.main(["merge", str(recipe), str(out), "--force"]) == 0
    assert not (out / "model.safetensors").exists()  # replaced whole: no stale weights beside the new shards
    assert (out / "model.safetensors.index.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("which", ["base", "math"])
def test_a_source_models_directory_is_always_refused(zoo, tmp_path, capsys, which):
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_data(zoo))
    before = digest(Path(zoo[which]))
    for extra in ([], ["--force"]):
        assert cli.main(["merge", str(recipe), zoo[which], *extra]) == 2
        assert f"is the source model {zoo[which]!r}" in capsys.readouterr().err
    # nor a directory that holds one (--force would delete it)
    assert cli.main(["merge", str(recipe), str(Path(zoo[which]).parent), "--force"]) == 2
    assert "holds the source model" in capsys.readouterr().err
    assert digest(Path(zoo[which])) == before


def test_a_failed_merge_leaves_the_earlier_merge_untouched(zoo, tmp_path):
    out = tmp_path / "out"
    merge_to_dir(recipe_from_dict(recipe_data(zoo)), out)
    before = digest(out)
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for file in Path(zoo["lang"]).iterdir():
        (poisoned / file.name).write_bytes(file.read_bytes())
    tensors = load_file(poisoned / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeflowError, match="contains NaN or Inf"):
        merge_to_dir(recipe_from_dict(recipe_data(zoo, zoo["math"], str(poisoned))), out, force=True)
    assert digest(out) == before and leftovers(tmp_path) == []


def test_a_truncated_source_is_named_with_its_model_and_nothing_is_written(zoo, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for file in Path(zoo["lang"]).iterdir():
        data = file.read_bytes()
        (truncated / file.name).write_bytes(data[: len(data) // 2] if file.name == "model.safetensors" else data)
    with pytest.raises(SourceFileError, match=rf"model '.*truncated': weight file '.*model\.safetensors' is truncated"):
        merge_to_dir(recipe_from_dict(recipe_data(zoo, zoo["math"], str(truncated))), tmp_path / "out")
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_data(zoo, zoo["math"], str(truncated)))
    assert cli.main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # a file cut inside its header
    (truncated / "model.safetensors").write_bytes((Path(zoo["lang"]) / "model.safetensors").read_bytes()[:100])
    with pytest.raises(SourceFileError, match="is not a readable safetensors file"):
        merge_to_dir(recipe_from_dict(recipe_data(zoo, zoo["math"], str(truncated))), tmp_path / "out")



def test_a_killed_merges_stage_is_removed_by_the_next_merge(zoo, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    abandoned = tmp_path / f".out.partial-{socket.gethostname()}-{int(dead.stdout)}-0123abcd"
    other_host = tmp_path / f".out.partial-elsewhere-{int(dead.stdout)}-0123abcd"
    for stage in (abandoned, other_host):
        stage.mkdir()
        (stage / "model-00001-of-00001.safetensors").write_bytes(b"half a model")
    merge_to_dir(recipe_from_dict(recipe_data(zoo)), out)
    assert not abandoned.exists() and other_host.exists()  # another host's writer may still be alive
    assert (out / "model.safetensors.index.json").is_file()


def test_a_full_disk_is_named_with_the_output_and_the_bytes(zoo, tmp_path, monkeypatch):
    """Too little space is refused before any tensor is merged; a disk that fills during the write
    is named the same way, and the earlier result stays."""
    import errno
    import shutil
    from collections import namedtuple

    from mergeflow.errors import OutputError
    from mergeflow.outputs import staged_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "merged"
    with pytest.raises(OutputError, match=rf"no space left on the device for '{out}': it needs [\d,]+ bytes and "
                                          r"1,000 bytes were free"):
        merge_to_dir(recipe_from_dict(recipe_data(zoo)), out)
    assert not out.exists() and leftovers(tmp_path) == []

    monkeypatch.undo()
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "earlier").write_text("an earlier result")
    with pytest.raises(OutputError, match=rf"no space left on the device for '{out}': \d[\d,]* bytes were free"):
        with staged_dir(out, force=True) as stage:
            (stage / "part").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "weights" / "earlier").read_text() == "an earlier result" and leftovers(tmp_path) == []
