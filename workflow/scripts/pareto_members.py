from mergeflow.evaluate import job_evaluation
from mergeflow.logs import setup_job
from mergeflow.report import pareto_members

setup_job(snakemake.log[0], snakemake.threads)
o = snakemake.output
pareto_members(snakemake.wildcards.run, snakemake.input.pareto, snakemake.params.tasks,
               job_evaluation(snakemake.params.evaluation, snakemake.config["evaluation"]), o.models, o.table, o.summary)
