"""Bench of the accuracy estimators and of the IRT fit time.

    PYTHONPATH=workflow python bench/estimators.py                 # simulated + chembench + timing
    PYTHONPATH=workflow python bench/estimators.py --zoo results --task math_l2    # after `snakemake`
    PYTHONPATH=workflow python bench/estimators.py --responses DIR --heldout 0.2 --endpoints A B

Prints, for every anchor strategy × estimator × number of anchors, the mean absolute error (in
accuracy points) of the estimated full-split accuracy of held-out models, over ``--seeds``
seeds of the anchor selection:

1. simulated merges: three endpoint models with 2-d abilities, calibration and held-out models
   whose abilities are random convex combinations of the endpoints' (plus noise); a 1-d 2PL is
   fitted to the calibration models, so the estimators face a misspecified model as on real data;
2. ``--zoo RESULTS --task T``: the pipeline's own IRT fit and calibration responses of task T
   (from a finished run of ``--config``), against merges the fit never saw, scored here on the
   search split: ``--zoo-merges`` fresh random merges from the calibration's search space (a
   seed stream disjoint from the calibration's), and the candidates of each ``--zoo-runs`` search
   (re-merged from the recipes in its history), which is where a search needs its estimates;
   with, as references for what the anchors can tell at all, ridge read-outs of the anchor
   responses fitted on the held-out models' own accuracies (leave-one-out) or on the
   calibration models;
   ``--responses DIR``: any per-model response parquet files, split into calibration and
   ``--heldout`` models;
3. ChemBench (22 real LLMs × 2,854 items): leave-one-model-out, IRT refitted without the held-out
   model each time, against plain random anchors of the same size (``random`` × ``mean``);
4. the time to fit a 2PL on a simulated 400 × 30,000 matrix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.irt import ESTIMATORS as ALL_METHODS
from mergeflow.irt import STRATEGIES
from mergeflow.irt.anchors import select_anchors
from mergeflow.irt.estimators import Estimator
from mergeflow.irt.fit import load_irt, map_ability
from mergeflow.irt.model import fit_irt
from mergeflow.irt.responses import ResponseMatrix, load_response_matrix
from mergeflow.irt.simulate import simulate_irt

CHEMBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chembench" / "responses.parquet"


def main() -> None:
    args = parse_args()
    results: dict[str, pd.DataFrame] = {}
    if not args.skip_simulated:
        results["simulated merges"] = bench_simulated(args)
    if args.zoo:
        results.update(bench_zoo(args))
    if args.responses:
        results["held-out models"] = bench_responses(args)
    if not args.skip_chembench:
        results["chembench leave-one-model-out"] = bench_chembench(args)
    if not args.skip_timing:
        bench_timing(args)
    if args.out:
        payload = {name: frame.to_dict(orient="records") for name, frame in results.items()}
        Path(args.out).write_text(json.dumps(payload, indent=1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--kind", default="2pl", choices=["1pl", "2pl", "m2pl"])
    parser.add_argument("--dim", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--zoo", help="results directory of a finished run of --config")
    parser.add_argument("--config", default="config/config.yaml", help="the config that made --zoo")
    parser.add_argument("--task", default="math_l2", help="the --zoo task")
    parser.add_argument("--zoo-merges", type=int, default=50, help="fresh random merges held out")
    parser.add_argument("--zoo-runs", nargs="*", default=["full"],
                        help="runs whose search candidates are held out")
    parser.add_argument("--responses", help="directory of per-model response parquet files")
    parser.add_argument("--heldout", default="0.2",
                        help="fraction of models held out, or comma-separated model names")
    parser.add_argument("--endpoints", nargs="*", default=[],
                        help="endpoint models (in the calibration set) for mp-IRT / gmp-IRT")
    parser.add_argument("--chembench", default=str(CHEMBENCH))
    parser.add_argument("--skip-simulated", action="store_true")
    parser.add_argument("--skip-chembench", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--timing-shape", type=int, nargs=2, default=[400, 30000])
    parser.add_argument("--sim-items", type=int, default=5000)
    parser.add_argument("--lambda-rule", default="variance", choices=["variance", "fitted"],
                        help="how gp-IRT / gmp-IRT set λ from the calibration models")
    parser.add_argument("--cache", help="directory to keep IRT fits in and reuse them from")
    parser.add_argument("--out", help="write all error rows as JSON here")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------
# evaluation core
# --------------------------------------------------------------------------------------------


def fit_or_load(matrix: ResponseMatrix, name: str, args):
    """Fit (or, with --cache, reuse) the IRT model for one calibration set."""
    directory = Path(args.cache) / f"{name}-{args.kind}{args.dim}-{args.steps}" if args.cache else None
    if directory is not None and (directory / "fit.json").exists():
        return load_irt(directory)
    fit = fit_irt(matrix, kind=args.kind, dim=args.dim, steps=args.steps, seed=0)
    if directory is not None:
        fit.save(directory)
    return fit


def evaluate(train: ResponseMatrix, heldout: ResponseMatrix, fit, methods, sizes, seeds,
             endpoints=None, lambda_rule: str = "variance") -> pd.DataFrame:
    """Errors of every (strategy, method, size, seed) on every held-out model."""
    rows = []
    truth = heldout.accuracy()
    responses = [heldout.row(model) for model in heldout.models]
    for seed in range(seeds):
        for strategy in STRATEGIES:
            for size in sizes:
                anchors = select_anchors(train, fit, strategy=strategy, n=size, seed=seed)
                for method in methods:
                    estimator = Estimator(method, anchors, fit, endpoint_thetas=endpoints,
                                          calibration=train, seed=seed, lambda_rule=lambda_rule)
                    for model, y, true in zip(heldout.models, responses, truth):
                        estimate = estimator(y)
                        rows.append({"strategy": strategy, "method": method, "n": size,
                                     "seed": seed, "model": model, "error": estimate.value - true,
                                     "sd": estimate.sd, "truth": true})
    return pd.DataFrame(rows)


def print_table(title: str, errors: pd.DataFrame, n_items: int) -> None:
    """MAE in accuracy points per strategy × method (rows) and anchors (columns)."""
    errors = errors.assign(abs_error=100 * errors["error"].abs())
    # MAE over held-out models, then mean ± sd over seeds
    per_seed = errors.groupby(["strategy", "method", "n", "seed"])["abs_error"].mean()
    summary = per_seed.groupby(["strategy", "method", "n"]).agg(["mean", "std"])
    cells = summary.apply(lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}", axis=1).unstack("n")
    cells.columns = [f"n={n} ({n_items / n:.0f}×)" for n in cells.columns]
    print(f"\n### {title}: MAE of full-split accuracy (points), mean ± sd over seeds")
    print(cells.to_markdown() if _has_tabulate() else cells.to_string())
    if errors["model"].nunique() > 2:  # ranking held-out models is what a search needs
        ranks = errors.assign(estimate=errors["error"] + errors["truth"]).groupby(
            ["strategy", "method", "n", "seed"]).apply(
            lambda g: g["estimate"].rank().corr(g["truth"].rank()), include_groups=False)
        table = ranks.groupby(["strategy", "method", "n"]).mean().unstack("n")
        table.columns = [f"n={n}" for n in table.columns]
        print(f"\nrank correlation (Spearman) of estimates with the true accuracies over the held-out models, "
              f"mean over seeds\n{table.round(2).to_string()}")
    coverage = errors.assign(inside=errors["error"].abs() <= 1.96 * errors["sd"])
    calib = coverage.groupby("method").agg(rmse=("error", lambda e: 100 * np.sqrt(np.mean(e**2))),
                                           mean_sd=("sd", lambda s: 100 * s.mean()),
                                           coverage95=("inside", "mean"))
    print(f"\nuncertainty (all strategies and sizes): RMSE vs mean predicted sd (points), "
          f"share of errors within ±1.96 sd\n{calib.round(3).to_string()}")
    by_n = coverage.groupby(["method", "n"])["inside"].mean().unstack("n")
    by_n.columns = [f"n={n}" for n in by_n.columns]
    print(f"\nshare of errors within ±1.96 sd by anchors (all strategies)\n{by_n.round(3).to_string()}")


def print_references(train: ResponseMatrix, heldout: ResponseMatrix, fit) -> None:
    """What the anchored estimates are up against: a guess without anchors, and the IRT model's
    own floor (θ fitted on every item of the split, accuracy read off the item curves)."""
    truth = heldout.accuracy()
    guess = 100 * np.mean(np.abs(np.mean(train.accuracy()) - truth))
    index = fit.item_index(list(heldout.items))
    alpha, beta = fit.alpha_mean()[index], fit.beta_mean()[index]
    floor = []
    for row, true in zip(heldout.matrix, truth):
        seen = ~np.isnan(row)
        theta, _ = map_ability(alpha[seen], beta[seen], row[seen])
        floor.append(abs(float(fit.probability(theta, index).mean()) - true))
    print(f"\nreferences (MAE, points): no anchors, the calibration models' mean accuracy: {guess:.2f}; "
          f"IRT floor, θ from all {len(heldout.items)} items: {100 * np.mean(floor):.2f}; "
          f"held-out accuracies span {100 * truth.min():.1f}–{100 * truth.max():.1f}")


def print_readout_reference(train: ResponseMatrix, heldout: ResponseMatrix, fit, sizes, seeds) -> None:
    """How much the anchors' responses say at all: ridge regressions of full-split accuracy on
    the anchor responses. ``held-out truths``: fitted on the calibration models and the *other*
    held-out models (their true accuracies included), scored leave-one-out on each held-out model
    at the penalty that suits them best; no estimator may use held-out truths, so this is a
    generous reference for any estimator that reads the anchors linearly. ``calibration``: fitted
    on the calibration models alone (penalty by their leave-one-out error), a fair estimator."""
    features = np.nan_to_num(np.vstack([train.matrix, heldout.matrix]), nan=0.0)
    truth = np.concatenate([train.accuracy(), heldout.accuracy()])
    calibration = np.arange(len(train.models))
    held = np.arange(len(train.models), truth.size)
    items = pd.Index([str(item) for item in train.items])
    if list(items) != [str(item) for item in heldout.items]:
        raise SystemExit("held-out responses cover other items than the calibration responses")
    rows = []
    for strategy in STRATEGIES:
        for size in sizes:
            for seed in range(seeds):
                anchors = select_anchors(train, fit, strategy=strategy, n=size, seed=seed)
                z = np.column_stack([np.ones(truth.size),
                                     features[:, items.get_indexer([str(item) for item in anchors["item_id"]])]])
                oracle = min(np.mean(np.abs(_ridge(z, truth, p)[1][held])) for p in PENALTIES)
                # the calibration models' own leave-one-out error picks the penalty
                fair = min(PENALTIES, key=lambda p: np.mean(np.abs(_ridge(z[calibration], truth[calibration], p)[1])))
                coef, _ = _ridge(z[calibration], truth[calibration], fair)
                rows += [{"fitted on": "held-out truths", "strategy": strategy, "n": size, "mae": 100 * oracle},
                         {"fitted on": "calibration", "strategy": strategy, "n": size,
                          "mae": 100 * np.mean(np.abs(z[held] @ coef - truth[held]))}]
    table = pd.DataFrame(rows).groupby(["fitted on", "strategy", "n"])["mae"].mean().unstack("n")
    table.columns = [f"n={n}" for n in table.columns]
    print("\nreference: ridge read-out of the same anchors, fitted on the held-out models' own accuracies "
          "(leave-one-out) or on the calibration models alone (MAE, points, mean over seeds)\n"
          f"{table.round(2).to_string()}")


PENALTIES = np.logspace(-2, 3, 21)


def _ridge(z: np.ndarray, truth: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients (column 0 of ``z``, the intercept, unpenalised) and the exact
    leave-one-out residuals."""
    ridge = penalty * np.eye(z.shape[1])
    ridge[0, 0] = 0.0
    inverse = np.linalg.pinv(z.T @ z + ridge)
    coef = inverse @ (z.T @ truth)
    leverage = np.einsum("ij,jk,ik->i", z, inverse, z)
    return coef, (truth - z @ coef) / np.clip(1.0 - leverage, 1e-9, None)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# 1. simulated merges
# --------------------------------------------------------------------------------------------


def simulate_merges(n_items: int, n_calibration: int, n_heldout: int, seed: int = 0):
    """Endpoint abilities in 2-d; merges are convex combinations plus N(0, 0.15²) noise."""
    rng = np.random.default_rng(seed)
    endpoints = np.array([[1.2, -0.3], [-0.4, 1.1], [0.1, 0.2]])
    n_merges = n_calibration + n_heldout
    weights = rng.dirichlet(np.ones(3), size=n_merges)
    merges = weights @ endpoints + 0.15 * rng.standard_normal((n_merges, 2))
    theta = np.vstack([endpoints, merges])
    sim = simulate_irt(theta.shape[0], n_items, seed=seed + 1, dim=2, theta=theta)
    names = ["endpoint-a", "endpoint-b", "endpoint-c"] + [f"merge-{k:03d}" for k in range(n_merges)]
    matrix = ResponseMatrix(sim.matrix.matrix, names, sim.matrix.items)
    calibration = names[: 3 + n_calibration]
    return matrix.select_models(calibration), matrix.select_models(names[3 + n_calibration:])


def bench_simulated(args) -> pd.DataFrame:
    train, heldout = simulate_merges(args.sim_items, n_calibration=150, n_heldout=40)
    started = time.perf_counter()
    fit = fit_or_load(train, f"simulated-{args.sim_items}", args)
    print(f"\nsimulated merges: {len(train.models)} calibration models (3 endpoints), "
          f"{len(heldout.models)} held-out merges, {len(train.items)} items; "
          f"{args.kind} fit {time.perf_counter() - started:.1f} s, {fit.info['steps']} steps")
    errors = evaluate(train, heldout, fit, ALL_METHODS, args.sizes, args.seeds,
                      endpoints=["endpoint-a", "endpoint-b", "endpoint-c"], lambda_rule=args.lambda_rule)
    print_table("simulated held-out merges", errors, len(train.items))
    print_references(train, heldout, fit)
    return errors


# --------------------------------------------------------------------------------------------
# 2. the zoo's held-out merges, and any real calibration responses
# --------------------------------------------------------------------------------------------


def bench_zoo(args) -> dict[str, pd.DataFrame]:
    """The pipeline's fit of ``--task`` against random merges and search candidates it never saw."""
    from mergeflow.config import load_config

    config = load_config(args.config)
    results, task = Path(args.zoo), args.task
    fit = load_irt(results / "irt" / task)
    own = [results / "responses" / task / "search" / f"{m}.parquet" for m in fit.models]
    train = load_response_matrix([results / "calibration" / f"{task}.parquet", *[p for p in own if p.exists()]])
    if sorted(train.models) != sorted(fit.models):
        raise SystemExit(f"{results}: the responses on disk are not the ones results/irt/{task} was fitted to")
    endpoints = list(config["endpoints"])
    heldout_sets = {f"{args.zoo_merges} fresh random merges": _zoo_random_merges(config, results, task, args)}
    for run in args.zoo_runs:
        heldout_sets[f"the {run!r} search's candidates"] = _zoo_run_candidates(config, results, task, run, args)
    print(f"\nzoo {task}: the pipeline's {fit.kind} fit ({len(train.models)} calibration models, "
          f"{len(train.items)} items, {fit.info['steps']} steps)")
    out = {}
    for name, heldout in heldout_sets.items():
        print(f"\nheld out: {name} ({len(heldout.models)} models)")
        errors = evaluate(train, heldout, fit, ALL_METHODS, args.sizes, args.seeds, endpoints=endpoints,
                          lambda_rule=args.lambda_rule)
        print_table(f"zoo {task}, {name}", errors, len(train.items))
        print_references(train, heldout, fit)
        print_readout_reference(train, heldout, fit, args.sizes, args.seeds)
        out[f"zoo {task}: {name}"] = errors
    return out


def _zoo_items(config: dict, results: Path, task: str):
    from mergeflow.data import read_split
    from mergeflow.evaluate import EvalSettings

    tcfg = config["tasks"][task]
    return (read_split(results / "data" / task / "search.parquet"), tcfg["scorer"],
            tcfg["target_delimiter"], EvalSettings.from_config(config["evaluation"]))


def _zoo_paths(config: dict) -> tuple[str, list[str]]:
    from mergeflow.locations import model_location

    models = config["models"]
    return model_location(models[config["base_model"]]), [model_location(models[m]) for m in config["endpoints"]]


def _cached(args, name: str, make) -> ResponseMatrix:
    """Responses of a held-out set, kept under --cache (long format) when it is given."""
    path = Path(args.cache) / f"{name}.parquet" if args.cache else None
    if path is not None and path.exists():
        return load_response_matrix(path)
    started = time.perf_counter()
    frame = make()
    print(f"({name}: {frame['model'].nunique()} models scored in {time.perf_counter() - started:.0f} s)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
    return load_response_matrix(frame)


def _zoo_random_merges(config: dict, results: Path, task: str, args) -> ResponseMatrix:
    from mergeflow.calibrate import random_merge_responses

    def make() -> pd.DataFrame:
        items, scorer, delimiter, settings = _zoo_items(config, results, task)
        base, sources = _zoo_paths(config)
        space = config["irt"]["calibration"]["search_space"]
        # the calibration draws from the stream [seed, 7]; seed + 1000 gives other merges
        frame = random_merge_responses(base, sources, space, args.zoo_merges, config["seed"] + 1000,
                                       items, scorer, delimiter, settings)
        return frame.assign(model="heldout-" + frame["model"])

    return _cached(args, f"zoo-{task}-random{args.zoo_merges}-seed{config['seed'] + 1000}", make)


def _zoo_run_candidates(config: dict, results: Path, task: str, run: str, args) -> ResponseMatrix:
    """A run's distinct candidates, re-merged from their recipes and scored on the search split.

    Also prints how far the fitness the search recorded is from these scores: nothing for a
    full-fitness search, the error of the estimates it acted on for an anchored one.
    """
    import hashlib

    from mergeflow.evaluate import evaluate_items
    from mergeflow.evolve import history as hist
    from mergeflow.merge import InMemoryMerger, recipe_from_yaml
    from transformers import AutoTokenizer

    history = pd.read_parquet(results / "runs" / run / "evolve" / "history.parquet")
    history = history.drop_duplicates("recipe_hash").reset_index(drop=True)
    history["model"] = [f"{run}-g{g}-{i}" for g, i in zip(history["generation"], history["index"])]

    def make() -> pd.DataFrame:
        items, scorer, delimiter, settings = _zoo_items(config, results, task)
        base, sources = _zoo_paths(config)
        merger = InMemoryMerger([base, *sources], device=settings.device, dtype=settings.dtype)
        tokenizer = AutoTokenizer.from_pretrained(base)
        frames = []
        for row in history.itertuples():
            model = merger.merge(recipe_from_yaml(row.recipe))
            frame = evaluate_items(model, tokenizer, items, scorer, settings, delimiter)
            frames.append(frame.assign(model=row.model))
        return pd.concat(frames, ignore_index=True)

    # the run's candidates name the cache entry, so a rerun search is scored afresh
    digest = hashlib.sha256("".join(history["recipe_hash"]).encode()).hexdigest()[:10]
    matrix = _cached(args, f"zoo-{task}-{run}-candidates-{digest}", make)
    column = hist.fitness_column(task)
    if column in history:
        recorded = history.set_index("model")[column].reindex(matrix.models).to_numpy()
        error = 100 * (recorded - matrix.accuracy())
        line = (f"(the {run!r} search's recorded {task} fitness vs these scores: MAE {np.mean(np.abs(error)):.2f} "
                f"points, bias {np.mean(error):+.2f}")
        if hist.sd_column(task) in history:
            sd = 100 * history.set_index("model")[hist.sd_column(task)].reindex(matrix.models).to_numpy()
            line += f", within ±1.96 sd: {np.mean(np.abs(error) <= 1.96 * sd):.2f}"
        rank = pd.Series(recorded).rank().corr(pd.Series(matrix.accuracy()).rank())
        print(f"{line}, rank correlation {rank:.2f})")
    return matrix


def bench_responses(args) -> pd.DataFrame:
    matrix = load_response_matrix(args.responses)
    heldout_names = _heldout_names(matrix.models, args.heldout, set(args.endpoints))
    train = matrix.drop_models(heldout_names)
    heldout = matrix.select_models(heldout_names)
    fit = fit_or_load(train, "responses", args)
    methods = ALL_METHODS if args.endpoints else ("mean", "pirt", "gpirt")
    print(f"\n{args.responses}: {len(train.models)} calibration models, {len(heldout.models)} held out "
          f"({', '.join(heldout_names[:6])}{' ...' if len(heldout_names) > 6 else ''}), "
          f"{len(matrix.items)} items; {args.kind} fit {fit.info['steps']} steps")
    errors = evaluate(train, heldout, fit, methods, args.sizes, args.seeds,
                      endpoints=args.endpoints or None, lambda_rule=args.lambda_rule)
    print_table(f"held-out models of {args.responses}", errors, len(matrix.items))
    print_references(train, heldout, fit)
    return errors


def _heldout_names(models: list[str], heldout: str, endpoints: set[str]) -> list[str]:
    try:
        fraction = float(heldout)
    except ValueError:
        return [name.strip() for name in heldout.split(",") if name.strip()]
    candidates = [name for name in models if name not in endpoints]
    rng = np.random.default_rng(0)
    count = max(1, int(round(fraction * len(candidates))))
    return sorted(rng.choice(candidates, size=count, replace=False).tolist())


# --------------------------------------------------------------------------------------------
# 3. ChemBench leave-one-model-out
# --------------------------------------------------------------------------------------------


# Two mid-table models stand in for a merge's parents on ChemBench, so mp-IRT and gmp-IRT are
# judged on targets inside and (mostly) outside their range, as a search's best merges are.
CHEMBENCH_ENDPOINTS = ["Llama-3-8B-Instruct", "Llama-3.1-70B-Instruct"]


def bench_chembench(args) -> pd.DataFrame:
    matrix = load_response_matrix(args.chembench)
    print(f"\nchembench: {len(matrix.models)} models × {len(matrix.items)} items, "
          "leave-one-model-out (IRT refitted for each held-out model); mp-IRT and gmp-IRT with endpoints "
          f"{CHEMBENCH_ENDPOINTS} (not held out)")
    started = time.perf_counter()
    frames = []
    for model in matrix.models:
        if model in CHEMBENCH_ENDPOINTS:
            continue
        train = matrix.drop_models([model])
        fit = fit_or_load(train, f"chembench-without-{model}".replace(" ", "_"), args)
        frames.append(evaluate(train, matrix.select_models([model]), fit, ALL_METHODS,
                               args.sizes, args.seeds, endpoints=CHEMBENCH_ENDPOINTS, lambda_rule=args.lambda_rule))
    errors = pd.concat(frames, ignore_index=True)
    print(f"({time.perf_counter() - started:.0f} s)")
    print_table("chembench leave-one-model-out", errors, len(matrix.items))
    baseline = errors[(errors.strategy == "random") & (errors.method == "mean")]
    base = 100 * baseline.assign(e=baseline.error.abs()).groupby("n")["e"].mean()
    best = 100 * errors.assign(e=errors.error.abs()).groupby(["strategy", "method", "n"])["e"].mean()
    print("\nrelative to plain random anchors of the same size (MAE ratio, < 1 is better):")
    print((best / base.reindex(best.index.get_level_values("n")).to_numpy()).unstack("n").round(2).to_string())
    return errors


# --------------------------------------------------------------------------------------------
# 4. fit time
# --------------------------------------------------------------------------------------------


def bench_timing(args) -> None:
    n_models, n_items = args.timing_shape
    sim = simulate_irt(n_models, n_items, seed=11)
    started = time.perf_counter()
    fit = fit_irt(sim.matrix, kind="2pl", steps=args.steps, seed=0)
    seconds = time.perf_counter() - started
    beta_r = np.corrcoef(fit.beta_mean(), sim.beta)[0, 1]
    alpha_r = np.corrcoef(fit.alpha_mean()[:, 0], sim.alpha[:, 0])[0, 1]
    print(f"\n### 2PL fit time on {n_models} × {n_items} ({n_models * n_items / 1e6:.0f}M responses), "
          f"full batch, CPU: {seconds:.1f} s ({fit.info['steps']} steps, converged: "
          f"{fit.info['converged']}, {fit.info['seconds'] / fit.info['steps']:.3f} s/step); "
          f"recovery r(β) = {beta_r:.3f}, r(α) = {alpha_r:.3f}; "
          f"held-out log-lik {fit.info['heldout_loglik']:.4f}")


if __name__ == "__main__":
    main()
