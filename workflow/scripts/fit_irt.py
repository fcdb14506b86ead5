from mergeflow.irt.model import fit_irt
from mergeflow.irt.responses import load_response_matrix
from mergeflow.logs import setup_job

setup_job(snakemake.log[0], snakemake.threads)
irt = snakemake.params.irt
matrix = load_response_matrix([*snakemake.input.endpoints, snakemake.input.calibration])
fit = fit_irt(matrix, kind=irt["kind"], dim=irt["dim"], steps=irt["steps"], lr=irt["lr"], device=irt["device"],
              seed=snakemake.params.seed)
fit.save(snakemake.output.item_params.rsplit("/", 1)[0])
