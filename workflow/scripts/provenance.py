from mergeflow.logs import setup_job
from mergeflow.provenance import write_provenance

setup_job(snakemake.log[0])
write_provenance(snakemake.params.config, snakemake.params.run, snakemake.output[0], list(snakemake.input.checks))
