# MERGE³'s Extract and Estimate, per task: a calibration population's responses, the IRT model
# fitted to them (fit_irt), and anchor sets selected with it (select_anchors).
from mergeflow.irt import STRATEGIES


include: "functions/irt.smk"


rule calibrate:
    input:
        split="results/data/{task}/search.parquet",
        models=search_model_inputs,
        checkpoints=calibration_checkpoints,
    output:
        "results/calibration/{task}.parquet",
    params:
        task=lambda wc: canonical(config["tasks"][wc.task]),
        base=BASE_LOCATION,
        sources=SOURCE_LOCATIONS,
        calibration=canonical({**config["irt"]["calibration"], "search_space": {
            **config["irt"]["calibration"]["search_space"], **MERGE_TOKENIZER}}),
        seed=config["seed"],
        evaluation=answer_settings(config["evaluation"]),
    threads: 1
    resources:
        **MODEL_JOB,
    log:
        "results/logs/calibrate/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/calibrate.py"


rule fit_irt:
    input:
        endpoints=endpoint_search_responses,
        calibration="results/calibration/{task}.parquet",
    output:
        item_params="results/irt/{task}/items.parquet",
        posterior="results/irt/{task}/posterior.safetensors",
        fit="results/irt/{task}/fit.json",
    params:
        irt={k: v for k, v in config["irt"].items() if k != "calibration"},
        seed=config["seed"],
    threads: 1
    resources:
        **IRT_JOB,
    log:
        "results/logs/fit_irt/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/fit_irt.py"


rule select_anchors:
    input:
        endpoints=endpoint_search_responses,
        calibration="results/calibration/{task}.parquet",
        irt="results/irt/{task}/items.parquet",
    output:
        "results/anchors/{task}/{strategy}-{n}-seed{seed}.parquet",
    wildcard_constraints:
        strategy="|".join(STRATEGIES),
        n=r"\d+",
        seed=r"\d+",
    resources:
        **CPU_JOB,
    log:
        "results/logs/select_anchors/{task}/{strategy}-{n}-seed{seed}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/select_anchors.py"
