from pathlib import Path

from mergeflow.logs import setup_job
from mergeflow.zoo.build import write_task_sources

setup_job(snakemake.log[0])
write_task_sources(snakemake.params.zoo, Path(snakemake.output[0]).parent)
