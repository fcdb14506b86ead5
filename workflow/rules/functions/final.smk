# Input functions of the final stage's rules (final.smk).

# The final merge is scored on each task's test split (responses/) and, after a search whose
# fitness estimates the search split's accuracy, on its objectives' whole search split too
# (search_responses/), to check those estimates.
FINAL_SPLITS = {"responses": "test", "search_responses": "search"}


def final_split_file(wildcards):
    return f"results/data/{wildcards.task}/{FINAL_SPLITS[wildcards.scored]}.parquet"


def estimate_checked_tasks(run):
    """The objectives on which a search ended on estimates: its final merge's estimates are checked there."""
    if run not in EVOLVE or not config["runs"][run]["evolve"]["check_estimate"]:
        return []
    fit = EVOLVE[run].fitness
    return [t for t in EVOLVE[run].tasks if EVOLVE[run].kind.estimates(fit, config["tasks"][t]["splits"]["search"])]


def final_table_inputs(wildcards):
    run = wildcards.run
    tasks = run_tasks(config, run)
    inputs = {"responses": [f"results/responses/{t}/test/{m}.parquet" for t in tasks for m in TABLE_MODELS]}
    if run in EVOLVE:
        inputs["merged"] = [f"results/runs/{run}/final/responses/{t}.parquet" for t in tasks]
        inputs["history"] = f"{evolve_dir(run)}/history.parquet"
        inputs["merged_search"] = [f"results/runs/{run}/final/search_responses/{t}.parquet"
                                   for t in estimate_checked_tasks(run)]
    return inputs


def pareto_test_tasks(wildcards):
    """Task -> test split, scorer and delimiter (and chat keys, where the task has them) for scoring
    a run's Pareto members."""
    tasks = config["tasks"]
    return canonical({t: {"split": f"results/data/{t}/test.parquet", "scorer": tasks[t]["scorer"],
                          "delimiter": tasks[t]["target_delimiter"],
                          **chat_keys(tasks[t])}
                      for t in run_tasks(config, wildcards.run)})


# How the final model's card names its sources (Hugging Face's base_model): hub ids where the
# model came from the hub, else the config's model names.
MODEL_IDS = [config["models"][m].get("hub", m) for m in [config["base_model"], *config["endpoints"]]]
