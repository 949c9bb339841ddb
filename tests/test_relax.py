"""Batched FIRE (eqcalc.relax) against ASE's optimizers, and ASE's optimizers with the calculator.

The shipped default model in float64 gives real minima (an untrained network may have none).
"""
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS

from eqcalc import EquivariantCalculator
from eqcalc.engine import md
from eqcalc.errors import InvalidOptionError
from eqcalc.model import Model
from eqcalc.engine.relax import relax


@pytest.fixture(scope="module")
def model():
    return Model("default", device="cpu", compile="eager", dtype="float64")


def systems():
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.info.pop("adsorbate_info")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    slab.rattle(0.05, seed=2)
    co = molecule("CO")
    co.center(vacuum=5.0)
    co.positions[1, 2] += 0.1
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=3)
    return [slab, co, cu]


def ase_relax(atoms, model, optimizer, fmax, filter=None):
    atoms = atoms.copy()
    atoms.calc = EquivariantCalculator(model)
    target = filter(atoms) if filter else atoms
    e0 = atoms.get_potential_energy()
    assert optimizer(target, logfile=None).run(fmax=fmax, steps=500)
    return atoms, e0


def test_batched_fire_converges_each_system_and_matches_ase(model):
    inputs = systems()
    result = relax(inputs, md.ModelPotential(model), fmax=0.02)
    assert all(result.converged) and len(set(result.steps)) > 1  # each stopped on its own
    calc = EquivariantCalculator(model)
    for atoms, start in zip(result.structures, inputs):
        f = calc.predict([atoms])[0]["forces"]  # independent check of the final forces
        free = np.ones(len(atoms), bool)
        if start.constraints:
            free[start.constraints[0].index] = False
            np.testing.assert_array_equal(atoms.positions[~free], start.positions[~free])
        assert np.linalg.norm(f[free], axis=1).max() <= 0.02
    for k, start in enumerate(inputs):
        fire, e0 = ase_relax(start, model, FIRE, 0.02)
        bfgs, _ = ase_relax(start, model, BFGS, 0.02)
        assert result.energy[k] < e0 - 1e-4  # it went downhill
        assert result.energy[k] == pytest.approx(fire.get_potential_energy(), abs=1e-6)  # same path as ASE FIRE
        assert result.energy[k] == pytest.approx(bfgs.get_potential_energy(), abs=2e-3)  # same minimum


def test_batched_lbfgs_follows_ase_lbfgs(model):
    inputs = systems()
    result = relax(inputs, md.ModelPotential(model), fmax=0.02, optimizer="lbfgs")
    assert all(result.converged)
    for k, start in enumerate(inputs):
        atoms = start.copy()
        atoms.calc = EquivariantCalculator(model)
        opt = LBFGS(atoms, logfile=None)
        assert opt.run(fmax=0.02, steps=500)
        assert result.energy[k] == pytest.approx(atoms.get_potential_energy(), abs=1e-6)  # same path
        assert result.steps[k] == opt.nsteps
        np.testing.assert_allclose(result.structures[k].positions, atoms.positions, atol=1e-5)


def test_cell_filter_relaxes_bulk_and_leaves_slabs_cell(model):
    strained = bulk("Cu", "fcc", a=3.75, cubic=True)
    strained.rattle(0.02, seed=4)
    slab = systems()[0]
    result = relax([strained, slab], md.ModelPotential(model), fmax=0.01, cell=True)
    assert all(result.converged)
    cu = result.structures[0]
    stress = EquivariantCalculator(model).predict([cu])[0]["stress"]
    assert np.abs(stress[:3]).max() * cu.get_volume() / len(cu) <= 0.01  # the virial criterion
    ref, _ = ase_relax(strained, model, BFGS, 0.01, FrechetCellFilter)
    assert cu.get_volume() == pytest.approx(ref.get_volume(), rel=2e-3)
    assert cu.get_volume() < strained.get_volume() * 0.97  # it shrank from the stretched cell
    assert result.energy[0] == pytest.approx(ref.get_potential_energy(), abs=1e-3)
    np.testing.assert_array_equal(result.structures[1].cell.array, slab.cell.array)


@pytest.fixture(scope="module")
def slab_minimum(model):
    """Energy of the slab of :func:`systems` relaxed by the batched engine to 0.01 eV/Å."""
    result = relax(systems()[:1], md.ModelPotential(model), fmax=0.01)
    assert result.converged[0]
    return float(result.energy[0])


@pytest.mark.parametrize("optimizer", [BFGS, FIRE, LBFGS], ids=["BFGS", "FIRE", "LBFGS"])
def test_ase_optimizers_with_fixatoms(model, optimizer, slab_minimum):
    """ASE's optimizer with the calculator reaches the minimum the batched engine finds, and
    forces evaluated afresh there (not the optimizer's cached ones) are below fmax."""
    slab = systems()[0]
    relaxed, e0 = ase_relax(slab, model, optimizer, 0.03)
    fixed = slab.constraints[0].index
    np.testing.assert_array_equal(relaxed.positions[fixed], slab.positions[fixed])
    free = np.setdiff1d(np.arange(len(slab)), fixed)
    fresh = EquivariantCalculator(model, skin=0.0).predict([relaxed])[0]
    assert np.linalg.norm(fresh["forces"][free], axis=1).max() <= 0.03
    assert fresh["energy"] == pytest.approx(relaxed.get_potential_energy(), abs=1e-10)
    assert slab_minimum < e0 - 1e-3
    assert fresh["energy"] == pytest.approx(slab_minimum, abs=2e-3)  # the same minimum


def test_relax_rejects_bad_options(model):
    with pytest.raises(InvalidOptionError, match="fmax"):
        relax(systems()[:1], md.ModelPotential(model), fmax=-1)
    with pytest.raises(InvalidOptionError, match="optimizer"):
        relax(systems()[:1], md.ModelPotential(model), optimizer="newton")


@pytest.mark.parametrize("optimizer,cell", [("fire", False), ("lbfgs", False), ("fire", True)])
def test_converged_systems_leave_the_batch(optimizer, cell):
    """A system is evaluated only until it converges, and follows the path it follows alone (EMT:
    ASE's own physics through the engine)."""
    from tests.md_potentials import EMTPotential

    inputs = systems()
    pot = EMTPotential()
    batch = relax(inputs, pot, fmax=0.02, optimizer=optimizer, cell=cell)
    assert all(batch.converged) and len(set(batch.steps)) == len(inputs)
    n = [len(a) for a in inputs]
    assert pot.atom_evaluations == sum(n_s * (s + 1) for n_s, s in zip(n, batch.steps))
    for k, atoms in enumerate(inputs):
        alone = relax([atoms], EMTPotential(), fmax=0.02, optimizer=optimizer, cell=cell)
        assert alone.steps[0] == batch.steps[k]
        np.testing.assert_allclose(alone.structures[0].positions, batch.structures[k].positions, atol=1e-10)
        np.testing.assert_allclose(alone.structures[0].cell.array, batch.structures[k].cell.array, atol=1e-10)
        assert alone.energy[0] == pytest.approx(batch.energy[k], abs=1e-10)
