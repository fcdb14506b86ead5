# Score a model on one split of one task: per-item correctness and gold log-likelihood.


include: "functions/respond.smk"


rule respond:
    input:
        check=lambda wc: [] if wc.model == BASELINE else model_check(wc.model),
        split_file="results/data/{task}/{split}.parquet",
        model=respond_model_input,
    output:
        "results/responses/{task}/{split}/{model}.parquet",
    params:
        model=lambda wc: canonical(model_spec(wc.model)),
        scorer=lambda wc: config["tasks"][wc.task]["scorer"],
        delimiter=lambda wc: config["tasks"][wc.task]["target_delimiter"],
        evaluation=lambda wc: answer_settings(task_evaluation(config, wc.task)),
    threads: 1
    resources:
        **MODEL_JOB,
    log:
        "results/logs/respond/{task}/{split}/{model}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/respond.py"


# A model's outputs on a task's search split, read without its answers: the targets of the
# gradient kind's label-free agreement loss (fitness.teachers names the model per task).
rule teach:
    input:
        check=lambda wc: model_check(wc.model),
        split_file="results/data/{task}/search.parquet",
        model=respond_model_input,
    output:
        "results/teachers/{task}/{model}.parquet",
    params:
        model=lambda wc: canonical(model_spec(wc.model)),
        scorer=lambda wc: config["tasks"][wc.task]["scorer"],
        delimiter=lambda wc: config["tasks"][wc.task]["target_delimiter"],
        # choice log-likelihoods are floats that follow the evaluation's batches
        evaluation=lambda wc: answer_settings(task_evaluation(config, wc.task), batch_invariant=False),
    threads: 1
    resources:
        **MODEL_JOB,
    log:
        "results/logs/teach/{task}/{model}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/teach.py"
