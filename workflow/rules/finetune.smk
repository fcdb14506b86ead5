# Experts fine-tuned here: a configured model (models: NAME: {finetune: {from: ...}}) trained on
# prompt -> answer pairs into results/finetune/FROM-DIGEST, the digest of its finetune section
# (finetune.py). The model it starts from and a local source file are its inputs, so a changed
# base or data file trains it again; every other stage reads it like any local model.

include: "functions/finetune.smk"


rule finetune_model:
    input:
        finetune_inputs,
    output:
        directory("results/finetune/{slug}"),
    params:
        name=lambda wc: FINETUNED[wc.slug],
        spec=lambda wc: canonical(config["models"][FINETUNED[wc.slug]]),
        source=lambda wc: canonical(config["models"][config["models"][FINETUNED[wc.slug]]["finetune"]["from"]]),
        evaluation=canonical({k: config["evaluation"][k] for k in ("add_bos", "device")}),
    wildcard_constraints:
        slug="|".join(re.escape(s) for s in FINETUNED) or "(?!)",
    threads: all_cores()
    resources:
        **MODEL_JOB,
    log:
        "results/logs/finetune/{slug}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/finetune_model.py"
