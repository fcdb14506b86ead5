"""Tiny Llama models and a word-level tokenizer for the merge tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "ran", "to", "a", "big", "red", "ball"]


def save_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>", pad_token="</s>")
    wrapped.save_pretrained(out_dir)


def tiny_config(num_layers: int = 2, vocab_size: int = 32, hidden: int = 64, intermediate: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def make_model(out_dir: Path, seed: int, num_layers: int = 2, base: Path | None = None,
               noise: float = 0.02, tokenizer: bool = False, **config_overrides) -> Path:
    """A random tiny Llama; with ``base``, the base's weights plus small noise (a "fine-tune")."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(num_layers, **config_overrides)
    model = LlamaForCausalLM(config)
    if base is not None:
        base_model = LlamaForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for (name, param), (_, base_param) in zip(model.named_parameters(), base_model.named_parameters()):
                param.copy_(base_param + noise * torch.randn_like(base_param))
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer:
        save_tokenizer(out_dir)
    return out_dir


def make_zoo(root: Path, num_layers: int = 2) -> dict[str, str]:
    """base (with tokenizer) and two fine-tunes of it."""
    base = make_model(root / "base", 0, num_layers, tokenizer=True)
    math = make_model(root / "math", 1, num_layers, base=base)
    lang = make_model(root / "lang", 2, num_layers, base=base)
    return {"base": str(base), "math": str(math), "lang": str(lang)}
