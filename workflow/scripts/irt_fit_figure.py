from mergeflow.figures import irt_fit_figure
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
i = snakemake.input
irt_fit_figure(snakemake.params.task, i.irt.rsplit("/", 1)[0], list(i.responses), list(i.anchors), list(i.tables),
               snakemake.output[0])
