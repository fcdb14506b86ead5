"""A fitted IRT model and what reading and using one needs, without Pyro.

The response of model ``j`` to item ``i`` is Bernoulli with

    logit P(correct) = αᵢ · θⱼ − βᵢ          (tinyBenchmarks' form; θⱼ, αᵢ ∈ R^d)

with αᵢ = 1 (``1pl``), αᵢ = exp(log αᵢ) (``2pl``) or αᵢ ∈ R^d (``m2pl``). An :class:`IRTFit`
holds the variational posterior of a fit (a mean-field Normal per latent site) and is saved as
``items.parquet`` + ``posterior.safetensors`` + ``fit.json``; :func:`load_irt` reads it back.
:func:`fit_ability` and :func:`map_ability` place a new model on the fit's ability scale.

Fitting lives in :mod:`mergeflow.irt.model`; this module imports neither Pyro nor torch, so
estimating fitness from anchors at search time does not load them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from mergeflow.errors import MergeflowError

FORMAT = "mergeflow-irt/1"  # written into fit.json and checked on load


@dataclass
class IRTFit:
    """A fitted IRT model: the variational posterior plus what is needed to use it.

    ``params`` maps ``"<site>.loc"`` / ``"<site>.scale"`` to arrays: the mean-field Normal of
    every latent site (``theta``, ``beta``, ``log_alpha`` or ``alpha``, hyperparameters).
    """

    kind: str
    dim: int
    item_ids: list
    models: list[str]
    params: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)
    _index_cache: dict | None = field(default=None, init=False, repr=False, compare=False)

    # -- item parameters -------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, item_ids: Sequence) -> np.ndarray:
        """Positions of ``item_ids`` in this fit; unknown items raise."""
        lookup = self._lookup()
        missing = [item for item in item_ids if item_key(item) not in lookup]
        if missing:
            raise MergeflowError(
                f"items not in the IRT fit: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        return np.array([lookup[item_key(item)] for item in item_ids], dtype=int)

    def _lookup(self) -> dict:
        if self._index_cache is None:
            self._index_cache = {item_key(item): pos for pos, item in enumerate(self.item_ids)}
        return self._index_cache

    def alpha_mean(self) -> np.ndarray:
        """Posterior mean discriminations, shape (n_items, dim)."""
        if self.kind == "1pl":
            return np.ones((self.n_items, 1))
        if self.kind == "2pl":
            loc, scale = self.params["log_alpha.loc"], self.params["log_alpha.scale"]
            return np.exp(loc + scale**2 / 2)[:, None]
        return self.params["alpha.loc"].astype(float)

    def alpha_sd(self) -> np.ndarray:
        if self.kind == "1pl":
            return np.zeros((self.n_items, 1))
        if self.kind == "2pl":
            loc, scale = self.params["log_alpha.loc"], self.params["log_alpha.scale"]
            mean = np.exp(loc + scale**2 / 2)
            return (mean * np.sqrt(np.expm1(scale**2)))[:, None]
        return self.params["alpha.scale"].astype(float)

    def beta_mean(self) -> np.ndarray:
        return self.params["beta.loc"].astype(float)

    def beta_sd(self) -> np.ndarray:
        return self.params["beta.scale"].astype(float)

    def sample_items(self, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draws from the item posterior: alpha (S, n_items, dim) and beta (S, n_items)."""
        beta = self.beta_mean() + self.beta_sd() * rng.standard_normal((n_samples, self.n_items))
        if self.kind == "1pl":
            alpha = np.ones((n_samples, self.n_items, 1))
        elif self.kind == "2pl":
            loc, scale = self.params["log_alpha.loc"], self.params["log_alpha.scale"]
            alpha = np.exp(loc + scale * rng.standard_normal((n_samples, self.n_items)))[..., None]
        else:
            loc, scale = self.params["alpha.loc"], self.params["alpha.scale"]
            alpha = loc + scale * rng.standard_normal((n_samples,) + loc.shape)
        return alpha, beta

    # -- abilities -------------------------------------------------------------------------

    def theta_mean(self) -> np.ndarray:
        """Posterior mean abilities of the calibration models, shape (n_models, dim)."""
        return self.params["theta.loc"].astype(float)

    def theta_of(self, model: str) -> np.ndarray:
        if model not in self.models:
            raise MergeflowError(f"model {model!r} was not in the IRT fit's calibration data")
        return self.theta_mean()[self.models.index(model)]

    def probability(self, theta: np.ndarray, item_index: np.ndarray | None = None) -> np.ndarray:
        """P(correct) at posterior-mean item parameters for ability ``theta`` (dim,)."""
        alpha, beta = self.alpha_mean(), self.beta_mean()
        if item_index is not None:
            alpha, beta = alpha[item_index], beta[item_index]
        return sigmoid(alpha @ np.asarray(theta, dtype=float) - beta)

    # -- persistence -----------------------------------------------------------------------

    def items_frame(self) -> pd.DataFrame:
        """Posterior mean and sd of each item's α (per dimension) and β."""
        frame = pd.DataFrame({"item_id": self.item_ids})
        frame["beta_mean"] = self.beta_mean()
        frame["beta_sd"] = self.beta_sd()
        alpha_mean, alpha_sd = self.alpha_mean(), self.alpha_sd()
        for k in range(alpha_mean.shape[1]):
            frame[f"alpha_mean_{k}"] = alpha_mean[:, k]
            frame[f"alpha_sd_{k}"] = alpha_sd[:, k]
        return frame

    def save(self, directory: str | Path) -> Path:
        """Write ``items.parquet``, ``posterior.safetensors`` and ``fit.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.items_frame().to_parquet(directory / "items.parquet", index=False)
        tensors = {name: np.ascontiguousarray(value, dtype=np.float32)
                   for name, value in self.params.items()}
        # one metadata key: safetensors writes its metadata map in hash order, which changes from
        # one process to the next, and the same fit must give the same bytes
        save_file(tensors, str(directory / "posterior.safetensors"),
                  metadata={"mergeflow": json.dumps({"format": FORMAT, "kind": self.kind, "dim": self.dim},
                                                    sort_keys=True)})
        record = {"format": FORMAT, "kind": self.kind, "dim": self.dim, "models": self.models,
                  "n_items": self.n_items, **self.info}
        (directory / "fit.json").write_text(json.dumps(record, indent=1, default=_json_default))
        return directory


def load_irt(directory: str | Path) -> IRTFit:
    """Read a fit written by :meth:`IRTFit.save`."""
    directory = Path(directory)
    for name in ("items.parquet", "posterior.safetensors", "fit.json"):
        if not (directory / name).exists():
            raise MergeflowError(f"IRT fit directory {directory} has no {name}")
    record = json.loads((directory / "fit.json").read_text())
    if record.get("format") != FORMAT:
        raise MergeflowError(f"{directory / 'fit.json'} is not a {FORMAT} record")
    items = pd.read_parquet(directory / "items.parquet", columns=["item_id"])
    params = {name: value.astype(np.float64)
              for name, value in load_file(str(directory / "posterior.safetensors")).items()}
    info = {key: value for key, value in record.items()
            if key not in ("format", "kind", "dim", "models", "n_items")}
    item_ids = [item_key(item) for item in items["item_id"].tolist()]
    fit = IRTFit(record["kind"], int(record["dim"]), item_ids, list(record["models"]), params, info)
    if len(fit.item_ids) != len(params["beta.loc"]):
        raise MergeflowError(f"{directory}: items.parquet and posterior.safetensors disagree")
    return fit


# --------------------------------------------------------------------------------------------
# Abilities of new models
# --------------------------------------------------------------------------------------------


def fit_ability(
    fit: IRTFit,
    item_ids: Sequence,
    responses: Sequence[float] | np.ndarray,
    prior_sd: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """MAP ability of a new model from its responses, item parameters fixed at posterior means.

    The prior is the fit's N(0, prior_sd² I). Returns ``(theta_map, theta_sd)``, both of shape
    ``(dim,)``; the sd comes from the Laplace approximation (inverse Hessian at the MAP).
    """
    y = np.asarray(responses, dtype=float)
    if y.shape != (len(item_ids),):
        raise MergeflowError(f"{len(item_ids)} item ids but responses of shape {y.shape}")
    keep = ~np.isnan(y)
    if not np.isin(y[keep], (0.0, 1.0)).all():
        raise MergeflowError("fit_ability needs 0/1 responses")
    index = fit.item_index(list(item_ids))[keep]
    theta, covariance = map_ability(fit.alpha_mean()[index], fit.beta_mean()[index], y[keep], prior_sd)
    return theta, np.sqrt(np.diag(covariance))


def map_ability(alpha: np.ndarray, beta: np.ndarray, y: np.ndarray, prior_sd: float = 1.0,
                max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method for the MAP of θ under logit p = αθ − β and a N(0, prior_sd² I) prior.

    Returns the MAP and the Laplace covariance. The objective is strictly concave, so Newton
    steps with step halving converge from θ = 0.
    """
    dim = alpha.shape[1]
    precision = np.eye(dim) / prior_sd**2
    theta = np.zeros(dim)
    objective = _ability_objective(alpha, beta, y, precision, theta)
    for _ in range(max_iter):
        p = sigmoid(alpha @ theta - beta)
        gradient = alpha.T @ (y - p) - precision @ theta
        hessian = (alpha * (p * (1 - p))[:, None]).T @ alpha + precision
        step = np.linalg.solve(hessian, gradient)
        for _ in range(30):
            candidate = theta + step
            new_objective = _ability_objective(alpha, beta, y, precision, candidate)
            if new_objective >= objective - 1e-12:
                break
            step = step / 2
        theta, improvement, objective = candidate, new_objective - objective, new_objective
        if np.max(np.abs(step)) < 1e-8 or improvement < 1e-10:
            break
    p = sigmoid(alpha @ theta - beta)
    hessian = (alpha * (p * (1 - p))[:, None]).T @ alpha + precision
    return theta, np.linalg.inv(hessian)


def _ability_objective(alpha, beta, y, precision, theta) -> float:
    z = alpha @ theta - beta
    loglik = np.sum(y * z - np.logaddexp(0.0, z))
    return float(loglik - 0.5 * theta @ precision @ theta)


# --------------------------------------------------------------------------------------------
# Helpers (also the fit's and the estimators')
# --------------------------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, written with tanh so that large |z| neither overflows nor warns."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z)))


def logit(p: np.ndarray) -> np.ndarray:
    """The inverse of :func:`sigmoid`, for p in (0, 1)."""
    return np.log(p) - np.log1p(-p)


def item_key(item) -> object:
    """Item ids compare by value whether they came back from parquet as numpy or Python scalars."""
    return item.item() if isinstance(item, np.generic) else item


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
