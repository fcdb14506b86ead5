"""Sub-commands ``mergeflow irt fit``, ``mergeflow anchors`` and ``mergeflow estimate``.

Each works on plain parquet files, outside Snakemake as well as inside its rules.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.irt import ESTIMATORS, KINDS, LAMBDA_RULES, SCORE_MODES, STRATEGIES
from mergeflow.irt.fit import load_irt
from mergeflow.irt.responses import load_response_matrix
from mergeflow.schema import section_defaults


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse then names the flag at fault)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_irt(subparsers)
    _register_anchors(subparsers)
    _register_estimate(subparsers)


def _register_irt(subparsers) -> None:
    defaults = section_defaults("irt")  # the workflow's `irt` section: same defaults
    irt = subparsers.add_parser("irt", help="Item Response Theory models")
    irt_sub = irt.add_subparsers(dest="irt_command", required=True)
    fit = irt_sub.add_parser("fit", help="fit an IRT model to response parquet files by SVI")
    fit.add_argument("responses", nargs="+", help="response parquet files or directories of them")
    fit.add_argument("--out", required=True, help="directory for items.parquet, posterior.safetensors, fit.json")
    fit.add_argument("--kind", default=defaults["kind"], choices=KINDS)
    fit.add_argument("--dim", type=positive_int, default=defaults["dim"])
    fit.add_argument("--steps", type=positive_int, default=defaults["steps"])
    fit.add_argument("--lr", type=float, default=defaults["lr"])
    fit.add_argument("--batch-size", type=positive_int, default=None, help="items per mini-batch (default: full batch)")
    fit.add_argument("--device", default=defaults["device"])
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--holdout-fraction", type=fraction, default=0.05)
    fit.add_argument("--scores", default="threshold", choices=SCORE_MODES,
                     help="what to do with non-binary scores")
    fit.set_defaults(func=run_fit)


def _register_anchors(subparsers) -> None:
    anchors = subparsers.add_parser("anchors", help="select anchor items (MERGE³ Extract)")
    anchors.add_argument("responses", nargs="*", help="calibration response parquet files or directories")
    anchors.add_argument("--irt", help="IRT fit directory (needed by --strategy irt)")
    anchors.add_argument("--strategy", required=True, choices=STRATEGIES)
    anchors.add_argument("--n", type=positive_int, required=True, help="number of anchors")
    anchors.add_argument("--seed", type=int, default=0)
    anchors.add_argument("--out", required=True, help="anchors parquet to write")
    anchors.set_defaults(func=run_anchors)


def _register_estimate(subparsers) -> None:
    estimate = subparsers.add_parser("estimate", help="estimate full-split accuracy from anchor responses")
    estimate.add_argument("responses", nargs="+",
                          help="response parquet of the models to estimate (per-model or long format)")
    estimate.add_argument("--anchors", required=True, help="anchors parquet")
    estimate.add_argument("--irt", help="IRT fit directory (all methods but 'mean')")
    estimate.add_argument("--method", nargs="+", default=["gpirt"],
                          choices=ESTIMATORS)
    estimate.add_argument("--endpoints", nargs="*", default=None,
                          help="endpoint model names in the IRT fit (mp-IRT, gmp-IRT)")
    estimate.add_argument("--calibration", nargs="*", default=None,
                          help="calibration response files for gp-IRT's λ")
    estimate.add_argument("--lambda-rule", default="variance", choices=LAMBDA_RULES,
                          help="how gp-IRT / gmp-IRT set λ from the calibration responses")
    estimate.add_argument("--seed", type=int, default=0)
    estimate.add_argument("--out", required=True, help="parquet or .json file for the estimates")
    estimate.set_defaults(func=run_estimate)


def run_fit(args: argparse.Namespace) -> None:
    from mergeflow.irt.model import fit_irt  # Pyro and torch: only for the command that fits

    matrix = load_response_matrix(args.responses, scores=args.scores)
    fit = fit_irt(matrix, kind=args.kind, dim=args.dim, steps=args.steps, lr=args.lr,
                  batch_size=args.batch_size, device=args.device, seed=args.seed,
                  holdout_fraction=args.holdout_fraction)
    fit.save(args.out)
    print(f"fitted {args.kind} on {len(matrix.models)} models × {len(matrix.items)} items "
          f"in {fit.info['steps']} steps (converged: {fit.info['converged']}); wrote {args.out}")


def run_anchors(args: argparse.Namespace) -> None:
    from mergeflow.irt.anchors import select_anchors  # scikit-learn: only for the commands that cluster

    if args.strategy == "irt" and not args.irt:
        raise MergeflowError("`mergeflow anchors --strategy irt` needs --irt DIR, an IRT fit (from `mergeflow irt fit`)")
    matrix = load_response_matrix(args.responses) if args.responses else None
    fit = load_irt(args.irt) if args.irt else None
    anchors = select_anchors(matrix, fit, strategy=args.strategy, n=args.n, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    anchors.to_parquet(args.out, index=False)
    print(f"wrote {len(anchors)} {args.strategy} anchors to {args.out}")


def run_estimate(args: argparse.Namespace) -> None:
    # scikit-learn and SciPy (through the anchors' module): only for the command that estimates
    from mergeflow.irt.anchors import read_anchors
    from mergeflow.irt.estimators import Estimator

    needs_fit = [m for m in args.method if m != "mean"]
    if needs_fit and not args.irt:
        raise MergeflowError(f"`mergeflow estimate --method {' '.join(needs_fit)}` needs --irt DIR, an IRT fit (from "
                             "`mergeflow irt fit`); only --method mean works without one")
    anchors = read_anchors(args.anchors)
    fit = load_irt(args.irt) if args.irt else None
    calibration = load_response_matrix(args.calibration) if args.calibration else None
    targets = load_response_matrix(args.responses)
    rows = []
    for method in args.method:
        estimator = Estimator(method, anchors, fit, endpoint_thetas=args.endpoints,
                              calibration=calibration, seed=args.seed,
                              lambda_rule=args.lambda_rule)
        for model in targets.models:
            responses = targets.row(model).dropna()
            estimate = estimator(responses)
            rows.append({"model": model, "method": method, "estimate": estimate.value,
                         "sd": estimate.sd, "lam": estimate.lam, "n_anchors": len(anchors)})
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(rows, indent=1))
    elif out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        raise MergeflowError(f"--out {out}: use a .parquet or .json file")
    print(frame.to_string(index=False))
