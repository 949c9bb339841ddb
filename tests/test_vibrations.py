"""Vibrations (eqcalc.workflows.vibrations, eqcalc vib) and phonons (eqcalc.workflows.phonons,
eqcalc phonons) against ASE's finite-difference Vibrations and phonopy's finite displacements."""
import csv
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.vibrations import Vibrations, VibrationsData

from eqcalc import EquivariantCalculator
from eqcalc.errors import InvalidAtomsError, InvalidOptionError, MissingDependencyError
from eqcalc.workflows import phonons as P
from eqcalc.workflows.vibrations import summary, vibrations


def adsorbed(site: str, adsorbate="O", height=1.2, metal="Pt"):
    slab = fcc111(metal, size=(2, 2, 3), vacuum=6.0)
    slab.pbc = (True, True, False)
    mol = molecule(adsorbate) if len(adsorbate) > 1 else adsorbate    # CO binds through C (index 0)
    add_adsorbate(slab, mol, height, site, mol_index=0)
    slab.set_constraint(FixAtoms(indices=list(range(12))))
    return slab


@pytest.fixture(scope="module")
def schnet64():
    return EquivariantCalculator("schnet", compile="eager", dtype="float64", device="cpu")


def test_frequencies_equal_ase_finite_differences_with_the_same_model(schnet64, tmp_path):
    atoms = adsorbed("fcc", "CO", 1.9)
    vib = vibrations([atoms], schnet64)[0]
    assert isinstance(vib, VibrationsData)
    assert vib.get_indices().tolist() == [12, 13]              # the atoms FixAtoms leaves free
    ref = atoms.copy()
    ref.calc = schnet64
    fd = Vibrations(ref, indices=[12, 13], delta=0.002, nfree=4, name=str(tmp_path / "vib"))
    fd.run()
    ours, theirs = vib.get_frequencies(), fd.get_vibrations().get_frequencies()
    assert np.abs(ours - theirs).max() < 0.05, (ours, theirs)   # cm^-1
    assert abs(vib.get_zero_point_energy() - fd.get_vibrations().get_zero_point_energy()) < 1e-5


def test_a_batch_gives_what_each_structure_gives_alone(schnet64):
    structures = [adsorbed("fcc"), adsorbed("hcp", "N"), molecule("CO")]
    structures[2].center(vacuum=5.0)
    batch = vibrations(structures, schnet64)
    for s, b in zip(structures, batch):
        single = vibrations([s], schnet64)[0]
        assert np.allclose(b.get_hessian_2d(), single.get_hessian_2d(), rtol=0, atol=1e-10)
    co = summary(batch[2])
    # A diatomic has 5 rigid modes, projected to exactly zero although this bond length is not
    # the model's minimum (rotations would otherwise pick up the bond's force), and one stretch.
    assert co.n_rigid == 5 and len(co.frequencies_cm1) == 6
    assert np.abs(np.sort(np.abs(co.frequencies_cm1))[:5]).max() < 1e-3
    assert co.frequencies_cm1.max() > 300


def test_a_saddle_is_reported_with_its_imaginary_modes_not_refused(schnet64):
    """O on top of a Pt atom is a maximum in the surface plane (it prefers the hollows, as with
    EMT): two imaginary modes, counted and left out of the ZPE, and a real stretch."""
    atoms = adsorbed("ontop", height=1.9)
    s = summary(vibrations([atoms], schnet64)[0])
    assert s.n_imaginary == 2 and (s.frequencies_cm1 < 0).sum() == 2
    real = s.frequencies_cm1[s.frequencies_cm1 > 0]
    assert len(real) == 1
    from ase.units import invcm
    assert abs(s.zpe_eV - 0.5 * real[0] * invcm) < 1e-9


def test_indices_choose_the_moving_atoms_and_bad_ones_are_refused(schnet64):
    atoms = adsorbed("fcc")
    vib = vibrations([atoms], schnet64, indices=[[12, 11]])[0]
    assert sorted(vib.get_indices().tolist()) == [11, 12]
    fixed = atoms.copy()
    fixed.set_constraint(FixAtoms(indices=list(range(len(fixed)))))
    with pytest.raises(InvalidOptionError, match="nothing vibrates"):
        vibrations([fixed], schnet64)
    with pytest.raises(InvalidOptionError, match="out of range"):
        vibrations([atoms], schnet64, indices=[[40]])
    with pytest.raises(InvalidOptionError, match="non-empty"):
        vibrations([atoms], schnet64, indices=[[]])
    with pytest.raises(InvalidOptionError, match="one per structure"):
        vibrations([atoms, atoms], schnet64, indices=[None])


def test_eqcalc_vib_writes_the_table_and_mode_animations(tmp_path):
    for site in ("fcc", "ontop"):
        ase.io.write(tmp_path / f"o_{site}.extxyz", adsorbed(site, height=1.2 if site == "fcc" else 1.9))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "eqcalc.cli", "vib", str(tmp_path / "o_fcc.extxyz"),
                        str(tmp_path / "o_ontop.extxyz"), "--model", "schnet", "--dtype", "float64",
                        "--frames", "5", "--output-dir", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 IMAGINARY" in r.stdout
    rows = list(csv.DictReader(open(out / "vib.csv")))
    assert [row["name"] for row in rows] == ["o_fcc", "o_ontop"]
    expected = summary(vibrations([adsorbed("fcc")], "schnet", dtype="float64")[0])
    assert abs(float(rows[0]["zpe_eV"]) - expected.zpe_eV) < 1e-6
    frames = ase.io.read(out / "o_ontop_modes.extxyz", ":")
    assert len(frames) == 3 * 5 and frames[0].info["frequency_cm1"] < 0


# ---- phonons ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cu_hessian_phonons(schnet64):
    """fcc Cu (a = 3.6 Å) with the shipped SchNet in a 3x3x3 supercell, Hessian route (the
    Hessian is the slow part: computed once for the tests that read it)."""
    return P.phonons(bulk("Cu", "fcc", a=3.6), schnet64, supercell=(3, 3, 3), method="hessian")


def test_phonons_from_displacements_and_from_the_hessian_agree(schnet64, cu_hessian_phonons):
    cu = bulk("Cu", "fcc", a=3.6)
    a = P.phonons(cu, schnet64, supercell=(3, 3, 3))
    b = cu_hessian_phonons
    points = P.special_points(a)
    for label in ("G", "X", "L"):
        fa, fb = P.frequencies(a, [points[label]])[0], P.frequencies(b, [points[label]])[0]
        assert np.abs(fa - fb).max() < 2e-3, (label, fa, fb)     # THz; displacement is 0.01 Å FD


def test_hessian_route_gives_a_stable_crystal_real_bands_with_zero_acoustic_modes_at_gamma(cu_hessian_phonons):
    """fcc Cu with the shipped SchNet (trained on EMT, for which Cu is stable) through the
    Hessian route: no imaginary mode anywhere on the band path, the three acoustic modes at Γ
    zero (and not reported as instabilities), the top of the band where EMT's is (~8 THz)."""
    ph = cu_hessian_phonons
    band = P.band_structure(ph, npoints=31)
    assert P.imaginary_modes(band) == []
    assert np.abs(P.frequencies(ph, [[0.0, 0.0, 0.0]])[0]).max() < 1e-3
    assert 6.0 < band["frequencies"].max() < 10.0


def test_emt_phonons_through_the_same_pipeline_match_known_cu_values():
    """The pipeline itself on the reference: EMT Cu at a = 3.6 Å has its L and X modes where ASE's
    own Phonons puts them (3.49/7.89 and 5.43/7.97 THz)."""
    cu = bulk("Cu", "fcc", a=3.6)
    ph = P.phonons(cu, forces=EMT(), supercell=(4, 4, 4))
    points = P.special_points(ph)
    assert np.allclose(P.frequencies(ph, [points["L"]])[0], [3.491, 3.491, 7.890], atol=0.01)
    assert np.allclose(P.frequencies(ph, [points["X"]])[0], [5.430, 5.430, 7.972], atol=0.01)
    assert np.abs(P.frequencies(ph, [points["G"]])[0]).max() < 0.01


def test_eqcalc_phonons_reports_imaginary_modes_plainly(tmp_path, package_path):
    """An untrained PaiNN makes perfect fcc Cu a maximum: the command says so and still writes
    the band structure; a trained model gives none."""
    ase.io.write(tmp_path / "cu.extxyz", bulk("Cu", "fcc", a=3.6))
    for model, expect in ((package_path("painn", "float64"), "IMAGINARY MODES"), ("schnet", "no imaginary modes")):
        out = tmp_path / f"out_{expect[:2]}"
        r = subprocess.run([sys.executable, "-m", "eqcalc.cli", "phonons", str(tmp_path / "cu.extxyz"),
                            "--model", str(model), "--supercell", "3", "3", "3", "--mesh", "8", "8", "8",
                            "--output-dir", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert expect in r.stdout, r.stdout
        assert (out / "phonons.png").stat().st_size > 10_000
        band = np.loadtxt(out / "band.csv", delimiter=",", skiprows=1)
        assert band.shape[1] == 4 and len(band) > 50


def test_phonon_bad_input_gets_typed_errors(schnet64, monkeypatch):
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    with pytest.raises(InvalidAtomsError, match="eqcalc vib"):
        P.phonons(slab, schnet64)
    cu = bulk("Cu", "fcc", a=3.6)
    with pytest.raises(InvalidOptionError, match="supercell"):
        P.phonons(cu, schnet64, supercell=(0, 2, 2))
    with pytest.raises(InvalidOptionError, match="displacement"):
        P.phonons(cu, schnet64, displacement=-0.01)
    with pytest.raises(InvalidOptionError, match="method"):
        P.phonons(cu, schnet64, method="magic")
    monkeypatch.setitem(sys.modules, "phonopy", None)
    with pytest.raises(MissingDependencyError, match="phonons"):
        P.phonons(cu, schnet64)


def test_rigid_motions_are_projected_in_mass_weighted_coordinates():
    """A Hessian whose mass-weighted form is made only of rigid translations and rotations of
    water (O 16, H 1 amu: unequal masses) has nothing left after the projection, while a bond
    stretch passes through unchanged (the vectors written out here, not taken from the code)."""
    from eqcalc.workflows.vibrations import project_rigid

    water = molecule("H2O")
    m = water.get_masses()
    centred = water.positions - (m[:, None] * water.positions).sum(0) / m.sum()
    sqrt_m = np.repeat(np.sqrt(m), 3)
    rigid = [np.tile(np.eye(3)[a], 3) for a in range(3)] + [np.cross(np.eye(3)[a], centred).reshape(-1) for a in range(3)]
    weighted = [sqrt_m * v / np.linalg.norm(sqrt_m * v) for v in rigid]    # mass-weighted unit vectors
    d = sum((k + 1.0) * np.outer(u, u) for k, u in enumerate(weighted))   # eV/(Å² amu)
    hessian = d * np.outer(sqrt_m, sqrt_m)                                 # eV/Å²
    assert np.abs(project_rigid(water, np.arange(3), hessian)).max() < 1e-10 * np.abs(hessian).max()
    # a symmetric O-H stretch has no rigid component in mass-weighted space: kept as it is
    stretch = np.zeros((3, 3))
    stretch[1:] = water.positions[1:] - water.positions[0]
    stretch[0] = -(m[1:, None] * stretch[1:]).sum(0) / m[0]               # centre of mass fixed
    u = sqrt_m * stretch.reshape(-1)
    q = np.linalg.qr(np.array(weighted).T)[0]
    u -= q @ (q.T @ u)
    kept = np.outer(u, u) * np.outer(sqrt_m, sqrt_m)
    assert np.abs(project_rigid(water, np.arange(3), kept) - kept).max() < 1e-10 * np.abs(kept).max()
