# Fail fast: every model loads and matches the base (architecture, tensor names and shapes,
# vocabulary). Tasks are checked where they are built: the data rule stops with a message naming
# the task and column, before any model is run on it. Hub models are fetched first (fetch_model):
# a directory of links into the Hugging Face cache, so that every stage reads local files.



include: "functions/check.smk"


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


rule fetch_model:
    output:
        directory("results/hub/{slug}"),
    params:
        hub=lambda wc: HUB_MODELS[wc.slug]["hub"],
        revision=lambda wc: HUB_MODELS[wc.slug].get("revision"),
    wildcard_constraints:
        slug="|".join(re.escape(s) for s in HUB_MODELS) or "(?!)",
    log:
        "results/logs/fetch/{slug}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_model.py"
