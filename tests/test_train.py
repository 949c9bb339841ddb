"""Training: a short run lowers the validation loss, resume is exact, the demo runs end to end."""
import json
from pathlib import Path

import pytest
import torch

import potentials
from potentials import data
from eqcalc.errors import InvalidOptionError
from potentials.train import train

ELEMENTS = ("Pt", "Cu", "C", "O", "H")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-data") / "emt.xyz"
    data.generate(path, 24, seed=5, elements=ELEMENTS)
    return path


def _config(dataset, work, **extra):
    config = dict(data=str(dataset), architecture="painn",
                  model=dict(features=8, num_interactions=1, num_radial=8),
                  batch_size=4, max_steps=16, warmup_steps=4, val_every=8, lr=5e-3, seed=1,
                  work_dir=str(work), output=str(work / "model.eqm"), progress=False, plots=False,
                  patience=100)
    config.update(extra)
    return config


def test_short_training_lowers_validation_loss(dataset, tmp_path):
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    path = train(_config(dataset, tmp_path, plots=True))
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["step"] == 0
    assert min(h["val_loss"] for h in history[1:]) < history[0]["val_loss"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_energy_mae_meV_per_atom"] > 0 and metrics["test_forces_mae_meV_per_A"] > 0
    for name in ("learning_curve.png", "energy_parity.png", "force_parity.png"):
        assert (tmp_path / name).stat().st_size > 0
    model = potentials.load(path)
    assert model.architecture == "painn"
    # the global torch state is left alone
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype


def test_resume_matches_uninterrupted_run(dataset, tmp_path):
    full = train(_config(dataset, tmp_path / "full"))
    partial = _config(dataset, tmp_path / "split", stop_after_steps=8)
    train(partial)
    assert not Path(partial["output"]).exists()
    resumed = train(dict(partial, stop_after_steps=None, resume=True))
    a, b = potentials.load(full).state_dict(), potentials.load(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_plateau_schedule_cuts_the_rate_after_patience_and_resumes_exactly(dataset, tmp_path):
    from potentials.train import _plateau_update

    state = {}
    for improved in (True, False, False, True, False, False, False):
        _plateau_update(state, improved, 0.5, 3)
    assert state["lr_scale"] == 0.5 and state["plateau_bad"] == 0  # only 3 misses in a row cut
    plateau = dict(schedule="plateau", plateau_patience=1, plateau_factor=0.3, val_every=4, lr=5e-2)
    full = train(_config(dataset, tmp_path / "full", **plateau))
    rates = [h["lr"] for h in json.loads((tmp_path / "full" / "history.json").read_text())[1:]]
    assert all(b <= a for a, b in zip(rates, rates[1:]))  # never raised again
    assert rates[-1] < rates[0]  # and cut at least once in this deliberately too-fast run
    partial = _config(dataset, tmp_path / "split", stop_after_steps=8, **plateau)
    train(partial)
    resumed = train(dict(partial, stop_after_steps=None, resume=True))
    a, b = potentials.load(full).state_dict(), potentials.load(resumed).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(InvalidOptionError, match="schedule"):
        train(_config(dataset, tmp_path / "bad", schedule="linear"))


def test_calculator_evaluation_matches_training_metrics(dataset, tmp_path):
    """The calculator path (neighbor list, package, compiled runner) and training's own batched
    evaluation give the same test errors for the same weights."""
    from potentials.evaluate import evaluate

    path = train(_config(dataset, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ours = evaluate(str(path), str(dataset), "test", compile="eager")
    assert ours["n_frames"] > 0 and ours["n_dropped"] == 0
    assert ours["energy_mae_meV_per_atom"] == pytest.approx(metrics["test_energy_mae_meV_per_atom"], rel=1e-4)
    assert ours["forces_mae_meV_per_A"] == pytest.approx(metrics["test_forces_mae_meV_per_A"], rel=1e-4)
    assert ours["structures_per_s"] > 0


def test_demo_end_to_end(tmp_path):
    from eqcalc.workflows.demo import run_demo

    result = run_demo(tmp_path, steps=4, relax_steps=2, trajectory_interval=2)
    assert abs(result["model_result"]["E_ads_eV"]) < 10
    assert result["emt_result"] is not None
    assert (tmp_path / "md.extxyz").exists() and (tmp_path / "md.png").exists()
    assert "E_ads" in result["summary"]


def test_gemnet_scaling_factors_are_fitted_before_training(dataset, tmp_path):
    """Scaling factors are buffers, not trained: values away from 1 in the written model come from
    the calibration on the first training batch."""
    from tests.conftest import TEST_HYPER

    hyper = {k: v for k, v in TEST_HYPER["gemnet"].items() if k != "cutoff"}
    path = train(_config(dataset, tmp_path, architecture="gemnet", model=hyper, cutoff=3.5, max_steps=2,
                         warmup_steps=1, val_every=2))
    scales = [float(v) for k, v in potentials.load(path).state_dict().items() if k.endswith(".scale") and v.dim() == 0]
    assert len(scales) >= 5 and any(abs(s - 1.0) > 0.05 for s in scales), scales


def test_fine_tune_starts_from_the_package_and_refuses_a_different_model(dataset, tmp_path):
    """init= starts from the package's weights (its validation loss at step 0 is far below a
    fresh model's), keeps its reference energies, trains on data + extra_data,
    and records where it came from; a recipe asking for another model is refused by name."""
    from eqcalc import package

    base = train(_config(dataset, tmp_path / "base"))
    extra = data.generate_near_minima(tmp_path / "minima.xyz", 3, seed=1, elements=ELEMENTS)
    tuned = train(_config(dataset, tmp_path / "tuned", init=str(base), extra_data=[str(extra)], lr=1e-3,
                          max_steps=2))
    fresh = train(_config(dataset, tmp_path / "fresh", extra_data=[str(extra)], max_steps=1))
    start = json.loads((tmp_path / "tuned" / "history.json").read_text())[0]
    start_fresh = json.loads((tmp_path / "fresh" / "history.json").read_text())[0]
    # step 0 of the fine-tune evaluates the base weights, not fresh ones
    assert start["val_loss"] < 0.5 * start_fresh["val_loss"]
    refs = lambda m: package.read(m).metadata["training"]["reference_energies_eV"]
    assert refs(tuned) == pytest.approx(refs(base), abs=1e-6)  # kept, not refitted
    card = package.read(tuned).metadata["training"]["data"]
    assert card["init"]["sha256"] == package.read(base).metadata["sha256"] and card["extra_files"] == ["minima.xyz"]
    with pytest.raises(InvalidOptionError, match="cutoff 4.0 vs the package's 5.0"):
        train(_config(dataset, tmp_path / "bad", init=str(base), cutoff=4.0))
    with pytest.raises(InvalidOptionError, match="model.features=16 vs the package's 8"):
        train(_config(dataset, tmp_path / "bad2", init=str(base), model=dict(features=16)))
