from mergeflow.logs import setup_job
from mergeflow.publish import final_model

setup_job(snakemake.log[0])
final_model(snakemake.wildcards.run, snakemake.input.merge, snakemake.input.table, snakemake.params.model_ids,
            snakemake.output[0])
