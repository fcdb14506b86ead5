from mergeflow.figures import best_genome
from mergeflow.logs import setup_job
from mergeflow.spaces import build_space

setup_job(snakemake.log[0])
space = build_space(snakemake.params.search_space)
best_genome(snakemake.wildcards.run, snakemake.input.history, snakemake.params.result, space, snakemake.output[0])
