"""Search variants over seeds, in-process: a fast way to try search settings before judging the
winner through Snakemake with bench/search_quality.py.

Each variant is an overlay on one search run's ``evolve`` section (a YAML mapping, name -> keys).
It is rerun with seeds 0..S-1 (run, anchor and rung seeds, as bench/search_quality.py seeds
them) through the library's own stage functions — ``ask``, ``fitness``, ``promote``, ``tell``,
the ones the Snakemake jobs call — on a finished default's zoo, data and IRT fits, in a scratch
directory. Then the chosen merge of each is scored on the first objective's whole search split
and its test split. A variant equal to the run itself gives the run's own accuracies seed for seed.

    python bench/search_sweep.py --variants variants.yaml [--workdir .] [--run cheap] [--seeds 5]

with, for example, variants.yaml:

    cheap: {}
    cheap-cma: {optimizer: CMA}
    cheap-2-groups: {search_space: {layer_groups: 2}}

Prints per variant: each seed's test accuracy, mean ± sd, wins over the best endpoint, the
chosen merges' estimate against their whole-search-split accuracy (the winner's curse), items
evaluated and wall time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from search_quality import endpoints_best, seed_table, seeded_runs  # noqa: E402  (same directory)


def deep_update(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``base``; a mapping that names another ``kind`` (a fitness or search
    space of another kind, or a kind where the base's mapping leaves its default) replaces the
    mapping instead, and a key set to null is dropped (an objective the variant does without)."""
    for key, value in overlay.items():
        old = base.get(key)
        if value is None:
            base.pop(key, None)
            continue
        if isinstance(value, dict):
            same_kind = isinstance(old, dict) and ("kind" not in value or old.get("kind") == value["kind"])
            base[key] = deep_update(dict(old) if same_kind else {}, value)
        else:
            base[key] = value
    return base


def anchors_file(results: Path, task: str, fitness_cfg: dict, endpoints: list[str]) -> str:
    """The anchor set the pipeline's select_anchors rule would write, made by the same calls
    (under results/bench/sweep/, so as not to touch the workflow's own files)."""
    from mergeflow.fitness import FITNESS, anchors_path
    from mergeflow.irt.anchors import select_anchors
    from mergeflow.irt.fit import load_irt
    from mergeflow.irt.responses import load_response_matrix

    anchor_set = FITNESS[fitness_cfg["kind"]].anchor_set(fitness_cfg)
    path = Path(anchors_path(task, anchor_set, str(results / "bench" / "sweep")))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ends = [results / "responses" / task / "search" / f"{m}.parquet" for m in endpoints]
        matrix = load_response_matrix([*ends, results / "calibration" / f"{task}.parquet"])
        select_anchors(matrix, load_irt(results / "irt" / task), **anchor_set).to_parquet(path, index=False)
    return str(path)


def teacher_file(results: Path, task: str, model: str, config: dict) -> str:
    """The teacher's outputs the pipeline's teach rule would write, made by the same call (under
    results/bench/sweep/, so as not to touch the workflow's own files)."""
    from mergeflow.config import task_evaluation
    from mergeflow.evaluate import teach

    path = results / "bench" / "sweep" / "teachers" / task / f"{model}.parquet"
    if not path.exists():
        tcfg = config["tasks"][task]
        teach(config["models"][model], results / "data" / task / "search.parquet", tcfg["scorer"],
              tcfg["target_delimiter"], task_evaluation(config, task), path)
    return str(path)


def search(config: dict, run: str, results: Path, scratch: Path) -> tuple[pd.DataFrame, float]:
    """Run ``run``'s search in-process through the stage functions; its history and wall time."""
    from mergeflow.evolve.stages import EvolveConfig, FitnessJob, ask, fitness, promote, tell
    from mergeflow.fitness import FITNESS, need_paths

    cfg = EvolveConfig.from_config(config, run)
    kind = FITNESS[cfg.fitness["kind"]]
    files = need_paths(cfg.fitness, cfg.tasks, str(results))
    for task, paths in files.items():
        if "anchors" in paths:
            paths["anchors"] = anchors_file(results, task, cfg.fitness, list(config["endpoints"]))
        if "teacher" in paths:
            paths["teacher"] = teacher_file(results, task, cfg.fitness["teachers"][task], config)
    previous, start = None, time.perf_counter()
    for g in range(config["runs"][run]["evolve"]["generations"]):
        gen = scratch / f"gen_{g}"
        ask(cfg, g, previous and str(scratch / f"gen_{g - 1}" / "optimizer.pkl"), previous,
            str(gen / "candidates.parquet"), str(gen / "asked.pkl"))
        earlier: tuple[str, ...] = ()
        shards = []
        climbed = kind.climbed(cfg.fitness, g)
        for r in climbed:
            rung = gen / f"rung_{r}"
            job = FitnessJob(g, r, 0, str(gen / "candidates.parquet"),
                             str(gen / f"rung_{r - 1}" / "promoted.parquet") if r > climbed[0] else None, earlier,
                             str(rung / "fitness_0.parquet"), str(rung / "responses_0.parquet"))
            fitness(cfg, config["tasks"], config["evaluation"], files, job)
            if r < climbed[-1]:
                promote(cfg, g, r, [job.out], str(rung / "promoted.parquet"))
            earlier += (job.out_responses,)
            shards.append(job.out)
        tell(cfg, g, str(gen / "asked.pkl"), str(gen / "candidates.parquet"), shards, previous,
             str(gen / "optimizer.pkl"), str(gen / "history.parquet"), str(gen / "best" / "recipe.yaml"))
        previous = str(gen / "history.parquet")
    return pd.read_parquet(previous), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=Path, required=True, help="YAML: variant name -> evolve overlay")
    parser.add_argument("--workdir", type=Path, default=REPO, help="where a finished default's results/ is")
    parser.add_argument("--configfile", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--run", default="cheap", help="the search run the variants overlay")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--task", help="the task the table scores (default: the run's first objective)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants of the file")
    args = parser.parse_args()
    import torch

    from mergeflow.config import validate_config
    from mergeflow.data import read_split
    from mergeflow.evaluate import EvalSettings, evaluate_items
    from mergeflow.evolve import history as hist
    from mergeflow.evolve.resident import resident_merger
    from mergeflow.evolve.stages import EvolveConfig
    from mergeflow.locations import run_merge_dir
    from mergeflow.merge.candidates import candidate_from_yaml

    torch.set_num_threads(1)
    variants_file, configfile = args.variants.resolve(), args.configfile.resolve()  # before the chdir
    os.chdir(args.workdir)  # the config's model and data paths are relative to it
    results = Path("results")
    raw = yaml.safe_load(configfile.read_text())
    # the variants replace the config's runs: a model that is another run's final merge is read from
    # that run's finished merge in the workdir (psdfs's model A), or goes where there is none
    raw["models"] = {name: {"path": str(run_merge_dir(spec["run"]))} if "run" in spec else spec
                     for name, spec in raw["models"].items()
                     if "run" not in spec or (run_merge_dir(spec["run"]) / "config.json").exists()}
    variants = yaml.safe_load(variants_file.read_text())
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            raise SystemExit(f"--only: {unknown} not in {variants_file}; it has {list(variants)}")
        variants = {name: variants[name] for name in args.only}
    base = validate_config(copy.deepcopy(raw))
    task = args.task or next(iter(base["runs"][args.run]["evolve"]["objectives"]))
    best_name, best, _ = endpoints_best(results, args.run, list(base["endpoints"]), task)
    settings = EvalSettings.from_config(base["evaluation"])
    tcfg = base["tasks"][task]
    splits = {s: read_split(results / "data" / task / f"{s}.parquet") for s in ("search", "test")}

    rows = []
    for name, overlay in variants.items():
        run = copy.deepcopy(raw["runs"][args.run])
        run["evolve"] = deep_update(run["evolve"], overlay or {})
        seeded = [run, *seeded_runs({"runs": {name: run}}, [name], args.seeds).values()]
        for seed, rcfg in enumerate(seeded):
            config = validate_config({**copy.deepcopy(raw), "runs": {name: rcfg}})
            with tempfile.TemporaryDirectory(prefix="sweep-") as scratch:
                history, wall = search(config, name, results, Path(scratch))
            run_cfg = EvolveConfig.from_config(config, name)
            chosen = hist.best_row(history, run_cfg.result)
            # the sources as the search's fitness jobs hold them (the same ones between calls)
            space = run_cfg.space()
            with resident_merger([run_cfg.base_path, *run_cfg.endpoint_paths.values()], "cpu", "float32",
                                 space.candidates, space.merger_template()) as (merger, tok):
                model = merger.merge(candidate_from_yaml(chosen["recipe"]))
                acc = {s: float(evaluate_items(model, tok, items, tcfg["scorer"], settings,
                                               tcfg["target_delimiter"])["correct"].mean())
                       for s, items in splits.items()}
            rows.append({"variant": name, "seed": seed, "test": acc["test"], "search": acc["search"],
                         "estimate": float(chosen["fitness"]), "items": int(history["items"].sum()), "wall_s": wall})
            print(f"{name} seed {seed}: test {acc['test']:.3f}, search split {acc['search']:.3f}, "
                  f"estimate {chosen['fitness']:.3f}, {rows[-1]['items']:,} items, {wall:.0f} s", flush=True)

    table = pd.DataFrame(rows)
    print(f"\n{task} test accuracy over {args.seeds} seeds (best endpoint: {best_name} {best:.3f}), variants of "
          f"run {args.run!r}\n")
    columns = {"estimate − whole search split": lambda r: f"{(r['estimate'] - r['search']).mean():+.3f}",
               "items": lambda r: f"{r['items'].mean():,.0f}", "wall (s)": lambda r: f"{r['wall_s'].mean():.0f}"}
    print("\n".join(seed_table(table, "variant", args.seeds, best, columns)))


if __name__ == "__main__":
    main()
