from pathlib import Path

from mergeflow.irt.anchors import select_anchors
from mergeflow.irt.fit import load_irt
from mergeflow.irt.responses import load_response_matrix
from mergeflow.logs import setup_job

setup_job(snakemake.log[0])
w = snakemake.wildcards
matrix = load_response_matrix([*snakemake.input.endpoints, snakemake.input.calibration])
fit = load_irt(Path(snakemake.input.irt).parent)
anchors = select_anchors(matrix, fit, strategy=w.strategy, n=int(w.n), seed=int(w.seed))
anchors.to_parquet(snakemake.output[0], index=False)
