"""EquivariantCalculator inside ASE: caching, no side effects, constraints, pymatgen, skin reuse."""
import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, fcc111, add_adsorbate
from ase.constraints import FixAtoms
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from eqcalc import EquivariantCalculator
from eqcalc.model import Model


@pytest.fixture(scope="module")
def path(package_path):
    return package_path("painn", "float64")


def slab():
    s = fcc111("Pt", (2, 2, 3), a=3.92, vacuum=6.0)
    add_adsorbate(s, "O", 1.6, "fcc")
    s.set_constraint(FixAtoms(indices=[a.index for a in s if a.tag == 3]))
    return s


def test_properties_follow_metadata(path):
    calc = EquivariantCalculator(path, compile="eager")
    assert set(calc.implemented_properties) == {"energy", "free_energy", "energies", "forces", "stress"}
    assert calc.metadata["cutoff"] == 5.0 and calc.metadata["architecture"] == "painn"


def test_results_equal_an_independent_reference(path):
    """Energy, per-atom energies, forces and stress (ASE Voigt order) of EquivariantCalculator,
    one structure at a time through ASE and as one batch, equal those of a reference built here
    from ASE's own neighbor list, species lookup and Voigt conversion (tests/reference.py):
    mixed species, a cell smaller than the cutoff, a slab with an atom outside its cell, a
    molecule."""
    from potentials.testing import structures
    from tests.reference import ReferenceCalculator
    from tests.conftest import SPECIES

    calc = EquivariantCalculator(path, compile="eager", device="cpu")
    ref = ReferenceCalculator(calc.model)
    systems = list(structures(SPECIES, seed=4).values())
    batch = calc.predict(systems)
    for atoms, got in zip(systems, batch):
        atoms.calc = calc
        single = {k: atoms.calc.get_property(k, atoms) for k in ("energy", "energies", "forces")}
        if atoms.pbc.any():
            single["stress"] = atoms.get_stress()
        expected = {k: ref.get_property(k, atoms) for k in single}
        assert set(got) == set(expected)
        for result in (single, got):
            for k, value in expected.items():
                np.testing.assert_allclose(result[k], value, rtol=1e-12, atol=1e-12, err_msg=k)
        assert np.abs(expected["forces"]).max() > 1e-3 and np.ptp(expected["energies"]) > 1e-4


def test_results_are_cached_and_energies_sum_to_energy(path):
    calc = EquivariantCalculator(path, compile="eager")
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    a.rattle(0.05, seed=0)
    a.calc = calc
    e = a.get_potential_energy()
    calls = calc.neighbors.n_calls
    a.get_forces(), a.get_stress(), a.get_potential_energies()
    assert calc.neighbors.n_calls == calls  # served from ASE's cache
    assert a.get_potential_energies().sum() == pytest.approx(e, rel=1e-12)
    a.positions[0, 0] += 0.01
    a.get_potential_energy()
    assert calc.neighbors.n_calls == calls + 1


def test_atoms_and_global_torch_state_untouched(path):
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    a = slab()
    before = (a.positions.copy(), a.cell.array.copy(), a.pbc.copy(), a.numbers.copy())
    a.calc = EquivariantCalculator(path, compile="torchscript", dtype="float32")
    a.get_forces(), a.get_stress()
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == threads
    for x, y in zip(before, (a.positions, a.cell.array, a.pbc, a.numbers)):
        np.testing.assert_array_equal(x, y)


def test_float32_and_float64_agree(path):
    a = slab()
    r64 = EquivariantCalculator(path, compile="eager").predict([a])[0]
    r32 = EquivariantCalculator(path, compile="eager", dtype="float32").predict([a])[0]
    assert r32["forces"].dtype == np.float64
    np.testing.assert_allclose(r32["forces"], r64["forces"], atol=1e-4 * np.abs(r64["forces"]).max())


def test_pymatgen_structure_gives_the_same_answer(path):
    from pymatgen.io.ase import AseAtomsAdaptor

    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=2)
    calc = EquivariantCalculator(path, compile="eager")
    structure = AseAtomsAdaptor.get_structure(a)
    e_pmg = calc.get_potential_energy(structure)
    f_pmg = calc.get_forces(structure)
    a.calc = EquivariantCalculator(path, compile="eager")
    assert e_pmg == pytest.approx(a.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(f_pmg, a.get_forces(), atol=1e-12)


def test_pymatgen_structures_work_outside_the_calculator(tmp_path):
    """README: "A pymatgen Structure is accepted wherever Atoms is": the neighbor list drop-in,
    batched MD (with files), relaxation and the adsorption workflow give what Atoms give."""
    from pymatgen.io.ase import AseAtomsAdaptor

    from eqcalc.engine import md
    from eqcalc.engine.drivers import run_md
    from eqcalc.engine.relax import relax
    from eqcalc.neighbors import neighbor_list
    from eqcalc.workflows.adsorption import adsorption_energies
    from tests.md_potentials import MorsePotential

    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.05, seed=2)
    s = AseAtomsAdaptor.get_structure(a)
    for x, y in zip(neighbor_list("ijSd", s, 4.0), neighbor_list("ijSd", a, 4.0)):
        np.testing.assert_allclose(x, y, atol=1e-12)
    runs = [run_md([x], MorsePotential(), md.Langevin(2.0, 300.0), 4, temperature_K=300, interval=2,
                   output_dir=tmp_path / name).state for name, x in (("s", s), ("a", a))]
    # pymatgen's round trip moves coordinates by a few ulps, hence allclose, not equality
    torch.testing.assert_close(runs[0].positions, runs[1].positions, rtol=0, atol=1e-10)
    relaxed = [relax([x], MorsePotential(), fmax=0.05) for x in (s, a)]
    assert relaxed[0].energy[0] == pytest.approx(relaxed[1].energy[0], abs=1e-10) and relaxed[0].converged[0]
    slab = fcc111("Cu", (2, 2, 3), a=3.6, vacuum=6.0)
    slab.pbc = True  # a pymatgen Structure is periodic in 3D; the vacuum separates the images
    tables = [adsorption_energies(x, "O", MorsePotential(), kinds=("ontop",), max_steps=20).rows
              for x in (AseAtomsAdaptor.get_structure(slab), slab)]
    assert tables[0][0]["site"] == tables[1][0]["site"] == "ontop"
    assert tables[0][0]["E_ads_eV"] == pytest.approx(tables[1][0]["E_ads_eV"], abs=1e-8)


def test_a_model_returning_nan_raises_instead_of_returning_it(tmp_path):
    """Never return NaN: a model whose weights turn NaN after loading (a file with NaN weights
    is refused earlier, by package.check_weights) gives NonFiniteOutputError."""
    import potentials
    from eqcalc.errors import NonFiniteOutputError

    model = potentials.build("schnet", species=["Cu"], cutoff=5.0, dtype="float64", features=8, num_interactions=1)
    loaded = Model(str(potentials.save(model, tmp_path / "tiny.eqm")), device="cpu", compile="eager")
    with torch.no_grad():
        next(p for p in loaded.wrapper.parameters() if p.dim() == 2).view(-1)[0] = float("nan")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EquivariantCalculator(loaded)
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        atoms.get_potential_energy()


def test_fixatoms_hold_in_bfgs(path):
    a = slab()
    a.calc = EquivariantCalculator(path, compile="eager")
    fixed = a.constraints[0].index
    start, e0 = a.positions.copy(), a.get_potential_energy()
    BFGS(a, logfile=None).run(fmax=0.01, steps=8)
    np.testing.assert_array_equal(a.positions[fixed], start[fixed])
    assert a.get_potential_energy() < e0


def test_skin_reuses_the_list_in_md_and_changes_nothing(path):
    a = slab()
    a.calc = EquivariantCalculator(path, compile="eager", skin=0.5)
    ref = EquivariantCalculator(path, compile="eager", skin=0.0)
    fixed = a.constraints[0].index
    start = a.positions.copy()
    md = Langevin(a, 2 * units.fs, temperature_K=600, friction=0.02, fixcm=False, rng=np.random.default_rng(0))
    for _ in range(10):
        md.run(1)
        np.testing.assert_allclose(a.get_forces(apply_constraint=False), ref.get_forces(a), atol=1e-12)
    nl = a.calc.neighbors
    assert nl.n_builds < nl.n_calls and nl.n_builds >= 1
    np.testing.assert_array_equal(a.positions[fixed], start[fixed])


def test_import_eqcalc_pulls_no_training_code_or_optional_packages():
    import subprocess
    import sys

    code = ("import sys, eqcalc; bad = [m for m in ('potentials', 'pymatgen', 'torch_cluster', 'matplotlib') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
