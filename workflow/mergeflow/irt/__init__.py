"""Item Response Theory for cheap fitness: MERGE³'s Extract and Estimate steps.

* :mod:`mergeflow.irt.responses` — load long-format response parquet into a models × items matrix.
* :mod:`mergeflow.irt.model` — 1PL / 2PL / multidimensional 2PL in Pyro, fitted by SVI, saved
  as parquet + safetensors + JSON; ability fits for new models.
* :mod:`mergeflow.irt.anchors` — anchor items: random, correctness clustering, IRT clustering.
* :mod:`mergeflow.irt.estimators` — full-split accuracy from anchor responses: mean, p-IRT,
  gp-IRT, mp-IRT, gmp-IRT, each with a posterior predictive sd.
"""
