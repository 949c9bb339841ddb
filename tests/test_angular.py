"""Angular message passing: triplets of the neighbor list, DimeNet++ and GemNet-T.

Physics checked here (the physics library covers both architectures like every registered
one: first order in tests/test_physics.py, compiled forms in tests/test_compiled.py, second
order -- linear response at symmetric sites with collinear triplets, Hessian vs finite
differences -- in tests/test_second_order.py):

* triplets equal a brute-force enumeration over (atom, shift) edge identities on periodic,
  mixed-pbc, cell-smaller-than-cutoff and molecular systems, also batched; the reverse-edge map;
  dimers and isolated atoms give none;
* the spherical Bessel / Legendre bases equal scipy's;
* the models see angles a distance-only network cannot (SchNet is flat on the same path);
* symbolic traces (the AOTInductor route) run new sizes; skin edges change nothing;
* batches too big for memory are split before allocation (same results) or refused with a
  typed error that names the size;
* GemNet's scaling factors give unit-ratio mean squares after calibration and travel with the
  weights; the batched engine runs MD (step for step equal to ASE) and relaxations with them.
"""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

import potentials
from eqcalc import EquivariantCalculator, keys
from eqcalc import triplets as trip
from eqcalc.errors import InvalidOptionError, SystemTooLargeError
from eqcalc.neighbors import neighbor_list
from tests.conftest import SPECIES, TEST_HYPER

ANGULAR = ["dimenet", "gemnet"]
SMALL = TEST_HYPER  # small models at a 3.5 Å cutoff: every kind of triplet, few of them


def brute_force(i, j, S):
    """Every (k→j, j→i) edge pair except k→j = (j, i, -S_ji), by plain loops."""
    out = set()
    for ji in range(len(i)):
        for kj in range(len(i)):
            if i[kj] == j[ji] and not (j[kj] == i[ji] and np.array_equal(S[kj], -S[ji])):
                out.add((kj, ji))
    return out


def systems():
    small = bulk("Cu", "fcc", a=3.6)                              # 1 atom, cell << cutoff
    small.rattle(0.05, seed=1)
    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    tri.set_cell(tri.cell.array @ (np.eye(3) + 0.03 * np.arange(9).reshape(3, 3) / 9), scale_atoms=True)
    tri.rattle(0.05, seed=2)
    slab = fcc111("Cu", (2, 2, 2), a=3.6, vacuum=4.0)              # pbc (T, T, F)
    slab.rattle(0.05, seed=3)
    mol = molecule("CH3OH")
    return {"one_atom_cell": (small, 4.0), "small_triclinic": (tri, 3.5), "slab": (slab, 3.2),
            "molecule": (mol, 2.5)}


@pytest.mark.parametrize("name", list(systems()))
def test_triplets_match_brute_force(name):
    atoms, cutoff = systems()[name]
    i, j, S = neighbor_list("ijS", atoms, cutoff)
    edge_index = torch.tensor(np.stack([i, j]))
    kj, ji, reverse = trip.triplets(edge_index, torch.tensor(S, dtype=torch.float64), len(atoms))
    got = list(zip(kj.tolist(), ji.tolist()))
    expected = brute_force(i, j, S)
    assert len(got) == len(set(got)) == len(expected) == trip.count(edge_index, len(atoms))
    assert set(got) == expected
    assert bool((ji[1:] >= ji[:-1]).all())  # grouped by the updated edge
    r = reverse.numpy()
    assert (i[r] == j).all() and (j[r] == i).all() and (S[r] == -S).all()
    if name == "one_atom_cell":  # every neighbor is an image of the atom itself: all count
        assert (i == 0).all() and (j == 0).all() and len(got) == len(i) * (len(i) - 1)


def _angles_at_the_shared_atom(atoms, cutoff):
    """Sorted cosines of every angle k-j-i of the structure, from Cartesian positions: ASE's
    neighbor list places the images (atom + shift @ cell); every pair of neighbours of ``j``
    that are distinct points makes one angle (two images of one atom are distinct points)."""
    i, j, S = neighbor_list("ijS", atoms, cutoff)
    pos, cell = atoms.positions, atoms.cell.array
    cosines = []
    for a in range(len(atoms)):
        around = [pos[n] + s @ cell for c, n, s in zip(i, j, S) if c == a]  # neighbours of a in its cell
        for x in range(len(around)):
            for y in range(len(around)):
                if x != y:
                    u, v = around[x] - pos[a], around[y] - pos[a]
                    cosines.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    return np.sort(cosines)


@pytest.mark.parametrize("name", list(systems()))
def test_triplet_cosines_are_the_angles_between_the_edges(name):
    """The cosines the angular models see (eqcalc's neighbor list, triplets and
    ``triplet_cosines``) are the angles of the geometry, one per ordered pair of distinct
    neighbours of the shared atom, computed here from Cartesian positions: across periodic
    images too (a 1-atom cell smaller than the cutoff has only images of itself)."""
    from eqcalc.atoms import to_tensors
    from eqcalc.neighbors import compute_edge_vectors, compute_neighbors
    from potentials.angular import triplet_cosines

    atoms, cutoff = systems()[name]
    t = to_tensors([atoms])
    edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, cutoff, t.system)
    vectors = compute_edge_vectors(t.positions, t.cell, edge_index, shifts, t.system)
    kj, ji, _ = trip.triplets(edge_index, shifts.double(), len(atoms))
    ours = triplet_cosines(vectors / vectors.norm(dim=1, keepdim=True), kj, ji).numpy()
    expected = _angles_at_the_shared_atom(atoms, cutoff)
    assert len(expected) > 0 and len(ours) == len(expected)
    np.testing.assert_allclose(np.sort(ours), expected, rtol=0, atol=1e-12)


def test_triplets_of_a_batch_are_those_of_each_system():
    from eqcalc.atoms import to_tensors
    from eqcalc.neighbors import compute_neighbors

    structures = [a for a, _ in systems().values()]
    t = to_tensors(structures)
    edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, 3.0, t.system)
    kj, ji, _ = trip.triplets(edge_index, shifts.double(), len(t.positions))
    i, j = edge_index.numpy()
    assert set(zip(kj.tolist(), ji.tolist())) == brute_force(i, j, shifts.numpy())
    system = t.system[edge_index[0]]
    assert torch.equal(system[kj], system[ji])


def test_no_triplets_for_dimers_and_isolated_atoms(tmp_path):
    for atoms in (Atoms("CuO", positions=[[0, 0, 0], [0, 0, 2.0]]), Atoms("Cu")):
        i, j, S = neighbor_list("ijS", atoms, 5.0)
        kj, ji, reverse = trip.triplets(torch.tensor(np.stack([i, j])), torch.tensor(S, dtype=torch.float64), len(atoms))
        assert kj.numel() == ji.numel() == 0 and reverse.tolist() == list(range(len(i)))[::-1]
    for arch in ANGULAR:
        calc = EquivariantCalculator(potentials.save(potentials.build(arch, SPECIES, dtype="float64", **SMALL[arch]),
                                                     tmp_path / f"{arch}.eqm"), compile="eager")
        dimer, lone = calc.predict([Atoms("CuO", positions=[[0, 0, 0], [0, 0, 2.0]]), Atoms("Cu")])
        assert np.isfinite(dimer["energy"]) and np.abs(dimer["forces"]).max() > 1e-4
        assert np.array_equal(dimer["forces"][0], -dimer["forces"][1])
        assert np.isfinite(lone["energy"]) and not lone["forces"].any()


def test_bases_equal_scipy():
    from scipy.special import eval_legendre, spherical_jn

    from potentials.angular import LegendreHarmonics, SphericalBesselBasis, bessel_roots

    roots = bessel_roots(7, 6)
    for l in range(7):
        assert np.abs(spherical_jn(l, roots[l])).max() < 1e-12
        assert (np.diff(roots[l]) > 0).all() and roots[l][0] > l  # the first n roots, in order
    d = torch.linspace(0.5, 5.0, 40, dtype=torch.float64)
    ours = SphericalBesselBasis(5.0, 7, 6)(d).numpy()
    for l in range(7):
        ref = spherical_jn(l, roots[l][None, :] * d.numpy()[:, None] / 5.0)
        ref *= np.sqrt(2.0) / np.abs(spherical_jn(l + 1, roots[l]))
        np.testing.assert_allclose(ours[:, l], ref, rtol=1e-9, atol=1e-10)  # basis values are O(1)
    c = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
    y = LegendreHarmonics(7)(c).numpy()
    for l in range(7):
        np.testing.assert_allclose(y[:, l], np.sqrt((2 * l + 1) / (4 * np.pi)) * eval_legendre(l, c.numpy()),
                                   rtol=0, atol=1e-13)


def bent(angle_deg: float) -> Atoms:
    """Atoms i, j, k with |ij| = |jk| = 2.3 Å and the angle at j; |ik| > 3 Å for angles > 82°."""
    a = np.radians(angle_deg)
    return Atoms("CuPtO", positions=[[2.3, 0, 0], [0, 0, 0], [2.3 * np.cos(a), 2.3 * np.sin(a), 0]])


@pytest.mark.parametrize("arch", ANGULAR)
def test_angles_reach_the_energy_where_distances_cannot(arch, tmp_path):
    """With a 3 Å cutoff the pair i-k is never an edge: a distance-only model sees the same graph
    at every angle; the angular models must not."""
    angles = [100.0, 120.0, 150.0, 179.0]
    energies = {}
    for name in ("schnet", arch):
        hyper = dict(SMALL.get(name, dict(features=16, num_interactions=2)), cutoff=3.0)
        path = potentials.save(potentials.build(name, SPECIES, dtype="float64", **hyper),
                               tmp_path / f"{name}.eqm")
        calc = EquivariantCalculator(path, compile="eager")
        energies[name] = np.array([r["energy"] for r in calc.predict([bent(x) for x in angles])])
    assert np.ptp(energies["schnet"]) < 1e-12
    # Untrained narrow test models answer weakly to angles, but ~1e5 times above rounding.
    assert np.ptp(energies[arch]) > 1e-6 * np.abs(energies[arch]).max()


def graph(repeat, cutoff=3.5):
    from ase.neighborlist import neighbor_list as ase_nl

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=1)
    i, j, S = ase_nl("ijS", atoms, cutoff)
    pos = torch.tensor(atoms.positions)
    shifts = torch.tensor(S, dtype=torch.float64)
    edge_index = torch.tensor(np.stack([i, j]))
    vectors = pos[edge_index[1]] - pos[edge_index[0]] + shifts @ torch.tensor(atoms.cell.array)
    return {keys.SPECIES: torch.tensor([k % 2 for k in range(len(atoms))]), keys.EDGE_INDEX: edge_index,
            keys.SHIFTS: shifts, keys.EDGE_VECTORS: vectors}


@pytest.mark.parametrize("arch", ANGULAR)
def test_torchscript_symbolic_trace_skin_and_rotation(arch):
    """With the direct-force head: energies and head in one graph (test_compiled.py compiles the
    conservative models through TorchScript and AOTInductor)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    model = potentials.build(arch, ["Cu", "Pt"], dtype="float64", direct_forces=True, **SMALL[arch])
    data = graph((1, 1, 2))
    reference = model(data)
    for key, value in torch.jit.script(model)(data).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-12)

    def f(species, edge_index, shifts, vectors):
        return model({keys.SPECIES: species, keys.EDGE_INDEX: edge_index, keys.SHIFTS: shifts,
                      keys.EDGE_VECTORS: vectors})

    names = (keys.SPECIES, keys.EDGE_INDEX, keys.SHIFTS, keys.EDGE_VECTORS)
    traced = make_fx(f, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*[data[k] for k in names])
    bigger = graph((2, 1, 2))
    out = traced(*[bigger[k] for k in names])  # other atom, edge and triplet counts, same graph
    for key, value in model(bigger).items():
        torch.testing.assert_close(out[key], value, rtol=0, atol=1e-12)
    # Pairs between the cutoff and a skin contribute exactly nothing.
    skin = graph((1, 1, 2), cutoff=4.5)
    assert skin[keys.EDGE_INDEX].shape[1] > data[keys.EDGE_INDEX].shape[1]
    for key, value in model(skin).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-13)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotated = model(dict(data, **{keys.EDGE_VECTORS: data[keys.EDGE_VECTORS] @ q.T}))
    torch.testing.assert_close(rotated[keys.ENERGIES], reference[keys.ENERGIES], rtol=0, atol=1e-12)
    torch.testing.assert_close(rotated[keys.FORCES], reference[keys.FORCES] @ q.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ANGULAR)
def test_big_batches_are_split_before_allocation_or_refused(arch, monkeypatch, tmp_path):
    path = potentials.save(potentials.build(arch, SPECIES, dtype="float64", **SMALL[arch]), tmp_path / "m.eqm")
    calc = EquivariantCalculator(path, compile="eager")
    assert calc.model.bytes_per_triplet > 0
    structures = [a for a, _ in systems().values()] + [bulk("Cu", "fcc", a=3.6, cubic=True)]
    whole = calc.predict(structures)
    calls = []
    runner = calc.model.runner
    monkeypatch.setattr(calc.model, "runner", lambda *a: calls.append(a[0].shape[0]) or runner(*a))
    monkeypatch.setattr(trip, "CPU_PIECE_BYTES", 1.0)  # every system its own piece
    pieces = calc.predict(structures)
    assert calls == [len(a) for a in structures]
    for a, b in zip(whole, pieces):
        assert abs(a["energy"] - b["energy"]) < 1e-12
        np.testing.assert_allclose(a["forces"], b["forces"], rtol=0, atol=1e-12)
        if "stress" in a:
            np.testing.assert_allclose(a["stress"], b["stress"], rtol=0, atol=1e-12)
    n = trip.count(*_edges(structures[-1], calc.model.cutoff))
    monkeypatch.setattr(trip, "available_memory", lambda device: 1000)
    with pytest.raises(SystemTooLargeError, match=f"{n:,} triplets"):
        calc.predict(structures[-1:])


def _edges(atoms, cutoff):
    i, j = neighbor_list("ij", atoms, cutoff)
    return torch.tensor(np.stack([i, j])), len(atoms)


def test_gemnet_scaling_factors_calibrate_and_travel_with_the_weights(tmp_path):
    from eqcalc.model import Model
    from potentials.gemnet import ScaleFactor

    # Two blocks: later factors are fitted on the output of already calibrated ones.
    model = potentials.build("gemnet", SPECIES, dtype="float64", **dict(SMALL["gemnet"], num_interactions=2))
    eqm = potentials.save(model, tmp_path / "g.eqm")
    probe = Model(eqm, compile="eager").probe_inputs()
    from eqcalc.derivatives import ForceStressModel

    wrapper = ForceStressModel(model, stress=False)
    fitted = model.calibrate(lambda: wrapper(*probe))
    assert len(fitted) == sum(isinstance(m, ScaleFactor) for m in model.modules()) >= 7
    assert any(abs(v - 1.0) > 0.05 for v in fitted.values())
    ratios = []
    for factor in (m for m in model.modules() if isinstance(m, ScaleFactor)):
        factor.register_forward_hook(lambda mod, inputs, out: ratios.append(
            float(out.detach().pow(2).mean() / inputs[1].detach().pow(2).mean())))
    wrapper(*probe)
    assert max(abs(r - 1.0) for r in ratios) < 1e-6  # each scaled sum has its reference's mean square
    again = potentials.load(potentials.save(model, tmp_path / "calibrated.eqm"))
    assert {k: float(v) for k, v in again.state_dict().items() if k.endswith(".scale") and v.dim() == 0} == \
        {k: float(v) for k, v in model.state_dict().items() if k.endswith(".scale") and v.dim() == 0}


@pytest.mark.parametrize("arch", ANGULAR)
def test_batched_engine_md_matches_ase_and_relaxes(arch, tmp_path):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from eqcalc.engine import md
    from eqcalc.engine.relax import relax
    from eqcalc.model import Model

    path = potentials.save(potentials.build(arch, SPECIES, dtype="float64", **SMALL[arch]), tmp_path / "m.eqm")
    model = Model(path, device="cpu", compile="eager")
    slab = fcc111("Cu", (2, 2, 2), a=3.6, vacuum=5.0)
    slab.rattle(0.1, seed=2)
    slab.set_momenta(np.random.default_rng(0).normal(scale=0.3, size=(len(slab), 3)))
    ref = slab.copy()
    ref.calc = EquivariantCalculator(model)
    VelocityVerlet(ref, 1.0 * units.fs, logfile=None).run(10)
    potential = md.ModelPotential(model)
    integrator = md.NVE(1.0)
    state = integrator.init(md.state_from_atoms([slab, slab.copy()]), potential)
    for _ in range(10):
        state = integrator.step(state, potential)
    n = len(slab)
    for s in range(2):
        assert np.abs(state.positions.numpy()[s * n:(s + 1) * n] - ref.positions).max() < 1e-8
    result = relax([slab, bent(110.0)], potential, fmax=0.05, max_steps=300)
    assert all(result.converged)
    assert max(np.abs(r.get_forces()).max() for r in result.structures) < 0.05


def test_bad_hyperparameters_are_refused():
    with pytest.raises(InvalidOptionError, match="int_features"):
        potentials.build("dimenet", ["Cu"], int_features=0)
    with pytest.raises(InvalidOptionError, match="num_spherical"):
        potentials.build("gemnet", ["Cu"], num_spherical=-1)
    with pytest.raises(InvalidOptionError, match="cutoff"):
        potentials.build("gemnet", ["Cu"], cutoff=0.0)
    model = potentials.build("gemnet", ["Cu"], num_before_skip=0, num_after_skip=0, **SMALL["gemnet"])
    assert len(model.interactions[0].before_skip) == 0  # layer counts may be 0
