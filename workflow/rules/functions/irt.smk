# Input functions of the irt stage's rules (irt.smk).


def calibration_checkpoints(wildcards):
    if not (config.get("zoo") and config["irt"]["calibration"]["checkpoints"]):
        return []
    return [f"results/zoo/checkpoints/{e}" for e in sorted(config["zoo"]["experts"])]


def endpoint_search_responses(wildcards):
    return [f"results/responses/{wildcards.task}/search/{m}.parquet" for m in EVAL_MODELS]
