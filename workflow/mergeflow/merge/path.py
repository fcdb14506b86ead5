"""Layer paths (data-flow-space merges): a model made of a sequence of source layers, each
entered by a scaled hidden state, and its export as a plain Hugging Face model.

A path is a list of *hops* ``(model, layer, scale)``: hop k runs layer ``layer`` of ``model``
on the hidden state left by hop k - 1 multiplied by ``scale`` (hop 0 reads the embeddings). The
weights outside the blocks follow mergekit's ``passthrough``, so that one recipe makes one model
in both tools: the embeddings come from the first hop's model, the final norm and the LM head
from the last hop's (a tied head is the embeddings); the ``base_model`` supplies the config and
the tokenizer. (A DFS path starts and ends in its base, model A, which then supplies all of it.)
Sakana's DFS (W_ij scales the state going from layer i into layer j) and Su & Geiping's DIS (a
scale on a position's output is the next hop's input scale) are both this.

**The fold.** In a pre-norm RMSNorm block (Llama, Mistral, Qwen) the residual stream is read
only through RMSNorm, and RMSNorm(c·h) = RMSNorm(h) for c > 0 (up to eps, below). Let S_k be the
product of the scales of hops 0..k and z_k = y_k / S_k the stream of the path divided by S_k.
The input of hop k is s_k·y_{k-1} = S_k·z_{k-1}, so its attention adds A(RMSNorm(z_{k-1})) to
S_k·z_{k-1}: z grows by A(...)/S_k, which is the same block with ``o_proj`` (the last linear map
of attention) multiplied by 1/S_k; likewise the MLP with ``down_proj`` multiplied by 1/S_k. The
final norm removes the overall factor S_K, and z_{-1} is the embeddings, which stay as they are.
So a path folds into a plain model: hop k's layer copied with ``o_proj`` and ``down_proj`` (and
their biases) times 1/S_k, and no custom code.

*Caveat (eps).* RMSNorm(c·h) = h·w / sqrt(mean(h²) + eps/c²): the folded model equals the
path exactly only with each norm's eps divided by S_k². With mean(h²) far above eps (it is for
trained models: eps is 1e-5 or 1e-6) the difference is below float32 rounding; for hidden states
near zero, or extreme scales, it is not. A non-positive scale cannot be folded (RMSNorm flips
sign with the state, and the MLP's activation is not odd), so such paths are refused.

**The recipe** is a mergekit ``passthrough`` slices recipe: consecutive hops of one model with
the same folded factor make one slice, and a slice's factor 1/S_k is mergekit's per-tensor
``scale`` on ``o_proj`` and ``down_proj`` — so ``mergekit-yaml`` rebuilds the same weights. The
hop scales are read back as ratios of consecutive slices' factors. What mergekit does not read:
``base_model``, which names the config and tokenizer mergeflow writes.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from mergeflow.dtypes import DTYPES, dtype_name, torch_dtype
from mergeflow.errors import MergeflowError
from mergeflow.merge.params import layer_index, with_layer_index
from mergeflow.merge.recipe import recipe_hash
from mergeflow.merge.sources import ModelSource
from mergeflow.outputs import check_output_dir, staged_dir

PASSTHROUGH = "passthrough"
# The weights outside the blocks that come before them (mergekit's "pre weights"): from the first
# hop's model; every other one (the final norm, the LM head) from the last hop's.
PRE_WEIGHTS = ("embed_tokens",)
# The last linear map of each residual branch: what a scale on the branch's input folds into.
FOLD_TARGETS = ("self_attn.o_proj.", "mlp.down_proj.")
# Architectures whose blocks are pre-norm RMSNorm with those names (the fold is exact up to eps).
FOLDABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
PATH_RECIPE_FILE = "mergeflow_recipe.yaml"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"]
_SCALE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Hop:
    """Layer ``layer`` of ``model`` (a path), run on the incoming hidden state times ``scale``."""

    model: str
    layer: int
    scale: float = 1.0


@dataclass
class LayerPath:
    """A data-flow merge: hops in order, and the model that supplies everything else."""

    hops: list[Hop]
    base_model: str
    dtype: str | None = None
    seed: int = 0
    merge_method: str = field(default=PASSTHROUGH, init=False)

    def __post_init__(self) -> None:
        if not self.hops:
            raise MergeflowError("a layer path needs at least one hop")
        for k, hop in enumerate(self.hops):
            if not math.isfinite(hop.scale):
                raise MergeflowError(f"layer path hop {k} ({hop.model} layer {hop.layer}): scale {hop.scale} "
                                     "is not finite")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MergeflowError(f"layer path: dtype {self.dtype!r} is not one of {list(DTYPES)}")

    def __len__(self) -> int:
        return len(self.hops)

    def outer_model(self, tensor: str) -> str:
        """The model a tensor outside the blocks comes from: the embeddings from the first hop's,
        the final norm and LM head from the last hop's (as mergekit's passthrough)."""
        return self.hops[0].model if any(p in tensor for p in PRE_WEIGHTS) else self.hops[-1].model

    def model_paths(self) -> list[str]:
        """The base, then every hop's model, in first-mention order."""
        return list(dict.fromkeys([self.base_model, *(hop.model for hop in self.hops)]))

    def cumulative_scales(self) -> list[float]:
        """S_k: the product of the scales of hops 0..k (what hop k's branch outputs are divided by)."""
        out, total = [], 1.0
        for hop in self.hops:
            total *= hop.scale
            out.append(total)
        return out

    def folded_factors(self) -> list[float]:
        """1/S_k per hop: the factor on ``o_proj`` and ``down_proj``; refuses non-positive scales."""
        for k, hop in enumerate(self.hops):
            if hop.scale <= 0:
                raise MergeflowError(
                    f"layer path hop {k} ({hop.model} layer {hop.layer}): scale {hop.scale} is not positive, so it "
                    "cannot be folded into the weights of a plain model (RMSNorm(c*h) = RMSNorm(h) holds only for "
                    "c > 0); use a positive scale range")
        return [1.0 / s for s in self.cumulative_scales()]

    def describe(self) -> list[str]:
        """One line per hop: ``k: MODEL layer L x SCALE`` (the path as the model card lists it)."""
        return [f"{k}: {Path(hop.model).name} layer {hop.layer}" + (f" x {hop.scale:.4g}" if hop.scale != 1 else "")
                for k, hop in enumerate(self.hops)]

    # ---- the mergekit passthrough recipe

    def to_dict(self) -> dict[str, Any]:
        factors = self.folded_factors()
        slices: list[dict[str, Any]] = []
        last: tuple | None = None
        for hop, factor in zip(self.hops, factors):
            source = slices[-1]["sources"][0] if slices else None
            if (last is not None and source["model"] == hop.model and source["layer_range"][1] == hop.layer
                    and hop.scale == 1.0 and last[1] == factor):
                source["layer_range"][1] += 1
            else:
                source = {"model": hop.model, "layer_range": [hop.layer, hop.layer + 1]}
                if factor != 1.0:
                    source["parameters"] = {"scale": [{"filter": target.rstrip("."), "value": factor}
                                                      for target in FOLD_TARGETS] + [{"value": 1.0}]}
                slices.append({"sources": [source]})
            last = (hop.model, factor)
        data: dict[str, Any] = {"merge_method": PASSTHROUGH, "base_model": self.base_model, "slices": slices}
        if self.dtype:
            data["dtype"] = self.dtype
        return data  # no seed: nothing in a path is random, so one path has one hash

    def to_yaml(self) -> str:
        """The recipe, opened by a comment listing the hops with their scales (for a reader)."""
        header = "".join(f"# hop {line}\n" for line in self.describe())
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def is_path_recipe(data: Any) -> bool:
    return isinstance(data, dict) and data.get("merge_method") == PASSTHROUGH


def _slice_factor(parameters: dict, where: str) -> float:
    """The folded factor of a slice: its ``scale`` on o_proj and down_proj (1 elsewhere)."""
    scale = (parameters or {}).get("scale", 1.0)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if float(scale) != 1.0:
            raise MergeflowError(f"{where}: a scale on every tensor of a layer is not a layer path (it scales the "
                                 "norms too); scale o_proj and down_proj only")
        return 1.0
    values: dict[str, float] = {}
    if not isinstance(scale, list):
        raise MergeflowError(f"{where}: 'scale' must be a number or a filter list")
    for entry in scale:
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)):
            raise MergeflowError(f"{where}: each 'scale' entry needs a numeric 'value'")
        values[str(entry.get("filter", "*"))] = float(entry["value"])
    targets = [values.get(target.rstrip("."), values.get("*", 1.0)) for target in FOLD_TARGETS]
    if values.get("*", 1.0) != 1.0 or abs(targets[0] - targets[1]) > _SCALE_TOLERANCE * abs(targets[0]):
        raise MergeflowError(f"{where}: a layer path scales o_proj and down_proj by one factor and nothing else "
                             f"(got {values})")
    if targets[0] <= 0:
        raise MergeflowError(f"{where}: scale {targets[0]} is not positive")
    return targets[0]


def path_from_dict(data: dict, where: str = "recipe") -> LayerPath:
    """A ``passthrough`` slices recipe as a layer path (each slice one source)."""
    allowed = {"merge_method", "base_model", "slices", "dtype", "out_dtype", "seed", "tokenizer_source"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise MergeflowError(f"unsupported key {unknown[0]!r} in {where} (a passthrough recipe)")
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise MergeflowError(f"{where}: a passthrough recipe needs a non-empty 'slices' list")
    hops: list[Hop] = []
    previous = 1.0
    for i, spec in enumerate(slices):
        sources = spec.get("sources") if isinstance(spec, dict) else None
        if not isinstance(sources, list) or len(sources) != 1:
            raise MergeflowError(f"{where} slices[{i}]: a passthrough slice has exactly one source")
        source = sources[0]
        model, layer_range = source.get("model"), source.get("layer_range")
        if not isinstance(model, str) or not model:
            raise MergeflowError(f"{where} slices[{i}] needs 'model': a model path")
        if (not isinstance(layer_range, list) or len(layer_range) != 2 or not all(isinstance(v, int) for v in layer_range)
                or not 0 <= layer_range[0] < layer_range[1]):
            raise MergeflowError(f"{where} slices[{i}]: 'layer_range' must be [start, end] with 0 <= start < end")
        factor = _slice_factor(source.get("parameters") or {}, f"{where} slices[{i}]")
        for n, layer in enumerate(range(*layer_range)):
            hops.append(Hop(model, layer, previous / factor if n == 0 else 1.0))
        previous = factor
    base = data.get("base_model") or hops[0].model
    seed = data.get("seed", 0)
    return LayerPath(hops, str(base), data.get("dtype"), int(seed) if isinstance(seed, int) else 0)


# ---- checks against the source models

# The exported model runs every hop with the base's attention shapes and rotary position encoding.
_CHAINED_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                 "rope_parameters")


def chain_mismatch(name: str, config: dict, base: str, base_config: dict) -> str | None:
    """Why model ``name``'s layers cannot run inside a path on ``base`` (None: they can): a
    different hidden size, attention shape or rotary encoding, or fewer positions than the base
    declares (the exported model would run its layers past the positions they were trained on)."""
    for key in _CHAINED_KEYS:
        if config.get(key) != base_config.get(key):
            return f"model {name!r} has {key} {config.get(key)}, model {base!r} {base_config.get(key)}"
    mine, theirs = config.get("max_position_embeddings"), base_config.get("max_position_embeddings")
    if mine is not None and theirs is not None and mine < theirs:
        return (f"model {name!r} has max_position_embeddings {mine}, fewer than model {base!r}'s {theirs}, which "
                "the path's model declares")
    return None


def check_sources(path: LayerPath, sources: dict[str, ModelSource]) -> None:
    """Every hop's layer exists, every model's layers chain with the base's (hidden size,
    attention, positions), and the scales fold for this architecture; errors name the model
    (before any tensor is read)."""
    base = sources[path.base_model]
    for name, source in sources.items():
        why = chain_mismatch(name, source.config, path.base_model, base.config)
        if why:
            raise MergeflowError(f"{why}: their layers cannot be chained in one layer path")
    for k, hop in enumerate(path.hops):
        layers = sources[hop.model].num_layers
        if not 0 <= hop.layer < layers:
            raise MergeflowError(f"layer path hop {k}: model {hop.model!r} has {layers} layers, no layer {hop.layer}")
    if any(hop.scale != 1.0 for hop in path.hops):
        for name in path.model_paths():
            kind = sources[name].config.get("model_type")
            if kind not in FOLDABLE_MODEL_TYPES:
                raise MergeflowError(f"model {name!r} is a {kind!r} model; scales fold only into pre-norm RMSNorm "
                                     f"blocks ({sorted(FOLDABLE_MODEL_TYPES)})")
    path.folded_factors()


def _is_fold_target(tensor: str) -> bool:
    return any(target in tensor for target in FOLD_TARGETS)


def path_config(path: LayerPath, sources: dict[str, ModelSource], out_dtype: torch.dtype) -> dict:
    """The base's config with one layer per hop (per-layer lists such as ``layer_types`` follow the hops)."""
    config = json.loads(json.dumps(sources[path.base_model].config))
    config["num_hidden_layers"] = len(path.hops)
    for key in ("layer_types",):
        if isinstance(config.get(key), list):
            config[key] = [sources[hop.model].config[key][hop.layer] for hop in path.hops]
    config["torch_dtype"] = config["dtype"] = dtype_name(out_dtype)
    return config


def path_tensors(path: LayerPath, sources: dict[str, ModelSource], out_dtype: torch.dtype):
    """``(name, tensor)`` of the exported model, one at a time: the tensors outside the blocks (the
    base's names, each read from its :meth:`LayerPath.outer_model`), then each hop's layer renamed
    to its position with the fold applied (in float32)."""
    for name in sources[path.base_model].tensors:
        if layer_index(name) is None:
            yield name, sources[path.outer_model(name)].read(name).to(out_dtype)
    for k, (hop, factor) in enumerate(zip(path.hops, path.folded_factors())):
        source = sources[hop.model]
        for name in source.tensors:
            if layer_index(name) != hop.layer:
                continue
            tensor = source.read(name)
            if factor != 1.0 and _is_fold_target(name):
                tensor = tensor.to(torch.float32) * factor
            yield with_layer_index(name, k), tensor.to(out_dtype)


def path_card(path: LayerPath, lineage: list[str] | None = None) -> str:
    """The README of an exported path: its hops, and the recipe that rebuilds it."""
    hops = "\n".join(f"| {k} | `{hop.model}` | {hop.layer} | {hop.scale:.6g} |" for k, hop in enumerate(path.hops))
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- mergeflow\n---\n"
        f"# Merged model\n\nA data-flow merge made with mergeflow: {len(path.hops)} layers, taken from the source "
        f"models in the order below, on the embeddings of `{path.hops[0].model}` and the final norm and LM head of "
        f"`{path.hops[-1].model}`, with the config and tokenizer of `{path.base_model}`. Each hop's "
        "input scale is folded into its `o_proj` and `down_proj` weights, so this is a plain model that loads "
        "without custom code.\n\n## Layer path\n\n| hop | model | layer | input scale |\n|---|---|---|---|\n"
        f"{hops}\n\n## Recipe\n\nThe `passthrough` recipe below (also in `{PATH_RECIPE_FILE}`) rebuilds these "
        "weights with `mergeflow merge` or `mergekit-yaml`.\n\n"
        f"```yaml\n{path.to_yaml()}```\n"
        + ("" if lineage is None else
           "\n".join(["", "## Lineage", "", f"- recipe hash: `{recipe_hash(path)}`", *lineage]) + "\n")
    )


def export_path(path: LayerPath, out_dir: str | Path, dtype: str | None = None, force: bool = False,
                lineage: list[str] | None = None, max_shard_size: int = 2 * 1024**3) -> Path:
    """Write a layer path as a standard HF model directory (whole or not at all): the base's
    architecture with ``num_hidden_layers`` = the path's length, duplicated layers copied, the
    scales folded into the weights; plus the base's tokenizer, a card and the recipe."""
    protected = path.model_paths()
    check_output_dir(out_dir, force=force, protected=protected)
    sources = {name: ModelSource(name) for name in path.model_paths()}
    check_sources(path, sources)
    first = next(iter(sources[path.base_model].tensors.values())).dtype
    out_dtype = torch_dtype(dtype or path.dtype, "dtype") if (dtype or path.dtype) else first
    with staged_dir(out_dir, force=force, protected=protected) as out:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size, weight_map, total = 0, {}, 0
        names: list[list[str]] = [[]]
        for name, tensor in path_tensors(path, sources, out_dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > max_shard_size:
                _flush(shards, names, out, save_file)
                size = 0
            shards[-1][name] = tensor.contiguous()
            names[-1].append(name)
            size += nbytes
            total += nbytes
        _flush(shards, names, out, save_file, last=True)
        count = len(names)
        for number, shard_names in enumerate(names, start=1):
            file = f"model-{number:05d}-of-{count:05d}.safetensors"
            (out / f"shard-{number}.tmp").rename(out / file)
            weight_map.update({n: file for n in shard_names})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (out / "config.json").write_text(json.dumps(path_config(path, sources, out_dtype), indent=2))
        base_dir = Path(path.base_model)
        for file in [*TOKENIZER_FILES, "generation_config.json"]:
            if (base_dir / file).is_file():
                shutil.copyfile(base_dir / file, out / file)
        (out / "README.md").write_text(path_card(path, lineage))
        (out / PATH_RECIPE_FILE).write_text(path.to_yaml())
    return Path(out_dir)


def _flush(shards: list, names: list, out: Path, save_file, last: bool = False) -> None:
    """Write the open shard (as a temporary name: the count of shards is known only at the end)."""
    save_file(shards[-1], str(out / f"shard-{len(names)}.tmp"), metadata={"format": "pt"})
    shards[-1] = {}
    if not last:
        shards.append({})
        names.append([])
