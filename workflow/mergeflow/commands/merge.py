"""``mergeflow merge RECIPE.yaml OUT_DIR``: run a merge recipe into an HF model directory.

The directory appears whole once the merge is complete; a non-empty one is refused unless
``--force`` (which replaces it whole), a source model's always."""

from __future__ import annotations

import argparse
import ctypes

from mergeflow.dtypes import DTYPES

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# A layer path (a passthrough recipe) takes whole layers: its models share one vocabulary.
PATH_VOCABULARY_HINT = "a layer path's models must share the base's vocabulary"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge models with a (mergekit-compatible) recipe",
        description="Merge models tensor by tensor with a mergekit-style YAML recipe and write "
        "an HF model directory (sharded safetensors, config, tokenizer, model card, recipe).",
    )
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("out_dir", help="output model directory")
    parser.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the written weights (default: the recipe's, else the base's)")
    parser.add_argument("--max-shard-size", type=int, default=None,
                        help="maximum bytes per safetensors shard (default: 2 GiB)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty output directory whole (never a source model's)")
    parser.set_defaults(func=run)


def return_freed_memory_to_os() -> None:
    """Make glibc serve allocations above 1 MiB with their own mappings, so a freed tensor
    goes back to the OS at once instead of staying in a heap that only grows (glibc otherwise
    raises this threshold up to 32 MiB as tensors are freed). Keeps the streaming merge's
    peak memory at a few tensors. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> None:
    return_freed_memory_to_os()
    # Imported here so that `mergeflow --help` does not load torch.
    from mergeflow.check import check_merge_sources
    from mergeflow.merge.candidates import load_candidate, materialise
    from mergeflow.merge.recipe import Recipe
    from mergeflow.merge.stream import DEFAULT_MAX_SHARD_SIZE
    from mergeflow.merge.vocab import RECIPE_HINT

    recipe = load_candidate(args.recipe)
    # what the pipeline's check stage checks, before any tensor is merged: a recipe with slices or
    # a layer path takes layers by index, so its models may differ in depth; a recipe with a
    # tokenizer_source reconciles vocabularies, so its models' may differ
    is_recipe = isinstance(recipe, Recipe)
    check_merge_sources(recipe.model_paths(), getattr(recipe, "base_model", None) or recipe.model_paths()[0],
                        same_depth=is_recipe and not recipe.slices,
                        vocabularies_may_differ=is_recipe and bool(recipe.tokenizer_source),
                        vocabulary_hint=RECIPE_HINT if is_recipe else PATH_VOCABULARY_HINT)
    out = materialise(recipe, args.out_dir, device=args.device, dtype=args.dtype, force=args.force,
                      max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    print(f"merged {len(recipe.model_paths())} models into {out}")
