# The evolution loop as a static DAG: ask(g) -> fitness(g, shard) -> tell(g), per run.
# All three are `run:` jobs. Under the default profile (force-use-threads) they execute inside
# the Snakemake process, so the source models loaded by the first fitness job stay resident
# for every later generation; on a cluster fitness is an ordinary submitted job. ask and tell
# are light (no model) and always run on the submitting host.
from mergeflow.evolve.stages import ask, fitness, tell
from mergeflow.logs import job_log, pin_threads

# What a fitness kind may need per task (its `needs`), as paths: the one place that maps them.
NEED_PATHS = {
    "split": lambda task, fit: f"results/data/{task}/search.parquet",
    "anchors": lambda task, fit: (f"results/anchors/{task}/{fit['anchors']['strategy']}-{fit['anchors']['n']}"
                                  f"-seed{fit['anchors']['seed']}.parquet"),
    "irt": lambda task, fit: f"results/irt/{task}/items.parquet",
}


def evolve_params(wildcards):
    """The run's search settings; the number of generations is left out so that extending a
    finished search reruns nothing it already did."""
    return canonical(asdict(EVOLVE[wildcards.run]))


def fitness_files(wildcards):
    """Objective -> need -> path: input lists cannot say which file is whose task."""
    cfg = EVOLVE[wildcards.run]
    needs = FITNESS[cfg.fitness["kind"]].needs
    return canonical({t: {need: NEED_PATHS[need](t, cfg.fitness) for need in needs} for t in cfg.tasks})


def fitness_inputs(wildcards):
    return {
        "candidates": f"{evolve_dir(wildcards.run)}/gen_{wildcards.g}/candidates.parquet",
        "models": search_model_inputs(wildcards),
        "needs": sorted({p for per_task in fitness_files(wildcards).values() for p in per_task.values()}),
    }


def previous_generation(wildcards):
    g = int(wildcards.g)
    if g == 0:
        return {}
    prev = f"{evolve_dir(wildcards.run)}/gen_{g - 1}"
    return {"state": f"{prev}/optimizer.pkl", "history": f"{prev}/history.parquet"}


def shard_files(wildcards):
    return [f"{evolve_dir(wildcards.run)}/gen_{wildcards.g}/fitness_{k}.parquet"
            for k in range(EVOLVE[wildcards.run].shards)]


# Adapters of the `run:` jobs below: the snakemake objects -> a mergeflow.evolve.stages function.
def ask_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        ask(EvolveConfig(**params.evolve), int(wildcards.g), input.get("state"), input.get("history"),
            output.candidates, output.state)


def fitness_job(input, output, params, wildcards, threads, log):
    with job_log(log[0]):
        pin_threads(threads)
        fitness(EvolveConfig(**params.evolve), params.tasks, params.evaluation, int(wildcards.g), int(wildcards.k),
                input.candidates, params.files, output[0])


def tell_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        tell(EvolveConfig(**params.evolve), int(wildcards.g), input.asked, input.candidates, list(input.fitness),
             input.get("history"), output.state, output.history, output.best)


localrules:
    ask,
    tell,


rule ask:
    input:
        unpack(previous_generation),
        models=search_model_inputs,
    output:
        candidates="results/runs/{run}/evolve/gen_{g}/candidates.parquet",
        state="results/runs/{run}/evolve/gen_{g}/asked.pkl",
    params:
        evolve=evolve_params,
    log:
        "results/logs/evolve/{run}/gen_{g}/ask.log",
    benchmark:
        "results/runs/{run}/evolve/gen_{g}/benchmark/ask.tsv"
    run:
        ask_job(input, output, params, wildcards, log)


rule fitness:
    input:
        unpack(fitness_inputs),
        check="results/check.json",
    output:
        "results/runs/{run}/evolve/gen_{g}/fitness_{k}.parquet",
    params:
        evolve=evolve_params,
        tasks=lambda wc: canonical({t: config["tasks"][t] for t in EVOLVE[wc.run].tasks}),
        evaluation=canonical(config["evaluation"]),
        files=fitness_files,
    threads: 1
    resources:
        gpu=1 if config["evaluation"]["device"] != "cpu" else 0,
    log:
        "results/logs/evolve/{run}/gen_{g}/fitness_{k}.log",
    benchmark:
        "results/runs/{run}/evolve/gen_{g}/benchmark/fitness_{k}.tsv"
    run:
        fitness_job(input, output, params, wildcards, threads, log)


rule tell:
    input:
        unpack(previous_generation),
        asked="results/runs/{run}/evolve/gen_{g}/asked.pkl",
        candidates="results/runs/{run}/evolve/gen_{g}/candidates.parquet",
        fitness=shard_files,
    output:
        state="results/runs/{run}/evolve/gen_{g}/optimizer.pkl",
        history="results/runs/{run}/evolve/gen_{g}/history.parquet",
        best="results/runs/{run}/evolve/gen_{g}/best/recipe.yaml",
    params:
        evolve=evolve_params,
    log:
        "results/logs/evolve/{run}/gen_{g}/tell.log",
    benchmark:
        "results/runs/{run}/evolve/gen_{g}/benchmark/tell.tsv"
    run:
        tell_job(input, output, params, wildcards, log)


rule history:
    input:
        lambda wc: f"{last_generation(wc.run)}/history.parquet",
    output:
        "results/runs/{run}/evolve/history.parquet",
    params:
        # the copy is redone when the search is extended, even though gen_{G-1} is a new file
        generations=lambda wc: generations(wc.run),
    log:
        "results/logs/evolve/{run}/history.log",
    conda:
        CONDA_ENV
    shell:
        "cp {input} {output} 2> {log}"


rule best_weights:
    input:
        recipe="results/runs/{run}/evolve/gen_{g}/best/recipe.yaml",
        models=search_model_inputs,
    output:
        directory("results/runs/{run}/evolve/gen_{g}/best/model"),
    params:
        lineage=lambda wc: {"run": wc.run, "generation": int(wc.g)},
    log:
        "results/logs/evolve/{run}/gen_{g}/best_weights.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/merge_recipe.py"
