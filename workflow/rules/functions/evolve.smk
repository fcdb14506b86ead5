# Input functions of the evolve stage's rules (evolve.smk), and the adapters of its `run:` jobs.
from mergeflow.evaluate import job_evaluation
from mergeflow.evolve.stages import FitnessJob, ask, fitness, promote, tell
from mergeflow.logs import job_log, pin_threads


def evolve_params(wildcards):
    """The run's search settings; the number of generations is left out so that extending a
    finished search reruns nothing it already did."""
    return canonical(asdict(EVOLVE[wildcards.run]))


def fitness_files(wildcards):
    """Objective -> need -> path: input lists cannot say which file is whose task."""
    cfg = EVOLVE[wildcards.run]
    return canonical(need_paths(cfg.fitness, cfg.tasks))


def rungs(run, g):
    """The rungs generation ``g`` climbs: from its first (its bracket's) to the top."""
    return EVOLVE[run].kind.climbed(EVOLVE[run].fitness, int(g))


def rung_files(run, g, rung, what):
    """A rung's shard files: ``fitness`` rows or ``responses`` (its candidates' answers)."""
    return [f"{evolve_dir(run)}/gen_{g}/rung_{rung}/{what}_{k}.parquet" for k in range(EVOLVE[run].shards)]


def fitness_inputs(wildcards):
    run, g, rung = wildcards.run, wildcards.g, int(wildcards.r)
    inputs = {
        "candidates": f"{evolve_dir(run)}/gen_{g}/candidates.parquet",
        "models": search_model_inputs(wildcards),
        "needs": sorted({p for per_task in fitness_files(wildcards).values() for p in per_task.values()}),
    }
    climbed = [r for r in rungs(run, g) if r < rung]
    if climbed:  # the previous rung's promotions, and the answers of every rung climbed below
        inputs["promoted"] = f"{evolve_dir(run)}/gen_{g}/rung_{rung - 1}/promoted.parquet"
        inputs["earlier"] = [p for r in climbed for p in rung_files(run, g, r, "responses")]
    return inputs


def promote_inputs(wildcards):
    return rung_files(wildcards.run, wildcards.g, int(wildcards.r), "fitness")


def previous_generation(wildcards):
    g = int(wildcards.g)
    if g == 0:
        return {}
    prev = f"{evolve_dir(wildcards.run)}/gen_{g - 1}"
    return {"state": f"{prev}/optimizer.pkl", "history": f"{prev}/history.parquet"}


def shard_files(wildcards):
    """Every climbed rung's fitness shards of a generation: what tell reads."""
    return [p for r in rungs(wildcards.run, wildcards.g) for p in rung_files(wildcards.run, wildcards.g, r, "fitness")]


# The `run:` jobs' adapters: the snakemake objects -> a mergeflow.evolve.stages function.
def ask_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        ask(EvolveConfig(**params.evolve), int(wildcards.g), input.get("state"), input.get("history"),
            output.candidates, output.state)


def fitness_job(input, output, params, wildcards, threads, log):
    with job_log(log[0]):
        pin_threads(threads)
        job = FitnessJob(int(wildcards.g), int(wildcards.r), int(wildcards.k), input.candidates,
                         input.get("promoted"), tuple(input.get("earlier", [])), output.fitness, output.responses)
        fitness(EvolveConfig(**params.evolve), params.tasks, job_evaluation(params.evaluation, config["evaluation"]),
                params.files, job)


def promote_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        promote(EvolveConfig(**params.evolve), int(wildcards.g), int(wildcards.r), list(input), output[0])


def tell_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        tell(EvolveConfig(**params.evolve), int(wildcards.g), input.asked, input.candidates, list(input.fitness),
             input.get("history"), output.state, output.history, output.best)
