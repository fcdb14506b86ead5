from mergeflow.figures import pareto_figure
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
i = snakemake.input
pareto_figure(snakemake.wildcards.run, i.history, i.members, i.table, snakemake.output[0])
