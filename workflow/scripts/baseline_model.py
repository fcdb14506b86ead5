from mergeflow.baseline import baseline_model
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
p = snakemake.params
baseline_model(p.baseline, p.base, p.sources, snakemake.output.recipe, snakemake.output.model)
