from mergeflow.lineage import merge_recipe
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
merge_recipe(snakemake.input.recipe, snakemake.output[0], snakemake.params.lineage, snakemake.input.get("history"))
