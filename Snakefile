# mergeflow: evolutionary model merging as a reproducible Snakemake pipeline.
# Stages live in workflow/rules/*.smk; the library in workflow/mergeflow; config keys in config/README.md.
from snakemake.utils import min_version

min_version("8.0")


# The embedded default, only when no --configfile is given: a user's config file stands alone
# (several --configfile files are merged in order, e.g. the default plus an overlay).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/zoo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/check.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/respond.smk"
include: "workflow/rules/irt.smk"
include: "workflow/rules/evolve.smk"
include: "workflow/rules/final.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
