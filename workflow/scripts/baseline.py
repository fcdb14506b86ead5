from mergeflow.logs import setup_job
from mergeflow.report import baseline_merge

setup_job(snakemake.log[0])
p = snakemake.params
baseline_merge(p.baseline, p.base, p.sources, snakemake.output.recipe, snakemake.output.model)
