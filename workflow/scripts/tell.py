from mergeflow.evolve.stages import EvolveConfig, tell
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
i, o = snakemake.input, snakemake.output
tell(EvolveConfig(**snakemake.params.evolve), int(snakemake.wildcards.g), i.asked, i.candidates, list(i.fitness),
     i.get("history"), o.state, o.history, o.best)
