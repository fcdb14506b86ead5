"""The ``mergeflow`` command line: one sub-command per library entry point.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed namespace). Modules are imported lazily so that
``mergeflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mergeflow.errors import MergeflowError

# Modules that register sub-commands; each has ``register(subparsers)``.
COMMAND_MODULES = [
    "mergeflow.commands.merge",
    "mergeflow.commands.irt",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the library's warnings (an absurd recipe weight, ...) reach the user as the errors do
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("mergeflow: %(levelname)s: %(message)s"))
    logger = logging.getLogger("mergeflow")
    logger.addHandler(warnings)
    try:
        args.func(args)
    except MergeflowError as err:
        print(f"mergeflow: error: {err}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(warnings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
