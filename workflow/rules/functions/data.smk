# Input functions of the data stage's rules (data.smk).


def task_source_input(wildcards):
    source = config["tasks"][wildcards.task]["source"]
    return [source["path"]] if "path" in source else []
