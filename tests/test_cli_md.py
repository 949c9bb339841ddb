"""eqcalc md / relax / adsorption on tiny inputs: files written hold the physics they claim."""
import csv
import re

import ase.io
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.constraints import FixAtoms

from eqcalc import EquivariantCalculator
from eqcalc.cli import build_parser, main
from tests.reference import emt_relaxed


@pytest.fixture
def inputs(tmp_path):
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.info.pop("adsorbate_info")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    ase.io.write(tmp_path / "slab.extxyz", slab)
    cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    cu.rattle(0.03, seed=0)
    ase.io.write(tmp_path / "cu.extxyz", cu)
    co = molecule("CO")
    co.center(vacuum=4.0)
    ase.io.write(tmp_path / "co.xyz", co)
    return tmp_path


@pytest.mark.parametrize("command", ["md", "relax", "adsorption"])
def test_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"example:\n  eqcalc {command}" in capsys.readouterr().out


def test_md_writes_one_trajectory_per_input(inputs, package_path, capsys):
    model = package_path("painn", "float64", features=8, num_interactions=2)
    out = inputs / "run"
    args = ["md", str(inputs / "slab.extxyz"), str(inputs / "cu.extxyz"), str(inputs / "co.xyz"), "--model", model,
            "--thermostat", "bussi", "--temperature-K", "400", "--steps", "10", "--interval", "5",
            "--output-dir", str(out), "--checkpoint-interval", "5", "--no-progress"]
    assert main(args) == 0
    assert "3 systems (19 atoms)" in capsys.readouterr().out
    frames = ase.io.read(out / "slab.extxyz", ":")
    assert [f.info["step"] for f in frames] == [0, 5, 10]
    last = frames[-1]
    fixed = last.constraints[0].index
    assert len(fixed) == 4 and not last.get_momenta()[fixed].any()  # constraints read from the input
    ref = last.copy()
    ref.calc = EquivariantCalculator(model, compile="eager")
    # forces stored are the model's at the stored positions (both rounded to 1e-8 in the file)
    np.testing.assert_allclose(last.get_forces(), ref.get_forces(), atol=1e-6)
    assert np.abs(ref.get_forces()).max() > 1e-2
    assert len(ase.io.read(out / "cu.extxyz", ":")) == 3 and (out / "checkpoint.pt").exists()
    log = np.loadtxt(out / "md.log")
    assert log.shape == (3 * 3, 6) and (log[:, 3] > 0).all()  # step time system T Epot Etot
    # the last record of the slab: E_pot is the model's, E_tot - E_pot the frame's kinetic energy
    step, _, _, _, epot, etot = log[(log[:, 0] == 10) & (log[:, 2] == 0)][0]
    assert epot == pytest.approx(ref.get_potential_energy(), abs=2e-6)
    assert etot - epot == pytest.approx(last.get_kinetic_energy(), abs=2e-6)
    # continue the same run from its checkpoint
    assert main(args[:args.index("--steps")] + ["--steps", "15", "--interval", "5", "--output-dir", str(out),
                                                 "--restart", str(out / "checkpoint.pt"), "--no-progress",
                                                 "--checkpoint-interval", "5"]) == 0
    assert [f.info["step"] for f in ase.io.read(out / "slab.extxyz", ":")] == [0, 5, 10, 15]


def test_md_bad_options_exit_2(inputs, capsys):
    assert main(["md", str(inputs / "cu.extxyz"), "--thermostat", "berendsen", "--steps", "1"]) == 2
    assert "thermostat" in capsys.readouterr().err
    assert main(["md", str(inputs / "cu.extxyz"), "--timestep-fs", "-1"]) == 2
    assert main(["md", str(inputs / "missing.xyz")]) == 2


def test_relax_writes_relaxed_structures(inputs, capsys):
    out = inputs / "relaxed"
    assert main(["relax", str(inputs / "slab.extxyz"), str(inputs / "cu.extxyz"), "--cell", "--fmax", "0.03",
                 "--output-dir", str(out), "--optimizer", "lbfgs"]) == 0
    assert capsys.readouterr().out.count("converged ->") == 2
    for name in ("slab", "cu"):
        atoms = ase.io.read(out / f"{name}.extxyz")
        assert np.abs(atoms.get_forces()).max() <= 0.03
    assert ase.io.read(out / "cu.extxyz").get_volume() < ase.io.read(inputs / "cu.extxyz").get_volume()


@pytest.mark.parametrize("adsorbate", ["O", "CO"])
def test_adsorption_table(inputs, capsys, adsorbate):
    """``eqcalc adsorption`` with the default model: the table's E_ads are the energies of the
    written structures evaluated afresh, the adsorbate binds by its first atom, and every site's
    E_ads is within 0.05 eV of EMT's (the model's training reference) relaxed from there (measured
    at most 0.022 eV for CO)."""
    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    slab.info.pop("adsorbate_info")
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    ase.io.write(inputs / "pt.extxyz", slab)
    out = inputs / "ads"
    assert main(["adsorption", str(inputs / "pt.extxyz"), "--adsorbate", adsorbate, "--fmax", "0.05",
                 "--output-dir", str(out)]) == 0
    assert "E_ads" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "adsorption.csv")))
    assert {r["site"] for r in rows} == {"ontop", "bridge", "hollow-fcc", "hollow-hcp"}
    placements = ase.io.read(out / "placements.extxyz", ":")
    slab_out, gas = ase.io.read(out / "slab.extxyz"), ase.io.read(out / "gas.extxyz")
    fresh = EquivariantCalculator("default", compile="eager", device="cpu")
    e_slab, e_gas = (fresh.predict([x])[0]["energy"] for x in (slab_out, gas))
    emt_slab, emt_gas = (emt_relaxed(x).get_potential_energy() for x in (slab_out, gas))
    for row, atoms in zip(rows, placements):
        assert row["converged"] == "True"
        assert float(row["E_ads_eV"]) == pytest.approx(fresh.predict([atoms])[0]["energy"] - e_slab - e_gas, abs=1e-4)
        assert float(row["E_ads_eV"]) < 0  # both bind to Pt
        assert len(atoms.constraints[0].index) == 4  # the slab's bottom layer stayed fixed
        binding = 12 + atoms.get_chemical_symbols()[12:].index(adsorbate[0])  # C of CO
        assert atoms.positions[binding, 2] == atoms.positions[12:, 2].min()  # bound by it, pointing up
        if adsorbate == "CO":
            assert 1.10 < atoms.get_distance(12, 13) < 1.20
        emt = emt_relaxed(atoms).get_potential_energy() - emt_slab - emt_gas
        assert float(row["E_ads_eV"]) == pytest.approx(emt, abs=0.05), row["site"]
    hollow = min(float(r["E_ads_eV"]) for r in rows if r["site"].startswith("hollow"))
    ontop = float(next(r for r in rows if r["site"] == "ontop")["E_ads_eV"])
    assert hollow < ontop  # both prefer the hollow sites of Pt(111), as in EMT


def test_md_refuses_a_zero_mass_or_nan_momentum_in_an_input_file(inputs, package_path, capsys):
    """The fault table's MD inputs through the command line: a structure file with a zero mass or
    a NaN momentum (extxyz keeps both) exits 2 naming the atom before any step, and writes no
    trajectory."""
    model = package_path("painn", "float64", features=8, num_interactions=2)
    cu = ase.io.read(inputs / "cu.extxyz")
    masses = cu.get_masses()
    masses[2] = 0.0
    cu.set_masses(masses)
    ase.io.write(inputs / "massless.extxyz", cu)
    cu = ase.io.read(inputs / "cu.extxyz")
    momenta = np.zeros((len(cu), 3))
    momenta[3, 1] = np.nan
    cu.set_momenta(momenta)
    ase.io.write(inputs / "nan.extxyz", cu)
    # atoms are counted over all inputs: the 2 atoms of CO come first
    for name, message in (("massless", r"atoms \[4\] .* masses \[0\.0\] amu"), ("nan", r"momenta of atoms \[5\]")):
        out = inputs / f"run_{name}"
        assert main(["md", str(inputs / "co.xyz"), str(inputs / f"{name}.extxyz"), "--model", model, "--steps", "2",
                     "--output-dir", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert not list(out.glob("*.extxyz"))


@pytest.mark.parametrize("adsorbate", ["CO", "NO", "OH"])
def test_adsorbates_are_placed_by_their_first_atom_pointing_up(adsorbate):
    """Every placement of ``eqcalc adsorption`` (before relaxing): the atom named first in the
    formula (C of CO, whatever order ASE's g2 set stores) sits 2 Å above the top layer at its
    site, every other adsorbate atom higher, the molecule's geometry unchanged."""
    from eqcalc.workflows.adsorption import gas_molecule, plan

    slab = fcc111("Pt", (2, 2, 3), vacuum=6.0)
    n, top = len(slab), slab.positions[:, 2].max()
    p = plan(slab, adsorbate, distance=2.0)
    first = "".join(c for c in adsorbate if c.isalpha() and c.isupper())[0]
    gas = gas_molecule(adsorbate)
    for (kind, site), atoms in zip(p.sites, p.placements):
        ads = atoms[n:]
        k = ads.get_chemical_symbols().index(first)
        assert ads.positions[k, 2] == pytest.approx(top + 2.0, abs=1e-9), kind
        assert np.allclose(ads.positions[k, :2], site[:2]), kind
        assert (np.delete(ads.positions[:, 2], k) > ads.positions[k, 2] + 0.1).all(), kind
        np.testing.assert_allclose(ads.get_all_distances(), gas.get_all_distances(), atol=1e-9)
