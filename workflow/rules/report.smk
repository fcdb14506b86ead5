# The report's figures (cached files, each a report entry with its caption) and the README of a
# publishable results/ directory.


include: "functions/report.smk"


# Figures and the README are light: on a cluster they run on the submitting host.
localrules:
    search_progress,
    best_genome,
    pareto_figure,
    irt_fit_figure,
    accuracy_figure,
    cost_figure,
    results_readme,


rule search_progress:
    input:
        history="results/runs/{run}/evolve/history.parquet",
        table="results/runs/{run}/final/test.parquet",
    output:
        report(
            "results/runs/{run}/figures/search_progress.png",
            caption="../report/search_progress.rst",
            category="Runs",
            labels={"run": "{run}", "figure": "search progress"},
        ),
    params:
        result=lambda wc: EVOLVE[wc.run].result,
        fitness_label=lambda wc: EVOLVE[wc.run].fitness_label,
    log:
        "results/logs/figures/{run}/search_progress.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/search_progress.py"


rule best_genome:
    input:
        history="results/runs/{run}/evolve/history.parquet",
        models=search_model_inputs,
    output:
        report(
            "results/runs/{run}/figures/best_genome.png",
            caption="../report/best_genome.rst",
            category="Runs",
            labels={"run": "{run}", "figure": "best genome"},
        ),
    params:
        search_space=lambda wc: canonical(EVOLVE[wc.run].search_space),
        result=lambda wc: EVOLVE[wc.run].result,
    log:
        "results/logs/figures/{run}/best_genome.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/best_genome.py"


rule pareto_figure:
    input:
        history="results/runs/{run}/evolve/history.parquet",
        members="results/runs/{run}/final/pareto_test.parquet",
        table="results/runs/{run}/final/test.parquet",
    output:
        report(
            "results/runs/{run}/figures/pareto_front.png",
            caption="../report/pareto_figure.rst",
            category="Runs",
            labels={"run": "{run}", "figure": "Pareto front"},
        ),
    log:
        "results/logs/figures/{run}/pareto_figure.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/pareto_figure.py"


rule irt_fit_figure:
    input:
        unpack(irt_figure_inputs),
    output:
        report(
            "results/figures/irt_{task}.png",
            caption="../report/irt_fit_figure.rst",
            category="IRT",
            labels={"task": "{task}", "figure": "estimates and item map"},
        ),
    params:
        task=lambda wc: wc.task,
    log:
        "results/logs/figures/irt_{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/irt_fit_figure.py"


rule accuracy_figure:
    input:
        [f"results/runs/{run}/final/test.parquet" for run in config["runs"]],
    output:
        report("results/figures/accuracy.png", caption="../report/accuracy_figure.rst", category="Summary",
               labels={"figure": "test accuracy"}),
    params:
        runs=list(config["runs"]),
    log:
        "results/logs/figures/accuracy_figure.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/accuracy_figure.py"


rule cost_figure:
    input:
        [f"results/runs/{run}/final/test.parquet" for run in EVOLVE],
    output:
        report("results/figures/search_cost.png", caption="../report/cost_figure.rst", category="Summary",
               labels={"figure": "search cost"}),
    params:
        objectives={run: list(cfg.objectives) for run, cfg in EVOLVE.items()},
    log:
        "results/logs/figures/cost_figure.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/cost_figure.py"


rule results_readme:
    input:
        unpack(results_readme_inputs),
    output:
        readme="results/README.md",
        requirements="results/requirements.txt",
    params:
        runs=list(config["runs"]),
        configfiles=[project_path(f) for f in workflow.configfiles],
    log:
        "results/logs/results_readme.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/results_readme.py"
