from mergeflow.evolve.stages import EvolveConfig, ask
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
prev = snakemake.input
ask(EvolveConfig(**snakemake.params.evolve), int(snakemake.wildcards.g), prev.get("state"), prev.get("history"),
    snakemake.output.candidates, snakemake.output.state)
