"""The fetch stage: a hub model as a local model directory, so that every other stage reads a
directory whatever the model's origin."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import snapshot_download

from mergeflow.errors import MergeflowError
from mergeflow.outputs import staged_dir

# the files a model directory needs; *.py for models that bring their own code (trust_remote_code)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.py"]


def fetch_hub_model(hub: str, revision: str | None, out: str | Path) -> Path:
    """Download a hub model's config, tokenizer and safetensors weights into the Hugging Face cache
    (or find them there: offline, a cached snapshot is enough), and make ``out`` a model directory
    of links to that snapshot, with ``fetched.json`` naming the commit."""
    try:
        snapshot = Path(snapshot_download(hub, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:
        raise MergeflowError(f"hub model {hub!r} (revision {revision or 'main'!r}): cannot fetch it: {err}") from err
    with staged_dir(out) as stage:
        for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
            link = stage / file.relative_to(snapshot)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.resolve())
        (stage / "fetched.json").write_text(json.dumps(
            {"hub": hub, "revision": revision, "commit": snapshot.name, "snapshot": str(snapshot)}, indent=1) + "\n")
    return Path(out)
