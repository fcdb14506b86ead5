# Per run: the final merge, its test-split scores, the comparison table, and provenance.



include: "functions/final.smk"


# Light bookkeeping (tables, the card, the front): on a cluster these run on the submitting host.
localrules:
    final_table,
    compare_runs,
    pareto_front,
    final_model,


rule baseline_model:
    input:
        models=search_model_inputs,
    output:
        recipe="results/baseline/recipe.yaml",
        model=directory("results/baseline/model"),
    params:
        baseline=canonical({**config["baseline"], **MERGE_TOKENIZER}),
        base=BASE_LOCATION,
        sources=SOURCE_LOCATIONS,
    resources:
        **CPU_JOB,
    log:
        "results/logs/baseline_model.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/baseline_model.py"


# The best recipe merged and scored; final_model publishes its files (hard links) with a card that
# holds the scores, so a change to the table redoes the card, not the merge or its scoring.
rule final_merge:
    input:
        recipe=lambda wc: f"{last_generation(wc.run)}/best/recipe.yaml",
        history="results/runs/{run}/evolve/history.parquet",
        models=search_model_inputs,
    output:
        directory("results/runs/{run}/final/merge"),
    params:
        lineage=lambda wc: {"run": wc.run, "generations": generations(wc.run)},
        result=lambda wc: EVOLVE[wc.run].result,
    resources:
        **CPU_JOB,
    log:
        "results/logs/final/{run}/merge.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/final_merge.py"


rule final_respond:
    input:
        split_file=final_split_file,
        model="results/runs/{run}/final/merge",
    output:
        "results/runs/{run}/final/{scored}/{task}.parquet",
    wildcard_constraints:
        scored="|".join(FINAL_SPLITS),
    params:
        model=lambda wc: {"path": f"results/runs/{wc.run}/final/merge"},
        scorer=lambda wc: config["tasks"][wc.task]["scorer"],
        delimiter=lambda wc: config["tasks"][wc.task]["target_delimiter"],
        evaluation=lambda wc: answer_settings(task_evaluation(config, wc.task)),
    threads: 1
    resources:
        **MODEL_JOB,
    log:
        "results/logs/final/{run}/{scored}_{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/respond.py"


rule final_table:
    input:
        unpack(final_table_inputs),
    output:
        summary=report(
            "results/runs/{run}/final/summary.md",
            caption="../report/run_summary.rst",
            category="Runs",
            labels={"run": "{run}", "table": "test accuracy"},
        ),
        table="results/runs/{run}/final/test.parquet",
    params:
        run=lambda wc: wc.run,
        tasks=lambda wc: run_tasks(config, wc.run),
        models=TABLE_MODELS,
        checked=lambda wc: estimate_checked_tasks(wc.run),
        result=lambda wc: EVOLVE[wc.run].result if wc.run in EVOLVE else None,
    log:
        "results/logs/final/{run}/final_table.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/final_table.py"


rule final_model:
    input:
        merge="results/runs/{run}/final/merge",
        table="results/runs/{run}/final/test.parquet",
    output:
        directory("results/runs/{run}/final/model"),
    params:
        model_ids=MODEL_IDS,
    log:
        "results/logs/final/{run}/model.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/final_model.py"


rule pareto_front:
    input:
        "results/runs/{run}/evolve/history.parquet",
    output:
        "results/runs/{run}/final/pareto.parquet",
    params:
        tasks=lambda wc: EVOLVE[wc.run].tasks,
    log:
        "results/logs/final/{run}/pareto_front.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/pareto_front.py"


rule compare_runs:
    input:
        [f"results/runs/{run}/final/test.parquet" for run in config["runs"]],
    output:
        report("results/summary.md", caption="../report/summary.rst", category="Summary"),
    params:
        runs=list(config["runs"]),
    log:
        "results/logs/compare_runs.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/compare_runs.py"


rule provenance:
    input:
        # which weights the run read: the fingerprints of its models' checks
        checks=lambda wc: [model_check(n) for n in run_model_names(wc.run)],
    output:
        "results/runs/{run}/provenance.json",
    params:
        config=canonical(config),
        run=lambda wc: wc.run,
    resources:
        **MODEL_JOB,  # it names the CPU and GPUs: those of the nodes that run the models
    log:
        "results/logs/provenance/{run}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/provenance.py"


rule pareto_members:
    input:
        pareto="results/runs/{run}/final/pareto.parquet",
        splits=lambda wc: [f"results/data/{t}/test.parquet" for t in run_tasks(config, wc.run)],
        models=search_model_inputs,
    output:
        models=directory("results/runs/{run}/final/pareto_models"),
        table="results/runs/{run}/final/pareto_test.parquet",
        summary=report(
            "results/runs/{run}/final/pareto.md",
            caption="../report/pareto.rst",
            category="Runs",
            labels={"run": "{run}", "table": "Pareto front"},
        ),
    params:
        tasks=pareto_test_tasks,
        evaluation=answer_settings(config["evaluation"]),
    threads: 1
    resources:
        **MODEL_JOB,
    log:
        "results/logs/final/{run}/pareto_members.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/pareto_members.py"
