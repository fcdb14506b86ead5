# Load each task's source, render prompts, and write disjoint search / test splits.


include: "functions/data.smk"


rule data:
    input:
        task_source_input,
    output:
        search="results/data/{task}/search.parquet",
        test="results/data/{task}/test.parquet",
    params:
        task=lambda wc: canonical(config["tasks"][wc.task]),
        seed=config["seed"],
    resources:
        **CPU_JOB,
    log:
        "results/logs/data/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/data.py"
