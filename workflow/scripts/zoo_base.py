from pathlib import Path

from mergeflow.zoo.kernels import pin_kernels

pin_kernels(snakemake.params.zoo.get("kernels", "native"))  # before torch loads
from mergeflow.logs import setup_job  # noqa: E402
from mergeflow.zoo.build import build_base  # noqa: E402

setup_job(snakemake.log[0], snakemake.threads)
build_base(snakemake.params.zoo, Path(snakemake.output[0]))
