"""Item Response Theory for cheap fitness: MERGE³'s Extract and Estimate steps.

* :mod:`mergeflow.irt.responses` — load long-format response parquet into a models × items matrix.
* :mod:`mergeflow.irt.fit` — a fitted IRT model (:class:`~mergeflow.irt.fit.IRTFit`): item
  parameters and abilities, saved as parquet + safetensors + JSON; ability fits for new models.
  No Pyro, no torch: what the estimators need at search time.
* :mod:`mergeflow.irt.model` — 1PL / 2PL / multidimensional 2PL in Pyro, fitted by SVI.
* :mod:`mergeflow.irt.anchors` — anchor items: random, correctness clustering, IRT clustering.
* :mod:`mergeflow.irt.estimators` — full-split accuracy from anchor responses: mean, p-IRT,
  gp-IRT, mp-IRT, gmp-IRT, each with a posterior predictive sd.
* :mod:`mergeflow.irt.simulate` — synthetic responses from known IRT parameters (tests, bench).

The names below are the vocabulary of the config schema and the CLI (a test checks the schema's
enums against them); they live here so that reading them imports neither Pyro nor torch.
"""

KINDS = ("1pl", "2pl", "m2pl")  # IRT models (irt.model)
STRATEGIES = ("random", "correctness", "irt")  # anchor selection (irt.anchors)
ESTIMATORS = ("mean", "pirt", "gpirt", "mpirt", "gmpirt")  # accuracy estimators (irt.estimators)
LAMBDA_RULES = ("variance", "fitted")  # how gp-IRT / gmp-IRT set their blend weight
SCORE_MODES = ("threshold", "reject")  # what to do with non-binary scores (irt.responses)
