# Input functions of the report stage's rules (report.smk).


def run_figures(run):
    """A run's figures: how its search went, its chosen genome, and its Pareto front."""
    if run not in EVOLVE:
        return []
    figures = [f"results/runs/{run}/figures/search_progress.png", f"results/runs/{run}/figures/best_genome.png"]
    if EVOLVE[run].multi_objective:
        figures.append(f"results/runs/{run}/figures/pareto_front.png")
    return figures


def irt_runs(task):
    """The runs whose fitness reads an IRT fit of ``task``."""
    return [run for run, cfg in EVOLVE.items() if task in cfg.tasks
            and "irt" in cfg.kind.needs(cfg.fitness)]


IRT_TASKS = [task for task in config["tasks"] if irt_runs(task)]


def all_figures():
    figures = [p for run in config["runs"] for p in run_figures(run)]
    figures += [f"results/figures/irt_{task}.png" for task in IRT_TASKS]
    if EVOLVE:
        figures += ["results/figures/accuracy.png", "results/figures/search_cost.png"]
    return figures


def irt_figure_inputs(wildcards):
    task, runs = wildcards.task, irt_runs(wildcards.task)
    anchors = {NEED_PATHS["anchors"](task, EVOLVE[run].fitness, "results") for run in runs
               if "anchors" in EVOLVE[run].kind.needs(EVOLVE[run].fitness)}
    return {
        "irt": f"results/irt/{task}/items.parquet",
        "responses": endpoint_search_responses(wildcards) + [f"results/calibration/{task}.parquet"],
        "anchors": sorted(anchors),
        "tables": [f"results/runs/{run}/final/test.parquet" for run in runs],
    }


def results_readme_inputs(wildcards):
    return {
        "summary": "results/summary.md" if EVOLVE else [],
        "tables": [f"results/runs/{run}/final/test.parquet" for run in config["runs"]],
        "provenance": [f"results/runs/{run}/provenance.json" for run in config["runs"]],
        "figures": all_figures(),
        "models": [f"results/runs/{run}/final/model" for run in EVOLVE],
    }


def project_path(path):
    """A config file as a reader of results/ needs it: relative to the working directory (the
    project, where results/ is), else to the workflow's checkout, else as given."""
    path = Path(path).resolve()
    for root in (Path.cwd(), Path(workflow.basedir)):
        if path.is_relative_to(root.resolve()):
            return str(path.relative_to(root.resolve()))
    return str(path)
