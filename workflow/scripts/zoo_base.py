from pathlib import Path

from mergeflow.logs import setup_job
from mergeflow.zoo.build import build_base

setup_job(snakemake.log[0], snakemake.threads)
build_base(snakemake.params.zoo, Path(snakemake.output[0]))
