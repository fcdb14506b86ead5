from mergeflow.logs import setup_job
from mergeflow.report import compare_runs

setup_job(snakemake.log[0])
compare_runs(dict(zip(snakemake.params.runs, snakemake.input)), snakemake.output[0])
