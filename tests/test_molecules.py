"""GFN2-xTB molecule data (the ``xtb`` extra): labels are tblite's, MD-sampled, split by blocks,
seeded, and the same training pipeline learns from them."""
import json
import sys

import numpy as np
import pytest
from ase import units

from eqcalc.errors import InvalidOptionError, MissingDependencyError
from potentials import data
from potentials.molecules import REFERENCE, generate_molecules, xtb_calculator
from potentials.train import train


@pytest.fixture(scope="module")
def molecules(tmp_path_factory):
    path = tmp_path_factory.mktemp("xtb") / "mol.xyz"
    return generate_molecules(path, 60, molecules=("CH3OH", "H2O"), seed=3, interval=5, block=5, equilibration_steps=50)


def test_labels_are_gfn2_xtb_of_the_stored_geometry(molecules):
    frames = data.read_dataset(molecules)
    assert len(frames) == 60
    assert {f.info["molecule"] for f in frames} == {"CH3OH", "H2O"}
    assert data.summary(frames)["reference"] == REFERENCE
    for f in frames[::17]:
        stored = data.labels(f)
        fresh = f.copy()
        fresh.calc = xtb_calculator()
        assert abs(fresh.get_potential_energy() - stored["energy"]) < 1e-6
        # 1e-4 eV/Å differences are SCC convergence: MD restarts each step from the previous
        # wavefunction, the fresh calculator from scratch (the energy agrees to 1e-6 eV).
        np.testing.assert_allclose(fresh.get_forces(), stored["forces"], atol=5e-4)
        assert not f.pbc.any() and "stress" not in stored


def test_frames_are_md_samples_at_the_temperature(molecules):
    frames = data.read_dataset(molecules)
    positions = np.stack([f.positions for f in frames if f.info["molecule"] == "CH3OH"])
    # consecutive frames differ (MD moved) but stay bonded (no explosion): 0.01 Å < RMS step < 0.5 Å
    steps = np.sqrt(((positions[1:] - positions[:-1]) ** 2).sum(-1).mean(-1))
    assert steps.min() > 0.01 and steps.max() < 0.5
    energies = np.array([data.labels(f)["energy"] for f in frames if f.info["molecule"] == "CH3OH"])
    # thermal fluctuation of the potential energy at 500 K for 6 atoms: harmonic estimate
    # kT sqrt(12 / 2) = 0.1 eV; measured 0.037-0.075 eV over seeds (few, correlated frames)
    assert 0.02 < energies.std() < 0.2
    # equipartition on the stored momenta (Langevin, fixcm=False: 3N dof): the kinetic
    # temperature of all frames pooled; 60 correlated frames measured 311-592 K over seeds 3-6
    # for the 500 K target (451 K for this seed), so a thermostat off by 2x falls outside
    kinetic = sum(f.get_kinetic_energy() for f in frames)
    temperature = kinetic / (1.5 * units.kB * sum(len(f) for f in frames))
    assert 250 < temperature < 800


def test_splits_by_block_and_seeded(molecules, tmp_path):
    frames = data.read_dataset(molecules)
    split_of = {}
    for f in frames:
        assert split_of.setdefault(f.info["group"], f.info["split"]) == f.info["split"]
    sizes = [sum(f.info["group"] == g for f in frames) for g in split_of]
    assert max(sizes) == 5 and set(split_of.values()) == {"train", "val", "test"}
    again = generate_molecules(tmp_path / "again.xyz", 60, molecules=("CH3OH", "H2O"), seed=3,
                               interval=5, block=5, equilibration_steps=50)
    for a, b in zip(frames, data.read_dataset(again)):
        np.testing.assert_array_equal(a.positions, b.positions)


def test_training_pipeline_learns_molecules(molecules, tmp_path):
    config = dict(data=str(molecules), architecture="painn",
                  model=dict(features=8, num_interactions=1, num_radial=8),
                  batch_size=4, max_steps=40, warmup_steps=4, val_every=20, lr=5e-3, seed=1,
                  work_dir=str(tmp_path), output=str(tmp_path / "mol.eqm"), progress=False,
                  plots=False, patience=100)
    train(config)
    history = json.loads((tmp_path / "history.json").read_text())
    assert min(h["val_loss"] for h in history[1:]) < history[0]["val_loss"]
    assert json.loads((tmp_path / "metrics.json").read_text())["test_forces_mae_meV_per_A"] > 0


def test_missing_tblite_and_bad_options_are_typed(monkeypatch, tmp_path):
    with pytest.raises(InvalidOptionError, match="g2"):
        generate_molecules(tmp_path / "x.xyz", 2, molecules=("NotAMolecule",))
    with pytest.raises(InvalidOptionError, match="positive"):
        generate_molecules(tmp_path / "x.xyz", 0)
    monkeypatch.setitem(sys.modules, "tblite.ase", None)  # import now fails like a missing extra
    with pytest.raises(MissingDependencyError, match=r"\.\[xtb\]"):
        xtb_calculator()


def test_datagen_command_writes_xtb_frames(tmp_path):
    from eqcalc.cli import main

    path = tmp_path / "water.xyz"
    assert main(["datagen", str(path), "--reference", "xtb", "--molecules", "H2O",
                 "--n-structures", "4"]) == 0
    frames = data.read_dataset(path)
    assert len(frames) == 4 and {f.info["reference"] for f in frames} == {REFERENCE}
