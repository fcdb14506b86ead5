from mergeflow.data import split_task, write_splits
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
parts = split_task(snakemake.wildcards.task, snakemake.params.task, snakemake.params.seed)
write_splits(parts, {"search": snakemake.output.search, "test": snakemake.output.test})
