# The evolution loop as a static DAG, per run: ask(g) -> fitness(g, rung 0, shard) ->
# promote(g, 0) -> fitness(g, rung 1, shard) -> ... -> tell(g); a fitness kind of one rung
# (full, anchors) has no promote. All are `run:` jobs. Under the default profile (force-use-threads) they execute inside
# the Snakemake process, so the source models loaded by the first fitness job stay resident
# for every later generation; on a cluster fitness is an ordinary submitted job (one per shard,
# side by side). ask, promote and tell are light (no model) and, like history's copy, always run
# on the submitting host.


include: "functions/evolve.smk"


localrules:
    ask,
    promote,
    tell,
    history,


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
    output:
        fitness="results/runs/{run}/evolve/gen_{g}/rung_{r}/fitness_{k}.parquet",
        responses="results/runs/{run}/evolve/gen_{g}/rung_{r}/responses_{k}.parquet",
    params:
        evolve=evolve_params,
        tasks=lambda wc: canonical({t: config["tasks"][t] for t in EVOLVE[wc.run].tasks}),
        evaluation=lambda wc: answer_settings(config["evaluation"], EVOLVE[wc.run].kind.batch_invariant),
        files=fitness_files,
    threads: 1
    resources:
        **MODEL_JOB,
    log:
        "results/logs/evolve/{run}/gen_{g}/rung_{r}/fitness_{k}.log",
    benchmark:
        "results/runs/{run}/evolve/gen_{g}/benchmark/fitness_{r}_{k}.tsv"
    run:
        fitness_job(input, output, params, wildcards, threads, log)


rule promote:
    input:
        promote_inputs,
    output:
        "results/runs/{run}/evolve/gen_{g}/rung_{r}/promoted.parquet",
    params:
        evolve=evolve_params,
    log:
        "results/logs/evolve/{run}/gen_{g}/rung_{r}/promote.log",
    benchmark:
        "results/runs/{run}/evolve/gen_{g}/benchmark/promote_{r}.tsv"
    run:
        promote_job(input, output, params, wildcards, log)


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
    resources:
        **CPU_JOB,
    log:
        "results/logs/evolve/{run}/gen_{g}/best_weights.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/best_weights.py"
