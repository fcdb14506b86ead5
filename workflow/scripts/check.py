from pathlib import Path

from mergeflow.check import run_check
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
run_check(snakemake.params.models, snakemake.params.base, Path(snakemake.output[0]))
