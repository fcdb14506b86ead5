import pandas as pd

from mergeflow.evolve.history import pareto_front
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
pareto_front(pd.read_parquet(snakemake.input[0]), snakemake.params.tasks).to_parquet(snakemake.output[0], index=False)
