# Input functions of the evolve stage's rules (evolve.smk), and the adapters of its `run:` jobs.
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


# The `run:` jobs' adapters: the snakemake objects -> a mergeflow.evolve.stages function.
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
