from mergeflow.logs import setup_job
from mergeflow.report import final_table

setup_job(snakemake.log[0])
final_table(snakemake.input, snakemake.params.tasks, snakemake.params.models,
            snakemake.output.table, snakemake.output.summary)
