from mergeflow.figures import search_progress
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
search_progress(snakemake.wildcards.run, snakemake.input.history, snakemake.params.result, snakemake.output[0],
                snakemake.input.table, snakemake.params.fitness_label)
