"""The check stage: fail fast, naming the culprit, before any model is evaluated or merged.

Every model must load its config and tokenizer, hold its weights as safetensors (never pickles),
share architecture, tensor names and shapes with the base, and share the base's vocabulary (a
recipe with a ``tokenizer_source`` merges models whose vocabularies differ: ``mergeflow merge``).
Every task's splits must load with the columns the evaluator needs. Reading only safetensors
headers keeps the check cheap even for large models.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.locations import local_model_dir
from mergeflow.merge.params import layer_index, with_layer_index
from mergeflow.merge.plan import check_finite
from mergeflow.merge.sources import ModelSource
from mergeflow.merge.vocab import RECIPE_HINT, is_vocabulary_tensor, vocabulary_difference
from mergeflow.weights import INDEX_FILE, file_problem, weight_files

# What the pipeline's check stage says of a model whose vocabulary is not the base's.
PIPELINE_VOCABULARY_HINT = ("set the config's tokenizer_source (union, base or a model) to merge models whose "
                            "vocabularies differ")
# Config fields that must agree for two models to be merged tensor by tensor.
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "vocab_size")


def read_config(name: str, location: str | Path) -> dict:
    """A model's ``config.json`` as written, for comparing architectures without importing
    transformers (seconds of a merge's start); ``num_key_value_heads`` absent is
    ``num_attention_heads``, as transformers reads it."""
    path = Path(location) / "config.json"
    if problem := file_problem(path):
        raise MergeflowError(f"model {name!r}: {problem}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeflowError(f"model {name!r}: cannot read its config {str(path)!r}: {err}") from err
    if not isinstance(config, dict):
        raise MergeflowError(f"model {name!r}: its config {str(path)!r} is not a JSON object")
    if "num_key_value_heads" not in config and "num_attention_heads" in config:
        config["num_key_value_heads"] = config["num_attention_heads"]
    return config


def read_vocabulary(name: str, location: str | Path, trust_remote_code: bool = False) -> dict[str, int]:
    """A model's vocabulary (token -> id, added tokens included): from its ``tokenizer.json``
    with the tokenizers library, else from the tokenizer transformers builds."""
    path = Path(location) / "tokenizer.json"
    if path.is_file() and not trust_remote_code:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
        except Exception as err:  # the library's own parse errors; the model is named
            raise MergeflowError(f"model {name!r}: cannot read its tokenizer {str(path)!r}: {err}") from err
    from mergeflow.evaluate import load_tokenizer  # heavy: transformers

    return load_tokenizer(location, trust_remote_code, name).get_vocab()


def _load_config(name: str, location: str, trust_remote_code: bool):
    from transformers import AutoConfig  # heavy: not at parse time, where the workflow reads weights_fingerprint

    if problem := file_problem(Path(location) / "config.json"):
        raise MergeflowError(f"model {name!r}: {problem}")
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise MergeflowError(f"model {name!r}: cannot load its config from {location!r}: {err}") from err


def resolve_model_dir(name: str, spec: dict) -> Path:
    """A model's local directory (a hub model's is the one the fetch stage wrote); it must exist."""
    path = local_model_dir(spec)
    if not path.is_dir():
        raise MergeflowError(f"model {name!r}: directory {str(path)!r} does not exist")
    return path


@dataclass(frozen=True)
class BaseReference:
    """What every model is checked against: the base's config, tensor shapes and vocabulary."""

    name: str
    config: dict
    shapes: dict[str, tuple[int, ...]]
    vocab: dict[str, int]

    @classmethod
    def load(cls, models: dict[str, dict], base: str) -> "BaseReference":
        base_dir = resolve_model_dir(base, models[base])
        trust = models[base].get("trust_remote_code", False)
        return cls(base, read_config(base, base_dir), ModelSource(base_dir, base).shapes,
                   read_vocabulary(base, base_dir, trust))


def compare_to_base(name: str, model_dir: Path, ref: BaseReference, trust_remote_code: bool = False,
                    same_depth: bool = True, vocabularies_may_differ: bool = False,
                    vocabulary_hint: str = PIPELINE_VOCABULARY_HINT) -> tuple[ModelSource, dict, dict[str, int]]:
    """Refuse a model that cannot be merged with the base tensor by tensor: a config field of
    :data:`ARCH_FIELDS` that differs, another vocabulary (its first differing token named, then
    ``vocabulary_hint``), a tensor missing, extra or of another shape. With ``same_depth`` False
    (layer paths and slices, which take layers by index) the depth may differ, and the tensors are
    compared by name with the layer index left out. With ``vocabularies_may_differ`` (a recipe
    with a ``tokenizer_source``) the vocabulary may differ, and with it ``vocab_size`` and the
    vocabulary tensors' rows (:func:`mergeflow.merge.vocab.is_vocabulary_tensor`). Returns the
    model's source, config and vocabulary."""
    base = ref.name
    cfg = read_config(name, model_dir)
    for field in ARCH_FIELDS:
        if (field == "num_hidden_layers" and not same_depth) or field == "vocab_size":
            continue
        if cfg.get(field) != ref.config.get(field):
            raise MergeflowError(f"model {name!r}: config field {field!r} is {cfg.get(field)!r} but the base "
                                 f"{base!r} has {ref.config.get(field)!r}")
    vocab = read_vocabulary(name, model_dir, trust_remote_code)
    difference = vocabulary_difference(vocab, ref.vocab, f"the base {base!r}")
    if difference and not vocabularies_may_differ:
        raise MergeflowError(f"model {name!r}: {difference}; {vocabulary_hint}")
    if not vocabularies_may_differ and cfg.get("vocab_size") != ref.config.get("vocab_size"):
        raise MergeflowError(f"model {name!r}: config field 'vocab_size' is {cfg.get('vocab_size')!r} but the base "
                             f"{base!r} has {ref.config.get('vocab_size')!r}")
    source = ModelSource(model_dir, name)  # the weights as the merge reads them, its errors naming the model
    shapes, base_shapes = (source.shapes, ref.shapes) if same_depth else (_by_role(source.shapes),
                                                                          _by_role(ref.shapes))
    for key, shape in base_shapes.items():
        if key not in shapes:
            raise MergeflowError(f"model {name!r}: tensor {key!r} of the base {base!r} is missing")
        rows_may_differ = vocabularies_may_differ and is_vocabulary_tensor(key)
        if shapes[key][rows_may_differ:] != shape[rows_may_differ:]:
            raise MergeflowError(f"model {name!r}: tensor {key!r} has shape {list(shapes[key])} but the base "
                                 f"{base!r} has {list(shape)}" + (" (rows may differ)" if rows_may_differ else ""))
    extra = sorted(set(shapes) - set(base_shapes))
    if extra:
        raise MergeflowError(f"model {name!r}: tensor {extra[0]!r} is not in the base {base!r}")
    return source, cfg, vocab


def _by_role(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by name with the layer index as 0: what every layer of a depth must match."""
    return {name if layer_index(name) is None else with_layer_index(name, 0): shape for name, shape in shapes.items()}


def check_model(name: str, spec: dict, ref: BaseReference, vocabularies_may_differ: bool = False) -> dict:
    """One model against the base (:func:`compare_to_base`; ``vocabularies_may_differ``: the
    config's merges reconcile them, its ``tokenizer_source``), then every tensor finite; returns
    its summary with the fingerprint of its weights (:func:`weights_fingerprint`)."""
    from mergeflow.evaluate import load_tokenizer  # heavy: transformers

    model_dir = resolve_model_dir(name, spec)
    trust = spec.get("trust_remote_code", False)
    source, cfg, vocab = compare_to_base(name, model_dir, ref, trust, vocabularies_may_differ=vocabularies_may_differ)
    # the evaluation loads both through transformers: so must the check
    _load_config(name, str(model_dir), trust)
    load_tokenizer(model_dir, trust, name)
    for tensor in source.tensors:  # one tensor in memory at a time
        check_finite(source.read(tensor), tensor, name)
    n_params = sum(info.numel for info in source.tensors.values())
    return {"location": str(model_dir), "model_type": cfg.get("model_type"), "tensors": len(source.shapes),
            "parameters": n_params, "vocab_size": len(vocab), "fingerprint": weights_fingerprint(name, model_dir)}


def check_merge_sources(paths: list[str], base: str, same_depth: bool = True, vocabularies_may_differ: bool = False,
                        vocabulary_hint: str = RECIPE_HINT) -> None:
    """What the check stage checks of a pipeline's models, for the models of one recipe (``mergeflow
    merge``): every model against ``base`` (:func:`compare_to_base`), before any tensor is merged.
    Models are named by their paths. Finiteness is the merge's own check, tensor by tensor.
    ``vocabularies_may_differ``: the recipe reconciles them (its ``tokenizer_source``); else a
    differing one is refused with ``vocabulary_hint``."""
    ref = BaseReference.load({base: {"path": base}}, base)
    for path in paths:
        if path != base:
            compare_to_base(path, Path(path), ref, same_depth=same_depth,
                            vocabularies_may_differ=vocabularies_may_differ, vocabulary_hint=vocabulary_hint)


def check_models(models: dict[str, dict], base: str) -> dict:
    """Check every model against the base; returns a summary per model."""
    ref = BaseReference.load(models, base)
    return {name: check_model(name, spec, ref) for name, spec in models.items()}


def run_check(models: dict[str, dict], base: str, out: Path) -> dict:
    """Check every model against the base, then write one report of them all."""
    report = {"base_model": base, "models": check_models(models, base)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def run_model_check(name: str, models: dict[str, dict], base: str, out: str | Path,
                    tokenizer_source: str | None = None) -> dict:
    """The check stage, per model: check ``name`` against the base and write its report
    (``check/{name}/{digest}.json``), which every job that reads the model depends on. Written only
    when the check passes, and atomically."""
    ref = BaseReference.load(models, base)
    report = {"model": name, "base_model": base,
              **check_model(name, models[name], ref, vocabularies_may_differ=tokenizer_source is not None)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # whole or not at all: a report is only ever a pass
    partial.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out)
    return report


# What the fingerprint reads of each weight file besides its safetensors header: this many
# evenly spaced blocks of this many bytes (and the last block), so a replaced file is noticed
# without reading a 7B model at parse time.
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 1 << 16


def _fingerprinted_files(name: str, model_dir: Path) -> list[Path]:
    """The weight files :func:`weights_fingerprint` reads, in the order it has always read them:
    sorted by name and, without an index, every ``*.safetensors``, a stray one beside
    ``model.safetensors`` included. Not just the files the merge reads: another set or order would
    change every model's digest, and so rerun every pipeline's checks."""
    files = weight_files(model_dir, f"model {name!r}")
    return sorted(files if (model_dir / INDEX_FILE).is_file() else model_dir.glob("*.safetensors"))


def weights_fingerprint(name: str, model_dir: str | Path) -> str:
    """A hash of a model's weights that changes when they are replaced: each safetensors file's
    name, size and header, sampled blocks of its data, and ``config.json``. Cheap enough to
    compute before any job (the workflow makes it a parameter of the model's check)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config_file = model_dir / "config.json"
    digest.update(config_file.read_bytes() if config_file.is_file() else b"")
    for file in _fingerprinted_files(name, model_dir):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            head = handle.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            digest.update(handle.read(min(length, size)))
            start = 8 + length
            span = max(size - start, 0)
            offsets = {start + span * k // FINGERPRINT_BLOCKS for k in range(FINGERPRINT_BLOCKS)}
            offsets.add(max(start, size - FINGERPRINT_BLOCK_BYTES))
            for offset in sorted(offsets):
                handle.seek(offset)
                digest.update(handle.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()
