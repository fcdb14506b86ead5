# Per run: the comparison table on each task's test split, and the run's provenance.


rule final:
    input:
        final_responses,
    output:
        summary="results/runs/{run}/final/summary.md",
        table="results/runs/{run}/final/test.parquet",
    params:
        tasks=lambda wc: run_tasks(config, wc.run),
        models=EVAL_MODELS,
    log:
        "results/logs/final/{run}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/final.py"


rule provenance:
    output:
        "results/runs/{run}/provenance.json",
    params:
        config=canonical(config),
        run=lambda wc: wc.run,
    log:
        "results/logs/provenance/{run}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/provenance.py"
