from pathlib import Path

from mergeflow.calibrate import calibrate
from mergeflow.evaluate import job_evaluation
from mergeflow.logs import setup_job

setup_job(snakemake.log[0], snakemake.threads)
p = snakemake.params
checkpoints = [str(c) for d in snakemake.input.checkpoints for c in sorted(Path(d).iterdir()) if c.is_dir()]
calibrate(snakemake.wildcards.task, p.task, snakemake.input.split, p.base, p.sources, checkpoints, p.calibration,
          p.seed, job_evaluation(p.evaluation, snakemake.config["evaluation"]), snakemake.output[0])
