from pathlib import Path

from mergeflow.logs import setup_job
from mergeflow.zoo.build import build_expert

setup_job(snakemake.log[0], snakemake.threads)
build_expert(snakemake.params.zoo, snakemake.wildcards.expert, Path(snakemake.input[0]),
             Path(snakemake.output.model), Path(snakemake.output.checkpoints))
