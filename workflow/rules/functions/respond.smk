# Input functions of the respond stage's rules (respond.smk).


def model_spec(name):
    if name == BASELINE:
        return {"path": "results/baseline/model"}
    return config["models"][name]


def respond_model_input(wildcards):
    if wildcards.model == BASELINE:
        return [model_spec(BASELINE)["path"]]
    return model_inputs(wildcards.model)
