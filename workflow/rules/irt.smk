# MERGE³'s Extract and Estimate: a calibration population, an IRT fit, anchor sets (per task).


rule calibrate:
    input:
        check="results/check.json",
        split="results/data/{task}/search.parquet",
        models=search_model_inputs,
        checkpoints=calibration_checkpoints,
    output:
        "results/calibration/{task}.parquet",
    params:
        task=lambda wc: canonical(config["tasks"][wc.task]),
        base=BASE_LOCATION,
        sources=SOURCE_LOCATIONS,
        calibration=canonical(config["irt"]["calibration"]),
        seed=config["seed"],
        evaluation=canonical(config["evaluation"]),
    threads: 1
    log:
        "results/logs/calibrate/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/calibrate.py"


rule estimate:
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
    log:
        "results/logs/estimate/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/estimate.py"


rule extract:
    input:
        endpoints=endpoint_search_responses,
        calibration="results/calibration/{task}.parquet",
        irt="results/irt/{task}/items.parquet",
    output:
        "results/anchors/{task}/{strategy}-{n}-seed{seed}.parquet",
    wildcard_constraints:
        strategy="random|correctness|irt",
        n=r"\d+",
        seed=r"\d+",
    log:
        "results/logs/extract/{task}/{strategy}-{n}-seed{seed}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/extract.py"
