from mergeflow.check import run_model_check
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
run_model_check(snakemake.wildcards.model, snakemake.params.models, snakemake.params.base, snakemake.output[0])
