from mergeflow.final import best_weights
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
best_weights(snakemake.input.recipe, snakemake.output[0], snakemake.params.lineage)
