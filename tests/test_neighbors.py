"""Tests of eqcalc.neighbors against ase.neighborlist.neighbor_list."""
import itertools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

import eqcalc.neighbors as nbmod
from eqcalc.errors import CellError, InvalidAtomsError, InvalidOptionError
from eqcalc import _native
from eqcalc.neighbors import NeighborList, compute_neighbors, neighbor_list

BUILT_LIBRARY = _native.library()


@pytest.fixture(autouse=True, params=["native", "torch"])
def search_path(request, monkeypatch):
    """Every test runs on the compiled CPU cell list and on the pure-torch search."""
    if request.param == "torch":
        monkeypatch.setattr(_native, "library", lambda: None)
    return request.param


def test_native_library_is_built():
    # install.sh builds it; without it the torch path would silently carry all CPU work
    assert BUILT_LIBRARY is not None


@pytest.mark.parametrize("search_path", ["both"])  # overrides the autouse fixture: runs once, both paths
def test_native_and_torch_paths_give_the_same_list_on_large_cells(monkeypatch, search_path):
    assert _native.library() is not None  # the compiled path really runs first
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((6, 5, 4))
    atoms.rattle(0.05, seed=0)
    atoms.positions[:7] += 2.3 * atoms.cell[0]  # unwrapped atoms
    pos, cell, pbc = (torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), torch.tensor([True, True, False]))
    native = compute_neighbors(pos, cell, pbc, 5.0)
    monkeypatch.setattr(_native, "library", lambda: None)
    plain = compute_neighbors(pos, cell, pbc, 5.0)
    assert edge_set(native[0][0], native[0][1], native[1]) == edge_set(plain[0][0], plain[0][1], plain[1])


def edge_set(i, j, S):
    i, j, S = (np.asarray(x) for x in (i, j, S))
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))


def random_systems(seed=1234, n=120):
    """Skewed triclinic cells, small cells, all 8 pbc combos, atoms outside, 1-atom cells."""
    rng = np.random.default_rng(seed)
    out = []
    combos = list(itertools.product([False, True], repeat=3))
    for t in range(n):
        pbc = np.array(combos[t % 8])
        kind = t % 5
        if kind == 0:      # one atom in a small (often < cutoff) skewed cell
            n_atoms = 1
            cell = np.diag(rng.uniform(1.5, 4.0, 3)) + rng.uniform(-0.8, 0.8, (3, 3))
        elif kind == 1:    # small cell, few atoms, cell smaller than the cutoff
            n_atoms = int(rng.integers(2, 6))
            cell = np.diag(rng.uniform(2.0, 4.0, 3)) + rng.uniform(-0.5, 0.5, (3, 3))
        else:              # strongly skewed triclinic cell
            n_atoms = int(rng.integers(5, 60))
            cell = np.diag(rng.uniform(4.0, 10.0, 3)) + rng.uniform(-3.0, 3.0, (3, 3))
        if abs(np.linalg.det(cell)) < 2.0:
            cell += np.eye(3) * 3.0
        frac = rng.uniform(-0.6, 1.6, (n_atoms, 3))       # atoms outside the cell
        positions = frac @ cell
        if t % 7 == 3:      # open directions with a zero cell vector
            cell[~pbc] = 0.0
        cutoff = float(rng.uniform(1.5, 5.5))
        out.append((Atoms(f"H{n_atoms}", positions=positions, cell=cell, pbc=pbc), cutoff))
    # non-periodic clusters (no cell at all)
    for t in range(8):
        n_atoms = int(rng.integers(1, 80))
        pos = rng.normal(size=(n_atoms, 3)) * rng.uniform(1.0, 6.0)
        out.append((Atoms(f"H{n_atoms}", positions=pos), float(rng.uniform(1.0, 5.0))))
    return out


SYSTEMS = random_systems()


def test_matches_ase_on_random_systems():
    assert len(SYSTEMS) >= 100
    for atoms, cutoff in SYSTEMS:
        ri, rj, rS, rd, rD = ase_neighbor_list("ijSdD", atoms, cutoff)
        i, j, S, d, D = neighbor_list("ijSdD", atoms, cutoff)
        assert edge_set(i, j, S) == edge_set(ri, rj, rS), (atoms, cutoff)
        assert i.dtype == ri.dtype and S.dtype == rS.dtype and d.dtype == rd.dtype
        assert np.all(np.diff(i) >= 0)             # sorted by centre atom
        # d, D per edge equal to ASE's
        ref = {k: n for n, k in enumerate(zip(ri.tolist(), rj.tolist(), map(tuple, rS.tolist())))}
        perm = np.array([ref[k] for k in zip(i.tolist(), j.tolist(), map(tuple, S.tolist()))],
                        dtype=int)
        if len(perm):
            np.testing.assert_allclose(d, rd[perm], rtol=0, atol=1e-12)
            np.testing.assert_allclose(D, rD[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("all_pairs_max", [0, 10 ** 9])
def test_cell_list_and_all_pairs_paths_agree(monkeypatch, all_pairs_max):
    monkeypatch.setattr(nbmod, "_ALL_PAIRS_MAX", all_pairs_max)
    monkeypatch.setattr(nbmod, "_TORCH_CLUSTER_MIN_ATOMS", 10 ** 9)   # torch path only
    for atoms, cutoff in SYSTEMS[::3]:
        if all_pairs_max and len(atoms) > 40:
            continue
        ref = ase_neighbor_list("ijS", atoms, cutoff)
        assert edge_set(*neighbor_list("ijS", atoms, cutoff)) == edge_set(*ref)


def test_bulk_slab_molecule_and_self_interaction():
    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    cu.rattle(0.05, seed=1)
    slab = fcc111("Pt", size=(3, 3, 3), vacuum=6.0)         # pbc [T, T, F]
    slab.positions[:, :2] += 7.0                            # outside the cell in-plane
    mol = molecule("CH3CH2OH")
    one = bulk("Cu", "fcc", a=3.61)                        # 1 atom, cell << cutoff
    for atoms in (cu, slab, mol, one):
        for cutoff in (2.0, 5.0, 7.3):
            for si in (False, True):
                ref = ase_neighbor_list("ijS", atoms, cutoff, self_interaction=si)
                got = neighbor_list("ijS", atoms, cutoff, self_interaction=si)
                assert edge_set(*got) == edge_set(*ref)
    assert neighbor_list("d", one, 3.0).shape == (12,)     # 12 fcc neighbours, self-images


def test_rotation_and_translation_invariance():
    rng = np.random.default_rng(7)
    for atoms, cutoff in SYSTEMS[:40] + SYSTEMS[-8:]:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        rot = atoms.copy()
        rot.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
        rot.positions = atoms.positions @ q.T + rng.normal(size=3) * 2.0
        a = neighbor_list("ijSd", atoms, cutoff)
        b = neighbor_list("ijSd", rot, cutoff)
        # r_ij = p_j - p_i + S @ cell is unchanged by rotating both and translating positions
        assert edge_set(*a[:3]) == edge_set(*b[:3])
        da = dict(zip(zip(a[0].tolist(), a[1].tolist(), map(tuple, a[2].tolist())), a[3]))
        for key, d in zip(zip(b[0].tolist(), b[1].tolist(), map(tuple, b[2].tolist())), b[3]):
            assert abs(da[key] - d) < 1e-9


def _tensors(atoms):
    return (torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
            torch.tensor(atoms.pbc))


@pytest.mark.parametrize("block_entries", [1, 1 << 15])
def test_batched_equals_per_system(monkeypatch, block_entries):
    monkeypatch.setattr(nbmod, "_BLOCK_ENTRIES", block_entries)   # 1: one atom per block
    picks = [SYSTEMS[k] for k in (0, 2, 5, 11, 17, 23, 104)]
    cutoff = 4.0
    pos, cells, pbcs, system, ref = [], [], [], [], set()
    offset = 0
    for s, (atoms, _) in enumerate(picks):
        p, c, b = _tensors(atoms)
        ei, S = compute_neighbors(p, c, b, cutoff)
        ref |= edge_set(ei[0] + offset, ei[1] + offset, S)
        pos.append(p), cells.append(c), pbcs.append(b)
        system.append(torch.full((len(atoms),), s, dtype=torch.int64))
        offset += len(atoms)
    ei, S = compute_neighbors(torch.cat(pos), torch.stack(cells), torch.stack(pbcs), cutoff,
                              system=torch.cat(system))
    assert edge_set(ei[0], ei[1], S) == ref
    assert bool((ei[0][1:] >= ei[0][:-1]).all())


def test_neighbor_list_skin_reuse():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    atoms.rattle(0.05, seed=3)
    pos, cell, pbc = _tensors(atoms)
    cutoff, skin = 4.0, 0.6
    nl = NeighborList(cutoff, skin=skin)
    nl.update(pos, cell, pbc)
    assert nl.n_builds == 1
    rng = np.random.default_rng(0)
    moved = pos.clone()
    for _ in range(5):   # small moves: below skin/2 in total
        moved = pos + torch.tensor(rng.uniform(-0.05, 0.05, pos.shape))
        ei, S = nl.update(moved, cell, pbc)
    assert nl.n_builds == 1 and nl.n_calls == 6
    # the reused list, filtered to the cutoff, equals a fresh list
    rij = moved[ei[1]] - moved[ei[0]] + S.double() @ cell
    mask = rij.norm(dim=1) < cutoff
    fresh_ei, fresh_S = compute_neighbors(moved, cell, pbc, cutoff)
    assert edge_set(ei[0][mask], ei[1][mask], S[mask]) == edge_set(fresh_ei[0], fresh_ei[1],
                                                                   fresh_S)
    big = pos.clone()
    big[0, 0] += 0.31                      # > skin / 2
    nl.update(big, cell, pbc)
    assert nl.n_builds == 2
    nl.update(big, cell * 1.01, pbc)       # cell change
    assert nl.n_builds == 3
    nl.update(big, cell * 1.01, torch.tensor([True, True, False]))    # pbc change
    assert nl.n_builds == 4
    nl.update(big, cell * 1.01, torch.tensor([True, True, False]),
              numbers=torch.full((len(atoms),), 29))                 # numbers given/changed
    assert nl.n_builds == 5
    nl0 = NeighborList(cutoff, skin=0.0)
    nl0.update(pos, cell, pbc)
    nl0.update(pos, cell, pbc)
    assert nl0.n_builds == 2


def test_typed_errors():
    pos = torch.zeros((2, 3), dtype=torch.float64)
    pos[1, 0] = 1.0
    cell = torch.eye(3, dtype=torch.float64) * 5
    pbc = torch.tensor([True, True, True])
    bad = pos.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(InvalidAtomsError, match="positions"):
        compute_neighbors(bad, cell, pbc, 3.0)
    bad[0, 1] = float("inf")
    with pytest.raises(InvalidAtomsError, match="positions"):
        compute_neighbors(bad, cell, pbc, 3.0)
    badc = cell.clone()
    badc[1, 1] = float("nan")
    with pytest.raises(InvalidAtomsError, match="cell"):
        compute_neighbors(pos, badc, pbc, 3.0)
    for cutoff in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidAtomsError, match="cutoff"):
            compute_neighbors(pos, cell, pbc, cutoff)
    zero = cell.clone()
    zero[2] = 0.0
    with pytest.raises(CellError, match="pbc"):
        compute_neighbors(pos, zero, pbc, 3.0)
    # zero vector along an open direction is fine
    compute_neighbors(pos, zero, torch.tensor([True, True, False]), 3.0)
    sing = cell.clone()
    sing[2] = sing[0] + sing[1]
    with pytest.raises(CellError, match="singular"):
        compute_neighbors(pos, sing, pbc, 3.0)
    two = cell.clone()
    two[1] = 2 * two[0]
    with pytest.raises(CellError):
        compute_neighbors(pos, two, torch.tensor([True, True, False]), 3.0)
    atoms = bulk("Cu", "fcc", a=3.61)
    for q in ("ijx", "", "ijk"):
        with pytest.raises(InvalidOptionError, match="quantities"):
            neighbor_list(q, atoms, 3.0)
    assert issubclass(CellError, ValueError) and issubclass(InvalidOptionError, ValueError)


def test_memory_chunking_large_cutoff(monkeypatch):
    monkeypatch.setattr(nbmod, "_MAX_CANDIDATES", 5000)
    monkeypatch.setattr(nbmod, "_ALL_PAIRS_MAX", 0)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=2)
    ref = ase_neighbor_list("ijS", atoms, 9.0)
    assert edge_set(*neighbor_list("ijS", atoms, 9.0)) == edge_set(*ref)


def test_empty_and_single_quantity():
    atoms = Atoms()
    assert neighbor_list("i", Atoms("H", positions=[[0, 0, 0]]), 2.0).shape == (0,)
    ei, S = compute_neighbors(torch.zeros((0, 3), dtype=torch.float64), torch.zeros(3, 3),
                              torch.zeros(3, dtype=torch.bool), 2.0)
    assert ei.shape == (2, 0) and S.shape == (0, 3)
    del atoms


def test_torch_cluster_agrees_if_available(monkeypatch):
    pytest.importorskip("torch_cluster")
    monkeypatch.setattr(nbmod, "_TORCH_CLUSTER_MIN_ATOMS", 10 ** 9)   # torch path below
    rng = np.random.default_rng(5)
    for n in (10, 300):
        pos = torch.tensor(rng.normal(size=(n, 3)) * 5)
        ei, S = compute_neighbors(pos, torch.zeros(3, 3, dtype=torch.float64),
                                  torch.zeros(3, dtype=torch.bool), 3.0)
        ei2 = nbmod._torch_cluster_radius(pos, 3.0)
        assert ei2 is not None
        assert edge_set(ei[0], ei[1], S) == edge_set(ei2[0], ei2[1], torch.zeros((ei2.shape[1], 3),
                                                                                dtype=torch.int64))


def test_outputs_are_contiguous_tensors():
    # torch.export and AOTInductor guard on strides: a view of a larger buffer breaks them.
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    ei, S = compute_neighbors(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
                              torch.tensor(atoms.pbc), 5.0)
    assert ei.is_contiguous() and S.is_contiguous()


def test_edge_pairs_join_each_edge_with_its_reverse_only():
    """Each pair holds an edge (i, j, S) and its reverse (j, i, -S) (whose vectors are exact
    negatives, so their lengths are bitwise equal), never two edges that merely share atoms
    (small cells: many images of one neighbour, some at equal distances) or a length."""
    from eqcalc.derivatives import edge_vectors
    from eqcalc.neighbors import edge_pairs

    cases = [(bulk("Cu", "fcc", a=3.6), 6.0), (bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2), 4.0),
             (fcc111("Pt", (2, 2, 3), vacuum=4.0), 5.0), (molecule("CH3OH"), 3.0)]
    for atoms, cutoff in cases:
        pos = torch.tensor(atoms.positions)
        cell, pbc = torch.tensor(atoms.cell.array).unsqueeze(0), torch.tensor(atoms.pbc).unsqueeze(0)
        edge_index, shifts = compute_neighbors(pos, cell, pbc, cutoff)
        first, pair = edge_pairs(edge_index, shifts, len(atoms))
        n_edges = edge_index.shape[1]
        assert first.shape[0] == n_edges // 2 and n_edges % 2 == 0   # a full list: every edge has one reverse
        assert torch.equal(torch.bincount(pair), torch.full_like(first, 2))
        partner = torch.empty(n_edges, dtype=torch.int64)
        for p in range(first.shape[0]):
            a, b = torch.nonzero(pair == p).squeeze(1).tolist()
            partner[a], partner[b] = b, a
        assert torch.equal(edge_index[:, partner], edge_index.flip(0))
        assert torch.equal(shifts[partner], -shifts)
        d = edge_vectors(pos, cell, edge_index, shifts.to(pos.dtype), torch.zeros(len(atoms), dtype=torch.int64))
        assert torch.equal(d[partner], -d) and torch.equal(first, torch.minimum(torch.arange(n_edges), partner)[first])
    # a half list (no reverses): every edge a pair of its own
    half = torch.tensor([[0, 0, 1], [1, 2, 2]])
    first, pair = edge_pairs(half, torch.zeros(3, 3), 3)
    assert first.tolist() == [0, 1, 2] and sorted(pair.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("search_path", ["both"])  # overrides the autouse fixture: compiled vs torch here
def test_compiled_edge_pairs_equal_the_torch_ones(search_path):
    """celllist.c's pair search gives the torch version's numbering exactly: full lists of
    bulk, slab, small cells, a molecule, and a shuffled list with self-images and some edges
    missing their reverse; an index outside the atoms is a typed error."""
    from eqcalc import _native
    from eqcalc.neighbors import _edge_pairs_torch, edge_pairs

    assert _native.library() is not None
    lists = []
    for atoms, cutoff in [(bulk("Cu", "fcc", a=3.6), 6.0), (bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3), 5.0),
                          (fcc111("Pt", (2, 2, 3), vacuum=4.0), 5.0), (molecule("CH3OH"), 3.0)]:
        pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array).unsqueeze(0)
        edge_index, shifts = compute_neighbors(pos, cell, torch.tensor(atoms.pbc).unsqueeze(0), cutoff)
        lists.append((edge_index, shifts.to(torch.float64), len(atoms)))
    g = torch.Generator().manual_seed(0)
    edge_index, shifts, n = lists[1]
    keep = torch.randperm(edge_index.shape[1], generator=g)[: edge_index.shape[1] * 9 // 10]
    lists.append((edge_index[:, keep], shifts[keep], n))
    for edge_index, shifts, n in lists:
        compiled, reference = edge_pairs(edge_index, shifts, n), _edge_pairs_torch(edge_index, shifts, n)
        assert all(torch.equal(a, b) for a, b in zip(compiled, reference))
    with pytest.raises(InvalidAtomsError, match="outside 0..2"):
        edge_pairs(torch.tensor([[0, 3], [1, 0]]), torch.zeros(2, 3), 3)


def test_a_cell_changed_in_place_between_calls_gets_its_own_neighbors():
    """Cell geometry is kept by value for the next builds: a cell tensor changed in place, the
    same cell with other pbc or cutoff, and the first cell again each give ASE's list."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=3)
    pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    for strain, pbc, cutoff in [(0.0, (True,) * 3, 4.0), (0.08, (True,) * 3, 4.0), (0.08, (True, True, False), 4.0),
                                (0.08, (True,) * 3, 4.5), (0.0, (True,) * 3, 4.0)]:
        cell.copy_(torch.tensor(atoms.cell.array) * (1 + strain))  # the same tensor, new values
        edge_index, shifts = compute_neighbors(pos, cell, torch.tensor(pbc), cutoff)
        other = Atoms(atoms.numbers, positions=atoms.positions, cell=cell.numpy(), pbc=pbc)
        assert edge_set(edge_index[0], edge_index[1], shifts) == edge_set(*ase_neighbor_list("ijS", other, cutoff))
    cell[2] = 0.0  # a slab's cell: fine while direction 2 is open, refused once it is periodic
    compute_neighbors(pos, cell, torch.tensor((True, True, False)), 4.0)
    with pytest.raises(CellError, match="cell vector 2 of system 0 is zero"):
        compute_neighbors(pos, cell, torch.tensor((True, True, True)), 4.0)
