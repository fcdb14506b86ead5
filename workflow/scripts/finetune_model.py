from mergeflow.finetune import finetune
from mergeflow.logs import setup_job

setup_job(snakemake.log[0], snakemake.threads)
finetune(snakemake.params.name, snakemake.params.spec, snakemake.input[0], snakemake.output[0],
         snakemake.params.evaluation)
