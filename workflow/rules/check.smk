# Fail fast: every model loads and matches the base (architecture, tensor names and shapes,
# vocabulary). Tasks are checked where they are built: the data rule stops with a message naming
# the task and column, before any model is run on it.


rule check:
    input:
        models=all_model_inputs,
    output:
        "results/check.json",
    params:
        models=canonical(config["models"]),
        base=config["base_model"],
    log:
        "results/logs/check.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/check.py"
