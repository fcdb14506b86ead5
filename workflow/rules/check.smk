# Fail fast: every model loads and matches the base; every task's splits load.


rule check:
    input:
        models=all_model_inputs,
        splits=all_split_files,
    output:
        "results/check.json",
    params:
        models=canonical(config["models"]),
        base=config["base_model"],
        splits=canonical({task: split_files(task) for task in config["tasks"]}),
    log:
        "results/logs/check.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/check.py"
