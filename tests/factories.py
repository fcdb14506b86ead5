"""The one factory of test models: untrained tiny Llamas from the zoo's own constructor and
tokenizer (``mergeflow.zoo.build``), the trained tiny zoo the ``tiny_zoo`` fixture builds, and
noise-perturbed copies of a real model standing in for its experts."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergeflow.outputs import save_model
from mergeflow.zoo.build import build_base, build_expert, build_tokenizer, new_model, write_task_sources

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


def build_tiny_zoo(root: Path) -> Path:
    """The trained tiny zoo (base, math and lang experts with checkpoints, task files) under ``root``."""
    build_base(TINY_ZOO, root / "base")
    for name in TINY_ZOO["experts"]:
        build_expert(TINY_ZOO, name, root / "base", root / name, root / "checkpoints" / name)
    write_task_sources(TINY_ZOO, root / "tasks")
    return root


def make_model(out_dir: Path, seed: int, num_layers: int = 2, base: Path | None = None, noise: float = 0.02,
               hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2) -> Path:
    """An untrained tiny Llama (grouped-query attention) with the zoo's tokenizer; with ``base``,
    the base's weights plus small noise (a "fine-tune")."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    model = new_model(tokenizer, hidden, intermediate, num_layers, heads, 64, seed, num_key_value_heads=kv_heads)
    if base is not None:
        base_model = LlamaForCausalLM.from_pretrained(base)
        torch.manual_seed(seed)
        with torch.no_grad():
            for param, base_param in zip(model.parameters(), base_model.parameters()):
                param.copy_(base_param + noise * torch.randn_like(base_param))
    save_model(model, tokenizer, out_dir)
    return out_dir


def make_zoo(root: Path, num_layers: int = 2) -> dict[str, str]:
    """An untrained base and two "fine-tunes" of it."""
    base = make_model(root / "base", 0, num_layers)
    math = make_model(root / "math", 1, num_layers, base=base)
    lang = make_model(root / "lang", 2, num_layers, base=base)
    return {"base": str(base), "math": str(math), "lang": str(lang)}


def perturbed(base: Path, out: Path, seed: int, noise: float = 0.02) -> str:
    """A copy of ``base`` whose every tensor moved by ``noise`` times its own sd: a stand-in expert."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "converted.json"))
    generator = torch.Generator().manual_seed(seed)
    weights = {name: tensor + noise * tensor.float().std() * torch.randn(tensor.shape, generator=generator)
               for file in base.glob("*.safetensors") for name, tensor in load_file(file).items()}
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return str(out)


def with_added_tokens(model_dir: Path, out_dir: Path, tokens: list[str], seed: int, special: bool = False) -> str:
    """A copy of a model with ``tokens`` added to its tokenizer (as added tokens; ``special`` ones
    if asked) and their rows of the embeddings and LM head drawn at random, distinct per model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    old = len(tokenizer)
    tokenizer.add_tokens(tokens, special_tokens=special)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
            embedding.weight[old:] = torch.randn(len(tokenizer) - old, embedding.weight.shape[1], generator=generator)
    save_model(model, tokenizer, out_dir)
    return str(out_dir)
