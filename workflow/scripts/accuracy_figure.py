from mergeflow.figures import accuracy_figure
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
accuracy_figure(dict(zip(snakemake.params.runs, snakemake.input)), snakemake.output[0])
