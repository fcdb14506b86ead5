# Experts fine-tuned here: a configured model (models: NAME: {finetune: {from: ...}}) trained on
# prompt -> answer pairs into results/finetune/FROM-DIGEST, the digest of its finetune section
# (finetune.py). The model it starts from and a local source file are its inputs, so a changed
# base or data file trains it again; every other stage reads it like any local model.

from mergeflow.locations import finetune_model_dir

# Fine-tuned models by the name of the directory the finetune stage writes them to.
FINETUNED = {finetune_model_dir(spec).name: name for name, spec in config["models"].items() if "finetune" in spec}


def finetune_inputs(wildcards):
    """The model a fine-tune starts from, and its data where that is a local file."""
    section = config["models"][FINETUNED[wildcards.slug]]["finetune"]
    return model_inputs(section["from"]) + ([section["source"]["path"]] if "path" in section["source"] else [])


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
