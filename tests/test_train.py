"""Training: a short run lowers the validation loss, resume is exact, and each documented piece
(least-squares reference energies, loss, EMA, warm-up + cosine, clipping, early stopping) does what
the README says, checked from outside the training loop."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import potentials
from potentials import data
from eqcalc import package
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


def _train_split(dataset, species):
    """(counts per species, energies) of the train split, read here with ASE."""
    import ase.io
    import numpy as np

    frames = [a for a in ase.io.read(dataset, ":") if a.info["split"] == "train"]
    counts = np.array([[a.get_chemical_symbols().count(s) for s in species] for a in frames], float)
    return counts, np.array([a.get_potential_energy() for a in frames])


def test_reference_energies_are_least_squares(dataset, tmp_path):
    """Before training, the model's per-species energy shift holds the least-squares fit of the
    train-split energies to element counts (computed here with numpy), and species absent from
    the data keep zero. The species order is deliberately not the sorted one."""
    import numpy as np

    from potentials.train import fit_reference_energies

    species = ["O", "Pt", "N", "H", "Cu", "C"]  # N is not in the data
    # one step at lr 1e-12 (0 is refused): the weights move by ~1e-12, far below the tolerance
    path = train(_config(dataset, tmp_path, max_steps=1, lr=1e-12, weight_decay=0.0, species=species))
    counts, energies = _train_split(dataset, species)
    present = counts.sum(0) > 0
    expected = np.zeros(len(species))
    expected[present] = np.linalg.lstsq(counts[:, present], energies, rcond=None)[0]
    assert not present[species.index("N")] and present.sum() == 5
    shift = potentials.load(path).scale_shift.shift.detach().double().numpy()
    np.testing.assert_allclose(shift, expected, rtol=1e-5, atol=1e-5)  # float32 parameters
    stored = package.read(path).metadata["training"]["reference_energies_eV"]
    assert list(stored) == species
    np.testing.assert_allclose(list(stored.values()), expected, atol=1e-6)
    # the fit itself, on exact synthetic data: recovers the energies to rounding
    rng = np.random.default_rng(0)
    n = rng.integers(0, 6, size=(30, 4))
    n[:, 2] = 0
    frames = [type("F", (), {"species": torch.tensor(np.repeat(np.arange(4), row)), "energy": e})()
              for row, e in zip(n, n @ np.array([-1.5, -3.25, 7.0, -0.5]))]
    np.testing.assert_allclose(fit_reference_energies(frames, 4), [-1.5, -3.25, 0.0, -0.5], atol=1e-10)


def test_loss_terms_are_the_documented_weighted_mses():
    """loss = w_E MSE(E/N) + w_F MSE(F) + w_S MSE(stress on frames with stress)."""
    from potentials.train import _loss

    out = {"energy": torch.tensor([1.0, -2.0], dtype=torch.float64),
           "forces": torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.3]], dtype=torch.float64),
           "stress": torch.zeros(2, 3, 3, dtype=torch.float64)}
    batch = {"n_atoms": torch.tensor([1.0, 2.0], dtype=torch.float64),
             "energy_ref": torch.tensor([0.5, -1.0], dtype=torch.float64),
             "forces_ref": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.1], [0.0, 0.0, -0.1]], dtype=torch.float64),
             "stress_mask": torch.tensor([False, True]),
             "stress_ref": torch.stack([torch.eye(3), 0.01 * torch.ones(3, 3)]).double()}
    terms = _loss(out, batch, (10.0, 1.0, 100.0))
    e = ((0.5 / 1) ** 2 + (-1.0 / 2) ** 2) / 2
    f = (0.01 + 0.04 + 0.01 + 0.16) / 9
    s = 1e-4  # only the second frame has stress
    assert float(terms["energy"]) == pytest.approx(e)
    assert float(terms["forces"]) == pytest.approx(f)
    assert float(terms["stress"]) == pytest.approx(s)
    assert float(terms["total"]) == pytest.approx(10 * e + f + 100 * s)


def test_ema_follows_its_formula():
    """EMA: shadow <- d shadow + (1 - d) weights with d = min(decay, (1 + step) / (10 + step))."""
    from potentials.train import EMA

    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, 0.9)
    expected = 1.0
    for step, w in enumerate([2.0, -1.0, 4.0, 0.5, 3.0, 3.0, 3.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * w
        assert float(ema.shadow["weight"]) == pytest.approx(expected, rel=1e-12)


def _scaled_validation_losses(monkeypatch, factors):
    """Make training see its k-th validation loss (k = 0: the starting point) multiplied by
    ``factors[k]`` (1 beyond the list), so a test chooses when validation improves."""
    import potentials.train as training

    real, calls = training.evaluate, []

    def evaluate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls.append(None)
        k = len(calls) - 1
        return dict(metrics, loss=metrics["loss"] * factors[k]) if k < len(factors) else metrics

    monkeypatch.setattr(training, "evaluate", evaluate)
    return calls


def test_early_stopping_after_patience_validations_without_improvement(dataset, tmp_path, monkeypatch):
    """Validation losses rising after the first validation (step 2): training stops after
    ``patience`` = 2 more validations (step 6), long before max_steps, and keeps step 2."""
    _scaled_validation_losses(monkeypatch, [1, 1, 10, 100, 1000, 1e4])
    train(_config(dataset, tmp_path, max_steps=40, val_every=2, patience=2))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["steps"] == 6 and metrics["best_step"] == 2


def test_schedule_clipping_ema_and_metrics_through_the_calculator(dataset, tmp_path, monkeypatch):
    """One short run checked from outside the training code:
    - the learning rate the optimizer used follows linear warm-up then cosine to min_lr_ratio
      (formula written here), read from the optimizer itself at every step;
    - gradients reach the optimizer clipped to clip_grad (measured at optimizer.step);
    - the saved model is the best EMA weights, not the raw ones (from the checkpoint);
    - the calculator path (neighbor list, package, compiled runner) gives the same test errors
      as training's own batched evaluation, with species given in an unsorted order."""
    import math

    from potentials.evaluate import evaluate

    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad.detach().flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], float(torch.cat(grads).norm())))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    lr, warmup, total, floor, clip = 5e-3, 4, 16, 0.1, 0.05
    path = train(_config(dataset, tmp_path, lr=lr, warmup_steps=warmup, max_steps=total, min_lr_ratio=floor,
                         clip_grad=clip, species=["O", "Pt", "H", "Cu", "C"]))
    monkeypatch.undo()
    expected = [lr * ((k + 1) / warmup if k < warmup else
                      floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))))
                for k in range(total)]
    assert [x for x, _ in seen] == pytest.approx(expected, rel=1e-12)
    norms = [n for _, n in seen]
    assert max(norms) <= clip * (1 + 1e-6)
    history = json.loads((tmp_path / "history.json").read_text())
    assert max(h["grad_norm"] for h in history[1:]) > 2 * clip  # clipping was doing something
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved = potentials.load(path).state_dict()
    for k, v in saved.items():
        assert torch.equal(v, ckpt["best_model"][k]), k
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in saved)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ours = evaluate(str(path), str(dataset), "test", compile="eager")
    assert ours["n_frames"] > 0 and ours["n_dropped"] == 0
    assert ours["energy_mae_meV_per_atom"] == pytest.approx(metrics["test_energy_mae_meV_per_atom"], rel=1e-4)
    assert ours["forces_mae_meV_per_A"] == pytest.approx(metrics["test_forces_mae_meV_per_A"], rel=1e-4)
    assert ours["structures_per_s"] > 0


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


def test_generate_extra_writes_each_extra_file_with_its_own_generator(dataset, tmp_path):
    """generate_extra: one mapping per extra_data file, near-minimum frames by default, reaction
    paths with kind: paths; an unknown kind is refused by name."""
    minima, paths = tmp_path / "m.xyz", tmp_path / "p.xyz"
    train(_config(dataset, tmp_path / "run", extra_data=[str(minima), str(paths)], max_steps=1,
                  generate_extra=[dict(n_structures=3, seed=1, elements=ELEMENTS),
                                  dict(kind="paths", n_paths=1, seed=1, elements=ELEMENTS)]))
    assert {f.info["kind"] for f in data.read_dataset(minima)} == {"near-minimum"}
    assert {f.info["kind"] for f in data.read_dataset(paths)} == {"path"}
    with pytest.raises(InvalidOptionError, match="kind='phonons'"):
        train(_config(dataset, tmp_path / "bad", extra_data=[str(tmp_path / "x.xyz")],
                      generate_extra=dict(kind="phonons")))


def test_select_last_saves_the_final_ema_weights(dataset, tmp_path, monkeypatch):
    """select="last" (the shipped default's recipe) writes the EMA weights at the end of the
    schedule, "best" those of the best validation. The final validation (step 6) is made to look
    worse than the one at step 4, so the two choices differ."""
    calls = _scaled_validation_losses(monkeypatch, [1, 1, 10])  # step 0, 4, 6
    for select in ("last", "best"):
        calls.clear()
        work = tmp_path / select
        path = train(_config(dataset, work, max_steps=6, val_every=4, select=select))
        ckpt = torch.load(work / "checkpoint.pt", weights_only=True)
        saved = potentials.load(path).state_dict()
        assert any(not torch.equal(ckpt["ema"][k], ckpt["best_model"][k]) for k in saved)  # the choice matters
        kept = ckpt["ema" if select == "last" else "best_model"]
        for k, v in saved.items():
            assert torch.equal(v, kept[k]), (select, k)
        assert json.loads((work / "metrics.json").read_text())["best_step"] == 4


def test_recipes_read_the_same_without_pyyaml(tmp_path, monkeypatch):
    """The fallback reader of potentials.make_models gives PyYAML's dict for every shipped recipe
    and for a block list of mappings (generate_extra of a fine-tune)."""
    import builtins
    from pathlib import Path

    from potentials.make_models import RECIPES, load_recipe

    sample = tmp_path / "r.yaml"
    sample.write_text("extra_data: [a.xyz, b.xyz]\nmodel:\n  features: 8\ngenerate_extra:\n"
                      "  - kind: paths\n    n_paths: 2\n  - n_structures: 3  # minima\nlr: 0.5\n")
    paths = sorted(Path(RECIPES).glob("*.yaml")) + [sample]
    with_yaml = [load_recipe(p) for p in paths]
    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    assert [load_recipe(p) for p in paths] == with_yaml
    assert with_yaml[-1]["generate_extra"] == [{"kind": "paths", "n_paths": 2}, {"n_structures": 3}]


def test_learning_rate_warms_up_linearly_then_falls_by_a_half_cosine_to_the_floor():
    """The schedule's documented shape, checked by its properties rather than its formula:
    linear from lr/warmup to lr over the warm-up steps, then a half cosine, symmetric about its
    midpoint, that ends at min_lr_ratio and never rises."""
    import numpy as np

    from potentials.train import _lr_factor

    warmup, total, floor = 5, 45, 0.1
    f = np.array([_lr_factor(s, warmup, total, floor) for s in range(total + 1)])
    np.testing.assert_allclose(f[:warmup], np.arange(1, warmup + 1) / warmup, rtol=1e-15)  # linear, reaches 1
    decay = f[warmup:]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(floor, abs=1e-15)
    assert (np.diff(decay) < 0).all()  # falls at every step
    mid = (total - warmup) // 2
    assert decay[mid] == pytest.approx((1 + floor) / 2, abs=1e-15)  # half-way down at half time
    np.testing.assert_allclose(decay - (1 + floor) / 2, -(decay[::-1] - (1 + floor) / 2), atol=1e-15)
    assert _lr_factor(total + 10, warmup, total, floor) == pytest.approx(floor)  # stays at the floor


def test_ema_of_steady_weights_is_those_weights_and_warm_start_follows_a_jump():
    """Two properties of an average: weights that never change average to themselves (for any
    decay); and with the warm start the average of weights that jumped at the first step has
    followed the jump after ten updates (more than 99 %), where a plain decay of 0.999 would
    still be within 1 % of the old value."""
    from potentials.train import EMA

    model = torch.nn.Linear(3, 2).double()
    steady = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, 0.999)
    for step in range(50):
        ema.update(model, step)
    for k, v in steady.items():
        assert torch.allclose(ema.shadow[k], v, rtol=1e-13, atol=0), k
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(10):
        ema.update(model, step)
    assert float(ema.shadow["weight"].min()) > 0.99


def test_loss_of_a_model_on_its_own_predictions():
    """Through collate and the training wrapper: labels equal to the model's own energies and
    forces give zero loss; adding n_atoms x 0.1 eV to every frame's energy label gives an energy
    term of exactly 0.01 (eV/atom)² whatever the frame sizes (a 1-atom and an 8-atom cell); the
    forces term stays zero."""
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    from potentials.train import Frame, _forward, _loss, collate, make_wrapper

    model = potentials.build("painn", ["Cu"], cutoff=4.0, features=8, num_interactions=1, num_radial=8,
                             dtype="float64")
    wrapper = make_wrapper(model, stress=False)
    structures = [bulk("Cu", "fcc", a=3.6), bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))]
    for k, a in enumerate(structures):
        a.rattle(0.05, seed=k)
        a.calc = SinglePointCalculator(a, energy=0.0, forces=np.zeros((len(a), 3)))
    batch = collate([Frame(a, {29: 0}) for a in structures], model.cutoff)
    out = _forward(wrapper, batch)
    assert out["forces"].abs().max() > 1e-3  # the rattled cells have forces
    own = dict(batch, energy_ref=out["energy"].detach(), forces_ref=out["forces"].detach())
    terms = _loss(out, own, (1.0, 1.0, 0.0))
    assert float(terms["energy"]) == 0.0 and float(terms["forces"]) == 0.0
    shifted = dict(own, energy_ref=own["energy_ref"] + 0.1 * batch["n_atoms"])
    terms = _loss(out, shifted, (1.0, 1.0, 0.0))
    assert float(terms["energy"]) == pytest.approx(0.01, rel=1e-10) and float(terms["forces"]) == 0.0


def test_training_starts_from_exact_per_element_energies(tmp_path):
    """Data whose energies are exactly sums of per-element energies (set here, by element name):
    before any learning, the written model's per-species shift holds each element's energy in
    the model's (unsorted) species order."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    per_element = {"Cu": -3.75, "O": -4.5, "Pt": -5.25}
    rng = np.random.default_rng(1)
    frames = []
    for k in range(12):
        a = bulk("Cu", "fcc", a=3.8, cubic=True)
        a.symbols[:] = rng.choice(list(per_element), size=len(a))
        a.rattle(0.02, seed=k)
        energy = sum(per_element[s] for s in a.get_chemical_symbols())
        a.calc = SinglePointCalculator(a, energy=energy, forces=np.zeros((len(a), 3)))
        a.info["split"] = ("train", "train", "val", "test")[k % 4] if k >= 4 else "train"
        frames.append(a)
    path = tmp_path / "exact.xyz"
    ase.io.write(path, frames)
    species = ["Pt", "Cu", "O"]
    out = train(_config(path, tmp_path, max_steps=1, lr=1e-12, weight_decay=0.0, species=species))
    shift = potentials.load(out).scale_shift.shift.detach().double().numpy()
    np.testing.assert_allclose(shift, [per_element[s] for s in species], atol=1e-5)  # float32 parameters
