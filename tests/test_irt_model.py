"""IRT fitting: parameter recovery, masking, serialisation, ability fits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from mergeflow.errors import MergeflowError
from mergeflow.irt.fit import fit_ability, load_irt
from mergeflow.irt.model import _Responses, fit_irt
from mergeflow.irt.responses import ResponseMatrix
from mergeflow.irt.simulate import simulate_irt

WORKFLOW = Path(__file__).resolve().parents[1] / "workflow"


@pytest.fixture(scope="module")
def small_fit():
    sim = simulate_irt(40, 150, seed=1)
    return sim, fit_irt(sim.matrix, steps=150, min_steps=150, seed=0)


def test_parameter_recovery_2pl_200_models_2000_items():
    sim = simulate_irt(200, 2000, seed=7)
    fit = fit_irt(sim.matrix, kind="2pl", seed=0)
    assert np.corrcoef(fit.beta_mean(), sim.beta)[0, 1] >= 0.95
    assert np.corrcoef(fit.alpha_mean()[:, 0], sim.alpha[:, 0])[0, 1] >= 0.9
    assert fit.info["heldout_loglik"] > np.log(0.5)


def test_masked_cells_do_not_enter_the_likelihood():
    rng = np.random.default_rng(0)
    values = (rng.random((6, 9)) < 0.5).astype(float)
    train = rng.random((6, 9)) < 0.7
    garbage = np.where(train, values, 1.0 - values)
    theta, alpha, beta = torch.randn(6, 1), torch.rand(9, 1) + 0.5, torch.randn(9)
    first = _Responses(values, train, torch.device("cpu")).item_loglik(theta, alpha, beta, None)
    second = _Responses(garbage, train, torch.device("cpu")).item_loglik(theta, alpha, beta, None)
    assert torch.allclose(first, second)
    logits = theta @ alpha.T - beta
    reference = dist.Bernoulli(logits=logits).log_prob(torch.as_tensor(values, dtype=torch.float32))
    expected = (reference * torch.as_tensor(train)).sum(0)
    assert torch.allclose(first, expected, atol=1e-4)


def test_items_every_model_answered_alike_and_missing_responses():
    sim = simulate_irt(30, 60, seed=2)
    values = sim.matrix.matrix.copy()
    values[:, 0] = 1.0  # everyone right
    values[:, 1] = 0.0  # everyone wrong
    values[::3, 5:20] = np.nan  # missing responses
    matrix = ResponseMatrix(values, sim.matrix.models, sim.matrix.items)
    fit = fit_irt(matrix, steps=100, min_steps=100)
    for value in fit.params.values():
        assert np.isfinite(value).all()
    assert np.isfinite(fit.items_frame().drop(columns="item_id").to_numpy()).all()
    assert fit.beta_mean()[0] < fit.beta_mean()[1]  # the easy item is easier


@pytest.mark.parametrize("kind,dim,batch", [("1pl", 1, None), ("m2pl", 2, None), ("2pl", 1, 32)])
def test_other_kinds_and_mini_batches(kind, dim, batch):
    sim = simulate_irt(20, 80, seed=3)
    fit = fit_irt(sim.matrix, kind=kind, dim=dim, steps=30, batch_size=batch)
    assert fit.alpha_mean().shape == (80, dim)
    assert np.isfinite(fit.theta_mean()).all()


def test_save_and_load_round_trip_without_pickle(tmp_path, small_fit):
    _, fit = small_fit
    fit.save(tmp_path / "irt")
    assert sorted(p.name for p in (tmp_path / "irt").iterdir()) == [
        "fit.json", "items.parquet", "posterior.safetensors"]
    record = json.loads((tmp_path / "irt" / "fit.json").read_text())
    assert {"elbo_trace", "converged", "heldout_loglik", "models"} <= set(record)
    loaded = load_irt(tmp_path / "irt")
    assert loaded.item_ids == fit.item_ids and loaded.models == fit.models
    assert np.allclose(loaded.alpha_mean(), fit.alpha_mean(), atol=1e-5)
    assert np.allclose(loaded.beta_sd(), fit.beta_sd(), atol=1e-6)
    alpha, beta = loaded.sample_items(5, np.random.default_rng(0))
    assert alpha.shape == (5, fit.n_items, 1) and beta.shape == (5, fit.n_items)


def test_fit_is_seeded(small_fit):
    sim, fit = small_fit
    again = fit_irt(sim.matrix, steps=150, min_steps=150, seed=0)
    assert np.array_equal(again.params["beta.loc"], fit.params["beta.loc"])


def test_fit_ability_tracks_the_true_ability(small_fit):
    sim, fit = small_fit
    strong = int(np.argmax(sim.theta[:, 0]))
    weak = int(np.argmin(sim.theta[:, 0]))
    items = fit.item_ids
    theta_strong, sd_strong = fit_ability(fit, items, sim.matrix.matrix[strong])
    theta_weak, _ = fit_ability(fit, items, sim.matrix.matrix[weak])
    assert theta_strong[0] > theta_weak[0]
    assert 0 < sd_strong[0] < 1


def test_bad_fit_arguments(small_fit):
    sim, _ = small_fit
    with pytest.raises(MergeflowError, match="kind"):
        fit_irt(sim.matrix, kind="3pl")
    with pytest.raises(MergeflowError, match="holdout"):
        fit_irt(sim.matrix, holdout_fraction=1.5)
    with pytest.raises(MergeflowError, match="binary"):
        fit_irt(ResponseMatrix(np.full((3, 3), 0.5), ["a", "b", "c"], [1, 2, 3]))


def test_the_fit_records_how_far_its_accuracy_curve_misses_the_calibration_models():
    well_specified = simulate_irt(100, 400, seed=3)
    assert fit_irt(well_specified.matrix, steps=600, seed=0).info["accuracy_misfit_sd"] < 0.005
    # half the items reward the opposite of the ability the other half rewards: a 2PL (α > 0)
    # cannot follow both, so accuracy at a model's own θ is off by several points
    rng = np.random.default_rng(0)
    theta, beta = rng.standard_normal(60), rng.standard_normal(300)
    logits = np.concatenate([2 * theta[:, None] - beta[:150], -2 * theta[:, None] - beta[150:]], axis=1)
    y = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(float)
    mixed = ResponseMatrix(y, [f"m{i}" for i in range(60)], [f"i{j}" for j in range(300)])
    assert fit_irt(mixed, steps=600, seed=0).info["accuracy_misfit_sd"] > 0.03


@pytest.mark.slow
def test_a_saved_fit_is_the_same_bytes_from_any_process(tmp_path):
    """posterior.safetensors and fit.json hold no wall time and no hash-ordered map: two
    processes saving the same fit write the same files."""
    script = (
        "import sys; from mergeflow.irt.model import fit_irt; from mergeflow.irt.simulate import simulate_irt\n"
        "fit_irt(simulate_irt(20, 40, seed=2).matrix, steps=30, min_steps=30, seed=0).save(sys.argv[1])\n"
    )
    for name in ("a", "b"):
        run_fresh(script, str(tmp_path / name))
    for file in ("posterior.safetensors", "fit.json", "items.parquet"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


@pytest.mark.slow
def test_estimating_from_a_fit_imports_neither_pyro_nor_torch():
    """Fitness at search time reads a saved fit and estimates from anchors: a fresh process doing
    those imports must not load Pyro or torch (only fitting, in irt.model, needs them)."""
    script = (
        "import sys, mergeflow.irt.estimators, mergeflow.irt.anchors, mergeflow.irt.fit\n"
        "print(sorted({'pyro', 'torch'} & set(sys.modules)))\n"
    )
    loaded = run_fresh(script).strip()
    assert loaded == "[]", loaded


def run_fresh(script: str, *args: str) -> str:
    """Run ``script`` in a fresh Python that imports this checkout's library; return its stdout."""
    env = {**os.environ, "PYTHONPATH": str(WORKFLOW)}
    return subprocess.run([sys.executable, "-c", script, *args], env=env, check=True, capture_output=True,
                          text=True).stdout
