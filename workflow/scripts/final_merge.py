from mergeflow.final import final_merge
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
final_merge(snakemake.input.recipe, snakemake.output[0], snakemake.params.lineage, snakemake.input.history,
            snakemake.params.result)
