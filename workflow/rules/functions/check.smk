# Input functions of the check stage's rules (check.smk).

# Hub models by the name of the directory the fetch stage writes them to.
HUB_MODELS = {hub_model_dir(spec).name: spec for spec in config["models"].values() if "hub" in spec}


def all_model_inputs(wildcards):
    return [p for name in MODELS for p in model_inputs(name)]
