"""Property-based tests (hypothesis): neighbor lists against ASE on random cells, and atoms
validation on random hostile inputs. (Model-file mutations: tests/test_package.py.)"""
import time

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from eqcalc import EquivariantCalculator, errors
from eqcalc.neighbors import MAX_IMAGES, compute_neighbors, neighbor_list

PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def random_system(draw, max_atoms=10):
    """A random cell (skewed, possibly smaller than the cutoff), pbc, atoms (wrapped or not)
    and a cutoff."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lengths = draw(st.tuples(*[st.floats(1.5, 8.0)] * 3))
    skew = draw(st.floats(0.0, 0.6))
    cell = np.diag(lengths) + skew * rng.uniform(-1, 1, (3, 3)) * np.array(lengths)[:, None]
    assume(abs(np.linalg.det(cell)) > 0.2 * np.prod(lengths))  # not nearly singular
    pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    n = draw(st.integers(1, max_atoms))
    frac = rng.uniform(-0.5, 1.5, (n, 3))
    cutoff = draw(st.floats(0.5, 6.0))
    return Atoms(f"Cu{n}", scaled_positions=frac, cell=cell, pbc=pbc), cutoff


def pairs(i, j, S, d, cutoff):
    """``{(i, j, S)}`` without pairs within 1e-9 Å of the cutoff (rounding may put them either side)."""
    keep = np.abs(d - cutoff) > 1e-9
    return set(zip(i[keep].tolist(), j[keep].tolist(), map(tuple, np.asarray(S)[keep].tolist())))


@PROPERTY
@given(system=random_system())
def test_neighbor_list_equals_ase(system):
    atoms, cutoff = system
    i, j, S, d = neighbor_list("ijSd", atoms, cutoff)
    assert pairs(i, j, S, d, cutoff) == pairs(*ase_neighbor_list("ijSd", atoms, cutoff), cutoff)
    assert np.all(d < cutoff)


@PROPERTY
@given(systems=st.lists(random_system(max_atoms=6), min_size=2, max_size=3), order_seed=st.integers(0, 1000))
def test_batch_in_any_atom_order_equals_each_system(systems, order_seed):
    """A batch whose system vector is not sorted gives each system's own list, mapped to the
    batch's atom order: never an edge between systems."""
    cutoff = systems[0][1]
    positions = np.concatenate([a.positions for a, _ in systems])
    system = np.repeat(np.arange(len(systems)), [len(a) for a, _ in systems])
    perm = np.random.default_rng(order_seed).permutation(len(system))
    edge_index, shifts = compute_neighbors(
        torch.tensor(positions[perm]), torch.tensor(np.stack([a.cell.array for a, _ in systems])),
        torch.tensor(np.stack([a.pbc for a, _ in systems])), cutoff, torch.tensor(system[perm]))
    inverse = np.argsort(perm)  # batch index of original atom k is inverse[k]
    got = set(zip(perm[edge_index[0].numpy()].tolist(), perm[edge_index[1].numpy()].tolist(),
                  map(tuple, shifts.numpy().tolist())))
    expected, offset = set(), 0
    for atoms, _ in systems:
        i, j, S = ase_neighbor_list("ijS", atoms, cutoff)
        expected |= set(zip((i + offset).tolist(), (j + offset).tolist(), map(tuple, S.tolist())))
        offset += len(atoms)
    assert got == expected
    assert (np.diff(edge_index[0].numpy()) >= 0).all()  # still sorted by centre atom
    assert len(inverse) == len(system)


@settings(max_examples=20, deadline=None)
@given(height=st.floats(1e-7, 4e-3), cutoff=st.floats(4.0, 8.0), n=st.integers(1, 20))
def test_nearly_flat_cell_is_refused_quickly(height, cutoff, n):
    assume(cutoff / height > MAX_IMAGES)
    rng = np.random.default_rng(n)
    atoms = Atoms(f"Cu{n}", positions=rng.uniform(0, 8, (n, 3)) * [1, 1, height],
                  cell=[[8, 0, 0], [0, 8, 0], [0, 0, height]], pbc=True)
    start = time.perf_counter()
    with pytest.raises(errors.CellError, match="thick along periodic direction 2"):
        neighbor_list("ij", atoms, cutoff)
    assert time.perf_counter() - start < 2.0


# ---- atoms validation --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calc(package_path):
    return EquivariantCalculator(package_path("schnet"), compile="eager", device="cpu")


@st.composite
def hostile_atoms(draw):
    n = draw(st.integers(0, 6))
    numbers = draw(st.lists(st.one_of(st.sampled_from([29, 78, 6, 8, 1]), st.integers(-200, 300)),
                            min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    positions = rng.uniform(-3, 3, (n, 3)) * draw(st.sampled_from([0.01, 1.0, 3.0]))
    cell = rng.uniform(-6, 6, (3, 3)) * draw(st.sampled_from([0.0, 1e-6, 1.0]))
    for array, shape in ((positions, (n, 3)), (cell, (3, 3))):
        if n and draw(st.booleans()) and array.size:
            array[tuple(rng.integers(0, s) for s in shape)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    pbc = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    atoms.arrays["numbers"] = np.asarray(numbers, dtype=int)  # past ASE's own checks, as a file could
    return atoms


@PROPERTY
@given(atoms=hostile_atoms())
def test_hostile_atoms_give_a_number_or_a_typed_error(calc, atoms):
    """Never an untyped exception, never a non-finite result; invalid inputs always refused."""
    invalid = (len(atoms) == 0 or not np.isfinite(atoms.positions).all() or not np.isfinite(atoms.cell.array).all()
               or any(z < 1 or z > 118 for z in atoms.numbers)
               or any(z not in (29, 78, 6, 8, 1) for z in atoms.numbers))
    atoms.calc = calc
    try:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    except errors.EqcalcError:
        return
    assert not invalid
    assert np.isfinite(energy) and np.isfinite(forces).all()
