from mergeflow.figures import cost_figure
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
objectives = snakemake.params.objectives
cost_figure(dict(zip(objectives, snakemake.input)), objectives, snakemake.output[0])
