"""Layer paths in memory, for the search: a candidate is a module list over resident layers.

``PathAssembler`` loads each source model once; ``merge(path)`` points one shell model (the
base's config) at a new list of :class:`ScaledHop` modules, each a reference to a resident layer
and its scale, and at the embeddings of the path's first hop's model and the final norm and LM
head of its last hop's (as the export, and mergekit, take them): no tensor is copied, so
assembling a candidate costs microseconds. A layer that occurs twice is one module called twice; each hop sets the
attention's ``layer_idx`` to its own position before it runs, so with a KV cache (generation)
every hop writes its own cache slot and the shell's config says how many slots there are.

:func:`reference_logits` is the path's definition written out as a loop (embeddings, scale,
layer, ..., norm, head), what the tests hold both the assembled and the exported model to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeflow.dtypes import torch_dtype
from mergeflow.errors import MergeflowError
from mergeflow.merge.path import LayerPath, check_sources
from mergeflow.merge.sources import ModelSource


class ScaledHop(torch.nn.Module):
    """A resident decoder layer run on ``scale`` times its input, as hop ``index`` of a path."""

    def __init__(self, layer: torch.nn.Module, scale: float, index: int):
        super().__init__()
        self.layer = layer
        self.scale = float(scale)
        self.index = index

    def leaf(self) -> torch.Tensor:
        """The scale as a fresh leaf tensor, which a backward pass through the hop reaches (the
        hop then multiplies by it even at 1): a gradient in the path's scales."""
        self.scale = torch.tensor(float(self.scale), requires_grad=True)
        return self.scale

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        attention = getattr(self.layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = self.index  # this hop's KV-cache slot
        if torch.is_tensor(self.scale) or self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


def _load(path: str, device: torch.device, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM  # heavy import, only where a path is assembled

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None, use_safetensors=True)
    # no weight is trained: a backward pass through a path (its scales' gradient) reaches none of them
    return model.to(device).eval().requires_grad_(False)


def _decoder(model):
    """The module holding ``layers``, ``norm`` and ``embed_tokens`` (``model.model`` for Llama-likes)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise MergeflowError(f"{type(model).__name__} has no model.layers: layer paths need a Llama-style decoder")
    return inner


class PathAssembler:
    """Resident source models and one shell that each ``merge(path)`` re-points.

    ``paths``: the models (the first is the shell's: the base of every path it assembles);
    ``dtype``: the dtype the models are held in (default each one's own)."""

    def __init__(self, paths: Sequence[str], device: str = "cpu", dtype: str | None = None):
        self.paths = list(dict.fromkeys(str(p) for p in paths))
        if not self.paths:
            raise MergeflowError("PathAssembler needs at least one model")
        self.device = torch.device(device)
        self.sources = {path: ModelSource(path) for path in self.paths}
        target = torch_dtype(dtype, "dtype") if dtype else None
        self.models = {path: _load(path, self.device, target) for path in self.paths}
        self.layers = {path: list(_decoder(model).layers) for path, model in self.models.items()}
        self.template = self.paths[0]
        self.model = self.models[self.template]
        self._types = getattr(self.model.config, "layer_types", None)
        self._layer_types = {path: getattr(m.config, "layer_types", None) for path, m in self.models.items()}
        # each model's weights outside the blocks, kept apart from the shell, whose own are re-pointed
        self.outer = {path: (_decoder(m).embed_tokens, _decoder(m).norm, m.lm_head) for path, m in self.models.items()}
        self.tied = bool(getattr(self.model.config, "tie_word_embeddings", False))

    def merge(self, path: LayerPath):
        """The shell model running ``path`` (valid until the next ``merge``)."""
        if path.base_model != self.template:
            raise MergeflowError(f"layer path's base {path.base_model!r} is not the resident shell {self.template!r}")
        missing = [m for m in path.model_paths() if m not in self.models]
        if missing:
            raise MergeflowError(f"layer path reads model {missing[0]!r}, which is not resident")
        check_sources(path, {m: self.sources[m] for m in path.model_paths()})
        hops = [ScaledHop(self.layers[hop.model][hop.layer], hop.scale, k) for k, hop in enumerate(path.hops)]
        decoder, first, last = _decoder(self.model), path.hops[0].model, path.hops[-1].model
        decoder.layers = torch.nn.ModuleList(hops)
        decoder.embed_tokens, decoder.norm = self.outer[first][0], self.outer[last][1]
        self.model.lm_head = self.outer[first if self.tied else last][2]  # a tied head is the embeddings
        self.model.config.num_hidden_layers = len(hops)
        if self._types is not None:
            self.model.config.layer_types = [self._layer_types[h.model][h.layer] for h in path.hops]
        return self.model

    def nonfinite_tensors(self) -> list[str]:
        """Source weights are read as they are; a path adds no tensor that could hold NaN."""
        return []


def reference_logits(path: LayerPath, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of ``path`` by its definition: the first hop's model's embeddings, then per hop the
    state times the hop's scale through the hop's source layer (causal attention, no padding),
    then the last hop's model's final norm and LM head (a tied head: the first's embeddings).
    Loads the sources afresh (a test oracle, not for the search)."""
    models = {m: _load(m, torch.device("cpu"), dtype) for m in path.model_paths()}
    base = _decoder(models[path.base_model])
    first, last = models[path.hops[0].model], models[path.hops[-1].model]
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    with torch.inference_mode():
        hidden = _decoder(first).embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1])[None, :]
        rotary = base.rotary_emb(hidden, position_ids=positions)
        mask = torch.full((input_ids.shape[1],) * 2, float("-inf"), dtype=hidden.dtype).triu(1)[None, None]
        for hop in path.hops:
            layer = _decoder(models[hop.model]).layers[hop.layer]
            hidden = layer(hidden * hop.scale, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return (first if tied else last).lm_head(_decoder(last).norm(hidden))
