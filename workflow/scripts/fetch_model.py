from mergeflow.fetch import fetch_hub_model
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
fetch_hub_model(snakemake.params.hub, snakemake.params.revision, snakemake.output[0])
