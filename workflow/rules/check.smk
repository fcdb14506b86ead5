# Fail fast, per model: it loads and matches the base (architecture, tensor names and shapes,
# vocabulary) and every tensor is finite; every job that reads a model depends on its check, and
# a local model's weights fingerprint is the check's parameter, so replaced weights rerun it. The
# report's name is the digest of the check's inputs (check_inputs): a changed model is checked
# into a new file, so a failed check leaves every earlier report as it was and a reverted config
# reruns nothing.
# Tasks are checked where they are built: the data rule stops with a message naming the task and
# column, before any model is run on it. Hub models are fetched first (fetch_model): a directory
# of links into the Hugging Face cache; GGUF models are converted first (convert_gguf): a
# safetensors directory; so that every stage reads local files.



include: "functions/check.smk"


localrules:
    check_models,


# `snakemake check_models`: every model checked against the base, before a long run
rule check_models:
    input:
        [model_check(name) for name in MODELS],


rule check_model:
    input:
        model=lambda wc: model_inputs(wc.model),
        base=model_inputs(config["base_model"]),
    output:
        "results/check/{model}/{digest}.json",
    params:
        models=lambda wc: check_inputs(wc.model)["models"],
        base=config["base_model"],
        fingerprints=lambda wc: check_inputs(wc.model)["fingerprints"],
        tokenizer_source=lambda wc: check_inputs(wc.model).get("tokenizer_source"),
    wildcard_constraints:
        model="|".join(re.escape(m) for m in MODELS),
        # only the digest of the current config: an old report's path is never rewritten
        digest="|".join(model_check_file(m, check_inputs(m)).stem for m in MODELS),
    resources:
        **CPU_JOB,
    log:
        "results/logs/check/{model}/{digest}.log",
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
    resources:
        **CPU_JOB,
    log:
        "results/logs/fetch/{slug}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_model.py"


rule convert_gguf:
    input:
        lambda wc: str(GGUF_MODELS[wc.slug][1]),
    output:
        directory("results/gguf/{slug}"),
    params:
        name=lambda wc: GGUF_MODELS[wc.slug][0],
        spec=lambda wc: canonical(config["models"][GGUF_MODELS[wc.slug][0]]),
    wildcard_constraints:
        slug="|".join(re.escape(s) for s in GGUF_MODELS) or "(?!)",
    resources:
        **CPU_JOB,
    log:
        "results/logs/gguf/{slug}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/convert_gguf.py"
