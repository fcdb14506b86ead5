from mergeflow.logs import setup_job
from mergeflow.report import merge_with_lineage

setup_job(snakemake.log[0])
merge_with_lineage(snakemake.input.recipe, snakemake.output[0], snakemake.params.lineage,
                   snakemake.input.get("history"))
