from mergeflow.logs import setup_job
from mergeflow.report import final_table

setup_job(snakemake.log[0])
i, p = snakemake.input, snakemake.params
final_table(p.run, list(i.responses), list(i.get("merged", [])), i.get("history"), p.tasks, p.models,
            snakemake.output.table, snakemake.output.summary, dict(zip(p.checked, i.get("merged_search", []))),
            p.result)
