"""``mergeflow merge RECIPE.yaml OUT_DIR``: run a merge recipe into an HF model directory."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ["float32", "float16", "bfloat16"]


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
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="dtype of the written weights (default: the recipe's, else the base's)")
    parser.add_argument("--max-shard-size", type=int, default=None,
                        help="maximum bytes per safetensors shard (default: 2 GiB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    # Imported here so that `mergeflow --help` does not load torch.
    from mergeflow.merge.recipe import load_recipe
    from mergeflow.merge.stream import DEFAULT_MAX_SHARD_SIZE, merge_to_dir

    recipe = load_recipe(args.recipe)
    out = merge_to_dir(recipe, args.out_dir, device=args.device, dtype=args.dtype,
                       max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    print(f"merged {len(recipe.model_paths())} models into {out}")
