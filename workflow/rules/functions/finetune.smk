# Input functions of the finetune stage (finetune.smk).

from mergeflow.locations import finetune_model_dir

# Fine-tuned models by the name of the directory the finetune stage writes them to.
FINETUNED = {finetune_model_dir(spec).name: name for name, spec in config["models"].items() if "finetune" in spec}


def finetune_inputs(wildcards):
    """The model a fine-tune starts from, and its data where that is a local file."""
    section = config["models"][FINETUNED[wildcards.slug]]["finetune"]
    return model_inputs(section["from"]) + ([section["source"]["path"]] if "path" in section["source"] else [])
