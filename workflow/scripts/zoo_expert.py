from pathlib import Path

from mergeflow.zoo.kernels import pin_kernels

pin_kernels(snakemake.params.zoo.get("kernels", "native"))  # before torch loads
from mergeflow.logs import setup_job  # noqa: E402
from mergeflow.zoo.build import build_expert  # noqa: E402

setup_job(snakemake.log[0], snakemake.threads)
build_expert(snakemake.params.zoo, snakemake.wildcards.expert, Path(snakemake.input[0]),
             Path(snakemake.output.model), Path(snakemake.output.checkpoints))
