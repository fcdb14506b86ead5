from mergeflow.check import run_model_check
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
p = snakemake.params
run_model_check(snakemake.wildcards.model, p.models, p.base, snakemake.output[0], p.tokenizer_source)
