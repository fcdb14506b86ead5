from mergeflow.evolve.stages import EvolveConfig, evaluate_shard
from mergeflow.logs import setup_job

setup_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
evaluate_shard(EvolveConfig(**p.evolve), p.tasks, p.evaluation, p.endpoints, int(snakemake.wildcards.g),
               int(snakemake.wildcards.k), snakemake.input.candidates, p.files["splits"], p.files.get("anchors", {}),
               p.files.get("irt", {}), snakemake.output[0])
