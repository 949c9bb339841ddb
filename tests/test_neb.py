"""Batched NEB (eqcalc.neb) against ASE's NEB, on small catalyst slabs and bulk.

EMT through the engine (tests/md_potentials.EMTPotential) gives reference physics at the cost of
a few milliseconds per image, so the batched bands can be compared with ASE's
``NEB(method="improvedtangent", climb=True)`` + ``FIRE`` step for step.
"""
import warnings

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.mep import NEB
from ase.optimize import FIRE

from eqcalc.engine import md
from eqcalc.engine.neb import interpolate
from eqcalc.errors import EqcalcError, InvalidAtomsError, InvalidOptionError
from eqcalc.neb import neb
from tests.md_potentials import EMTPotential
from tests.neb_cases import cu_vacancy, n_pd111_across_boundary, o_cu100, o_pt111

N_IMAGES = 5


def ase_neb(initial, final, calc_factory, fmax=0.03, interpolation="idpp", max_steps=500, k=0.1):
    """ASE's NEB from the same interpolated images eqcalc starts from."""
    images = interpolate(initial, final, N_IMAGES, interpolation)
    for a in images:
        a.calc = calc_factory()
    band = NEB(images, k=k, climb=True, method="improvedtangent")
    opt = FIRE(band, logfile=None)
    converged = opt.run(fmax=fmax, steps=max_steps)
    return images, opt.nsteps, converged


@pytest.fixture(scope="module")
def emt_bands():
    """O/Pt(111) (slab, FixAtoms, mixed periodicity) and a vacancy hop in bulk Cu, one batch."""
    pot = EMTPotential()
    pairs = [o_pt111(), cu_vacancy()]
    return pairs, neb(pairs, pot, n_images=N_IMAGES, fmax=0.03), pot


def test_bands_follow_ase_neb_step_for_step(emt_bands):
    pairs, results, _ = emt_bands
    for r in results:
        assert r.converged and r.endpoints_converged
        images, steps, ok = ase_neb(r.images[0], r.images[-1], EMT)  # ASE from our relaxed end points
        assert ok and steps == r.steps  # same method, same optimizer: same path
        e = np.array([a.get_potential_energy() for a in images])
        assert r.barrier == pytest.approx(e.max() - e[0], abs=1e-8)
        assert r.reaction_energy == pytest.approx(e[-1] - e[0], abs=1e-8)
        for ours, theirs in zip(r.images, images):
            np.testing.assert_allclose(ours.positions, theirs.positions, atol=1e-8)
        assert r.climbing_image == int(np.argmax(e[1:-1])) + 1
        assert 0.02 < r.barrier < 2.0  # a real barrier: the climbing image is above both minima


def test_fixed_atoms_never_move_and_band_is_a_path(emt_bands):
    pairs, results, _ = emt_bands
    slab = results[0]
    fixed = md.fixed_mask(pairs[0][0])
    assert fixed.sum() == 9
    for a in slab.images:
        np.testing.assert_array_equal(a.positions[fixed], pairs[0][0].positions[fixed])
        np.testing.assert_array_equal(a.get_forces()[fixed], 0.0)
        assert a.get_potential_energy() <= slab.images[slab.climbing_image].get_potential_energy()
    # the model's forces on the converged climbing image: only the saddle's residual remains
    assert np.linalg.norm(slab.images[slab.climbing_image].get_forces(), axis=1).max() < 0.03


def test_converged_bands_leave_the_batch(emt_bands):
    pairs, results, _ = emt_bands
    steps = [r.steps for r in results]
    assert steps[0] != steps[1]
    pot = EMTPotential()
    again = neb([(r.images[0], r.images[-1]) for r in results], pot, n_images=N_IMAGES, fmax=0.03,
                relax_endpoints=False)
    assert [r.steps for r in again] == steps
    n = [len(p[0]) for p in pairs]
    # the end points once, then the interior images of a band at each step it was in the batch
    assert pot.atom_evaluations == 2 * sum(n) + sum((N_IMAGES - 2) * n_b * (s + 1) for n_b, s in zip(n, steps))


def test_ends_differing_by_a_lattice_vector_use_the_minimum_image():
    initial, final = n_pd111_across_boundary()
    n = len(initial) - 1
    assert np.linalg.norm(final.positions[n] - initial.positions[n]) > 5.0  # stored on the far side
    pot = EMTPotential()
    r, = neb([(initial, final)], pot, n_images=N_IMAGES, fmax=0.03)
    assert r.converged
    hops = [np.linalg.norm(b.positions - a.positions, axis=1).max() for a, b in zip(r.images, r.images[1:])]
    assert max(hops) < 1.0  # a 1.6 Å hop in 4 segments, not a trip through the cell
    images, steps, ok = ase_neb(r.images[0], r.images[-1], EMT)
    e = np.array([a.get_potential_energy() for a in images])
    assert ok and steps == r.steps and r.barrier == pytest.approx(e.max() - e[0], abs=1e-8)
    # the band's final image is the relaxed final state unwrapped: wrapping it back changes nothing
    wrapped = r.images[-1].copy()
    wrapped.wrap()
    assert np.linalg.norm(wrapped.positions[n] - r.images[-1].positions[n]) > 5.0
    wrapped.calc = EMT()
    assert wrapped.get_potential_energy() == pytest.approx(r.energies[-1], abs=1e-9)


def fd_hessian(atoms, indices, delta=0.005):
    """Central-difference Hessian ``(3k, 3k)`` eV/Å² of EMT over the atoms ``indices``."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    h = np.zeros((3 * len(indices), 3 * len(indices)))
    for c, (i, x) in enumerate((i, x) for i in indices for x in range(3)):
        grads = []
        for sign in (1, -1):
            atoms.positions[i, x] += sign * delta
            grads.append(-atoms.get_forces()[indices].ravel())
            atoms.positions[i, x] -= sign * delta
        h[c] = (grads[0] - grads[1]) / (2 * delta)
    return 0.5 * (h + h.T)


def test_climbing_image_is_a_first_order_saddle():
    """One negative Hessian eigenvalue at the climbing image (an imaginary mode: mass weighting
    keeps the signs), none at the initial state; the mode runs along the band's tangent."""
    r, = neb([o_cu100()], EMTPotential(), n_images=N_IMAGES, fmax=0.01)
    free = np.nonzero(~md.fixed_mask(r.images[0]))[0]
    w, v = np.linalg.eigh(fd_hessian(r.images[r.climbing_image], free))
    assert np.sum(w < -1e-3) == 1 and w[1] > 1e-3
    assert np.sum(np.linalg.eigvalsh(fd_hessian(r.images[0], free)) < -1e-3) == 0
    c = r.climbing_image
    tangent = (r.images[c + 1].positions - r.images[c - 1].positions)[free].ravel()
    assert abs(v[:, 0] @ tangent) / np.linalg.norm(tangent) > 0.9
    # the band's own tangent at the climbing image (what the saddle check compares modes with)
    assert np.linalg.norm(r.tangent) == pytest.approx(1.0) and abs(v[:, 0] @ r.tangent[free].ravel()) > 0.9


def test_model_band_matches_ase_neb_with_equivariant_calculator():
    from eqcalc import EquivariantCalculator
    from eqcalc.model import Model

    model = Model("default", device="cpu", compile="eager", dtype="float64")
    initial, final = o_cu100()
    r, = neb([(initial, final)], md.ModelPotential(model), n_images=N_IMAGES, fmax=0.03)
    assert r.converged
    images, steps, ok = ase_neb(r.images[0], r.images[-1], lambda: EquivariantCalculator(model))
    e = np.array([a.get_potential_energy() for a in images])
    assert ok and abs(steps - r.steps) <= 2
    assert r.barrier == pytest.approx(e.max() - e[0], abs=1e-4)


def test_potential_by_model_name_evaluates_the_band_once_with_max_steps_zero():
    a, b = o_cu100()
    r, = neb([(a, b)], "schnet", n_images=3, max_steps=0, relax_endpoints=False, check_saddles=False)
    assert r.steps == 0 and not r.converged and np.isfinite(r.energies).all()
    assert r.images[1].get_potential_energy() == r.energies[1] and r.climbing_image == 1


def test_band_that_does_not_converge_is_reported():
    r, = neb([o_pt111()], EMTPotential(), n_images=N_IMAGES, fmax=0.03, max_steps=3, relax_endpoints=False)
    assert not r.converged and r.steps == 3 and r.fmax > 0.03
    assert np.isfinite(r.energies).all()


def test_lbfgs_on_bands_converges_to_the_same_barrier(emt_bands):
    pairs, results, _ = emt_bands
    ends = [(r.images[0], r.images[-1]) for r in results]
    lb = neb(ends, EMTPotential(), n_images=N_IMAGES, fmax=0.03, optimizer="lbfgs", relax_endpoints=False)
    for a, b in zip(lb, results):
        assert a.converged and a.barrier == pytest.approx(b.barrier, abs=0.01)


def test_spring_constant_per_band(emt_bands):
    pairs, results, _ = emt_bands
    ends = [(r.images[0], r.images[-1]) for r in results]
    both = neb(ends, EMTPotential(), n_images=N_IMAGES, fmax=0.03, k=[0.1, 1.0], relax_endpoints=False)
    alone, = neb(ends[1:], EMTPotential(), n_images=N_IMAGES, fmax=0.03, k=1.0, relax_endpoints=False)
    assert both[0].steps == results[0].steps  # k=0.1 band unchanged by its neighbour's k
    assert both[1].steps == alone.steps
    for a, b in zip(both[1].images, alone.images):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _bad(pair, match, err=InvalidAtomsError, **kw):
    with pytest.raises(err, match=match) as info:
        neb([pair], EMTPotential(), relax_endpoints=False, **kw)
    assert isinstance(info.value, EqcalcError)


def test_bad_end_points_are_typed_errors_naming_the_fix():
    a, b = o_pt111()
    _bad((a, b[:-1]), "same atoms")
    swapped = b.copy()
    swapped.numbers[[0, -1]] = swapped.numbers[[-1, 0]]
    _bad((a, swapped), "same order")
    other_cell = b.copy()
    other_cell.set_cell(b.cell * 1.01, scale_atoms=False)
    _bad((a, other_cell), "same cell")
    no_fix = b.copy()
    no_fix.set_constraint()
    _bad((a, no_fix), "same constraint")
    _bad((a, a.copy()), "identical")
    _bad((a, b), "n_images", InvalidOptionError, n_images=2)
    _bad((a, b), "k has 2 values", InvalidOptionError, k=[0.1, 0.2])
    _bad((a, b), "interpolation", InvalidOptionError, interpolation="spline")
    with pytest.raises(InvalidOptionError, match="pairs"):
        neb([a], EMTPotential())


def test_end_points_relaxing_into_one_minimum_are_refused():
    a, b = o_pt111()
    nudged = a.copy()
    nudged.positions[-1] += [0.15, 0.0, 0.0]  # the same fcc site, slightly off
    with pytest.raises(InvalidAtomsError, match="same minimum"):
        neb([(a, nudged)], EMTPotential())


def test_overlapping_interpolated_images_are_refused():
    a, b = o_pt111()
    b = a.copy()
    top = np.nonzero(~md.fixed_mask(a))[0][:2]  # two metal atoms swap places: they collide halfway
    b.positions[top] = a.positions[top[::-1]]
    _bad((a, b), "runs atoms through each other", interpolation="linear")


# ----------------------------------------------------------------------------------------------
# eqcalc neb
# ----------------------------------------------------------------------------------------------
def test_cli_writes_band_table_and_profile_and_fails_on_unconverged(tmp_path, capsys):
    import csv

    import ase.io

    from eqcalc.cli import build_parser, main

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["neb", "--help"])
    assert exit_.value.code == 0 and "example:\n  eqcalc neb" in capsys.readouterr().out
    a, b = o_cu100()
    ase.io.write(tmp_path / "is.extxyz", a)
    ase.io.write(tmp_path / "fs.extxyz", b)
    args = ["neb", str(tmp_path / "is.extxyz"), str(tmp_path / "fs.extxyz"), "--images", "3", "--no-progress",
            "--dtype", "float64"]
    assert main(args + ["--output-dir", str(tmp_path / "ok")]) == 0
    band = ase.io.read(tmp_path / "ok" / "is-fs.extxyz", index=":")
    rows = list(csv.DictReader(open(tmp_path / "ok" / "barriers.csv")))
    energies = np.array([im.get_potential_energy() for im in band])
    assert len(band) == 3 and rows[0]["converged"] == "True"
    assert float(rows[0]["barrier_eV"]) == pytest.approx(energies.max() - energies[0], abs=1e-5)
    assert 0.02 < float(rows[0]["barrier_eV"]) < 1.0
    assert (band[1].constraints[0].index == a.constraints[0].index).all()  # FixAtoms kept in the file
    assert (tmp_path / "ok" / "is-fs.png").stat().st_size > 1000
    # counted where the model has second derivatives, else said so
    assert (rows[0]["imaginary_modes"] == "1" and float(rows[0]["tangent_overlap"]) >= 0.5
            and float(rows[0]["reaction_mode_cm1"]) < 0) or rows[0]["saddle_check"].startswith("not checked")
    assert main(args + ["--max-steps", "1", "--output-dir", str(tmp_path / "short")]) == 1
    assert list(csv.DictReader(open(tmp_path / "short" / "barriers.csv")))[0]["converged"] == "False"
    assert "NOT converged" in capsys.readouterr().out
    assert main(["neb", str(tmp_path / "is.extxyz"), "--output-dir", str(tmp_path / "odd")]) == 2  # not pairs


def test_saddle_check_with_the_model_hessian():
    """A model with second derivatives (the shipped SchNet): the converged climbing image of an
    O hop on Cu(100) has one imaginary mode, the initial state none; EMT has no eqcalc model:
    it says "not checked"."""
    from eqcalc.model import Model
    from eqcalc.workflows.vibrations import summary, vibrations

    a, b = o_cu100()
    for s in (a, b):  # only the top layer and O move: a 30-row Hessian
        s.set_constraint(FixAtoms(mask=s.get_tags() > 1))
    model = Model("schnet", device="cpu", compile="eager", dtype="float64")
    r, = neb([(a, b)], md.ModelPotential(model), n_images=N_IMAGES, fmax=0.02)
    assert r.converged and r.imaginary_modes == 1 and r.saddle_verified, r.saddle_check
    assert "first-order saddle" in r.saddle_check
    nu = summary(vibrations([r.images[0]], model)[0]).frequencies_cm1
    assert (nu > 0).all()  # the relaxed initial state is a minimum
    emt, = neb([(r.images[0], r.images[-1])], EMTPotential(), n_images=3, fmax=0.05, relax_endpoints=False)
    assert emt.imaginary_modes is None and "no eqcalc model" in emt.saddle_check


def test_shallow_barrier_saddle_is_verified_by_its_direction():
    """N fcc -> hcp on Pd(111) with the default model (float64): a 25 meV barrier whose one
    imaginary mode is only ~21i cm-1, softer than the 30i floor for other modes (the former check
    refused it). The mode along the band's tangent decides: it is imaginary and the tangent lies
    along it; independently, the curvature of the energy along the tangent (tau^T H tau from the
    model's Hessian) is negative at the climbing image. The relaxed initial state, a minimum, has
    no imaginary mode along the same direction and is not taken for a saddle."""
    from eqcalc.engine.neb import saddle_modes
    from eqcalc.model import Model
    from eqcalc.workflows.vibrations import vibrations

    model = Model("default", device="cpu", compile="eager", dtype="float64")
    r, = neb([n_pd111_across_boundary()], md.ModelPotential(model), n_images=7, fmax=0.01)
    assert r.converged and 0.01 < r.barrier < 0.05
    assert r.saddle_verified and r.imaginary_modes == 1, r.saddle_check
    assert -30.0 < r.reaction_mode_cm1 < -10.0 and r.tangent_overlap > 0.9
    saddle, minimum = vibrations([r.images[r.climbing_image], r.images[0]], model)
    tau = r.tangent[saddle.get_indices()].ravel()
    assert tau @ saddle.get_hessian_2d() @ tau < 0
    n, nu, overlap, text = saddle_modes(minimum, r.tangent)
    assert nu > 0 and not (n == 1 and nu < 0) and "NOT a first-order saddle" in text


def _vibrations_with(atoms, free, modes):
    """ASE VibrationsData of ``atoms`` whose mass-weighted Hessian has the eigenpairs ``modes``
    (``[(frequency_cm1 signed, unit mass-weighted vector over the free coordinates)]``) and
    300 cm-1 in every other direction."""
    from ase import units
    from ase.vibrations import VibrationsData

    n = 3 * len(free)
    basis = np.linalg.qr(np.column_stack([v for _, v in modes] +
                                         [np.random.default_rng(0).normal(size=(n, n - len(modes)))]))[0]
    nu = np.full(n, 300.0)
    nu[:len(modes)] = [f for f, _ in modes]
    omega2 = np.sign(nu) * (nu * units.invcm) ** 2 / units._hbar ** 2 / units.J * units._amu * 1e-20
    sqrt_m = np.repeat(np.sqrt(atoms.get_masses()[free]), 3)
    weighted = basis @ np.diag(omega2) @ basis.T
    return VibrationsData.from_2d(atoms, weighted * np.outer(sqrt_m, sqrt_m), indices=free)


def test_saddle_decision_from_mode_directions():
    """The rule of eqcalc.neb.saddle_modes on Hessians built with known modes (Pt(111)+O, free
    top layer and O): an imaginary mode of any size above the zero floor along the tangent with
    no other beyond 30i is a first-order saddle (21i like N/Pd, 95i); an imaginary mode across
    the band with a real one along it is not (0 along the band), nor is a second imaginary mode
    beyond 30i (2 modes), while a second one softer than 30i is not counted; a mode along the
    band softer than the 10 cm-1 zero floor counts as flat."""
    from eqcalc.engine.neb import saddle_modes

    atoms, _ = o_pt111()
    free = np.nonzero(~md.fixed_mask(atoms))[0]
    sqrt_m = np.repeat(np.sqrt(atoms.get_masses()[free]), 3)
    rng = np.random.default_rng(1)
    tangent = np.zeros((len(atoms), 3))
    tangent[-1] = [1.0, 0.3, 0.0]                      # the O atom hops, the surface follows a little
    tangent[free[:-1]] = 0.02 * rng.normal(size=(len(free) - 1, 3))
    along = tangent[free].ravel() * sqrt_m
    along /= np.linalg.norm(along)
    across = rng.normal(size=along.size)
    across -= (across @ along) * along
    across /= np.linalg.norm(across)

    def judge(*modes):
        n, nu, overlap, text = saddle_modes(_vibrations_with(atoms, free, modes), tangent)
        verified = n == 1 and nu < 0 and overlap >= 0.5
        assert verified == text.endswith("first-order saddle"), text
        return n, round(nu), verified

    assert judge((-21.0, along)) == (1, -21, True)
    assert judge((-95.0, along), (-25.0, across)) == (1, -95, True)
    assert judge((-95.0, along), (-60.0, across)) == (2, -95, False)
    assert judge((120.0, along), (-60.0, across)) == (1, 120, False)
    assert judge((-5.0, along)) == (0, -5, False)
