from mergeflow.evolve.stages import EvolveConfig, evaluate_shard
from mergeflow.logs import setup_job

setup_job(snakemake.log[0], snakemake.threads)
cfg = EvolveConfig(**snakemake.params.evolve)
tasks = cfg.tasks
i = snakemake.input
evaluate_shard(cfg, snakemake.params.tasks, snakemake.params.evaluation, snakemake.params.endpoints,
               int(snakemake.wildcards.g), int(snakemake.wildcards.k), i.candidates, dict(zip(tasks, i.splits)),
               dict(zip(tasks, i.get("anchors", []))), {t: p.rsplit("/", 1)[0] for t, p in zip(tasks, i.get("irt", []))},
               snakemake.output[0])
