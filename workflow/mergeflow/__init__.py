"""mergeflow: evolutionary model merging as a reproducible Snakemake pipeline.

The library is pure Python and knows nothing of Snakemake; the workflow's rules call it through
few-line scripts in ``workflow/scripts``.
"""

__version__ = "0.1.0"
