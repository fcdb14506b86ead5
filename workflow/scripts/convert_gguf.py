from mergeflow.gguf import convert_gguf
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
convert_gguf(snakemake.params.name, snakemake.params.spec, snakemake.output[0])
