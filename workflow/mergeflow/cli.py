"""The ``mergeflow`` command line: one sub-command per library entry point.

Each command module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed namespace). Only the module of the command given is imported
(all of them for ``mergeflow --help``), so ``mergeflow merge`` starts without the IRT stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mergeflow.errors import MergeflowError

# The module registering each sub-command; each has ``register(subparsers)``.
COMMAND_MODULES = {
    "merge": "mergeflow.commands.merge",
    "irt": "mergeflow.commands.irt",
    "anchors": "mergeflow.commands.irt",
    "estimate": "mergeflow.commands.irt",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``command``'s module alone, or of every command (None, or unknown: then
    argparse names the choices)."""
    parser = argparse.ArgumentParser(prog="mergeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(modules):
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
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
