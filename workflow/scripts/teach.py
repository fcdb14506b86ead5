from mergeflow.evaluate import job_evaluation, teach
from mergeflow.logs import setup_job

setup_job(snakemake.log[0], snakemake.threads)
teach(snakemake.params.model, snakemake.input.split_file, snakemake.params.scorer, snakemake.params.delimiter,
      job_evaluation(snakemake.params.evaluation, snakemake.config["evaluation"]), snakemake.output[0])
