from mergeflow.logs import setup_job
from mergeflow.publish import results_readme

setup_job(snakemake.log[0])
i, p = snakemake.input, snakemake.params
results_readme(p.runs, list(i.provenance), dict(zip(p.runs, i.tables)), i.get("summary") or None, list(i.figures),
               list(i.models), p.configfiles, snakemake.output.readme, snakemake.output.requirements)
