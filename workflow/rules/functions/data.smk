# Input functions of the data stage's rules (data.smk).


def task_source_input(wildcards):
    return task_files(config["tasks"][wildcards.task])
