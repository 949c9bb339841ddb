"""Second derivatives: smooth energies at symmetric sites, Hessians by autograd, and what uses them.

The physics library's second-order checks (potentials.testing) over every registered
architecture, the shipped models, and the calculator's Hessian API; vibrations and phonons are
in tests/test_vibrations.py.
"""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, add_adsorbate, molecule
from ase.calculators.emt import EMT

import potentials
from eqcalc import EquivariantCalculator
from eqcalc.errors import InvalidAtomsError, InvalidOptionError, PropertyNotAvailableError
from potentials import testing as T
from tests.conftest import SPECIES

ARCHS = potentials.architectures()
STRUCTS = T.structures(SPECIES)
SITES = T.symmetric_sites(["Cu"], adsorbate="O")


@pytest.fixture(scope="module")
def calc(package_path):
    cache = {}

    def get(arch, dtype="float64"):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = EquivariantCalculator(package_path(arch, "float64"), compile="eager",
                                                       dtype=dtype, device="cpu")
        return cache[arch, dtype]

    return get


def smooth(arch) -> bool:
    return getattr(potentials.build(arch, species=["Cu"]), "smooth", True)


SMOOTH = [a for a in ARCHS if smooth(a)]
NOT_SMOOTH = [a for a in ARCHS if not smooth(a)]


def test_every_architecture_is_classified():
    assert set(SMOOTH) >= {"schnet", "painn", "nequip", "mace", "dimenet", "gemnet"}
    assert "faenet" in NOT_SMOOTH


@pytest.mark.parametrize("arch", SMOOTH)
@pytest.mark.parametrize("site", list(SITES))
def test_force_grows_linearly_at_symmetric_sites(calc, arch, site):
    atoms, index, direction = SITES[site]
    r = T.check_linear_response(calc(arch), atoms, index, direction, hessian_calc=calc(arch))
    assert r["force_at_site"] < 1e-9, r   # zero by symmetry
    assert r["spread"] <= T.TOLERANCES["float64"]["linear_response"], r
    assert r["hessian"] <= 1e-5, r        # the slope is the Hessian's diagonal element


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", SMOOTH)
@pytest.mark.parametrize("name", ["small_triclinic", "slab", "cluster"])
def test_hessian_matches_finite_differences_of_forces(calc, arch, dtype, name):
    err = T.check_hessian_fd(calc(arch, dtype), STRUCTS[name], reference=calc(arch))
    assert err <= T.TOLERANCES[dtype]["fd_hessian"], err


@pytest.mark.parametrize("arch", SMOOTH)
def test_hessian_is_symmetric_and_obeys_the_acoustic_sum_rule(calc, arch):
    for name in ("small_triclinic", "slab", "cluster"):
        r = T.check_hessian_identities(calc(arch), STRUCTS[name])
        assert r["symmetry"] <= T.TOLERANCES["float64"]["hessian_symmetry"], (name, r)
        assert r["acoustic_sum"] <= T.TOLERANCES["float64"]["acoustic_sum"], (name, r)


@pytest.mark.parametrize("arch", NOT_SMOOTH)
def test_models_without_second_derivatives_refuse_the_hessian_and_say_why(calc, arch):
    reason = T.second_order_limit(calc(arch))
    assert reason is not None and "frame averaging" in reason
    with pytest.raises(PropertyNotAvailableError, match="frame averaging"):
        calc(arch).get_hessian(STRUCTS["bulk"])


def test_the_library_sees_the_cusp_of_the_papers_painn_norm(tmp_path):
    """PaiNN with the paper's |V v| (what every file before the fix used): at a perfect fcc site
    the force does not vanish linearly, so the linear-response check fails by orders of
    magnitude, and the calculator refuses the Hessian. Files without ``vector_norm`` load so."""
    path = tmp_path / "legacy.eqm"
    model = potentials.build("painn", species=SPECIES, dtype="float64", vector_norm="sqrt")
    potentials.save(model, path)
    import zipfile, json  # noqa: E401 - rewrite the config as an old file had it
    with zipfile.ZipFile(path) as z:
        meta, blob = json.loads(z.read("metadata.json")), z.read("weights.safetensors")
    del meta["config"]["vector_norm"]
    from eqcalc import package
    package.write(path, {k: v for k, v in meta.items() if k not in ("format", "schema_version", "weights_sha256",
                                                                    "eqcalc_version", "torch_version", "units")},
                  potentials.load(path).state_dict())
    legacy = EquivariantCalculator(str(path), compile="eager", device="cpu")
    atoms, index, direction = SITES["fcc"]
    r = T.check_linear_response(legacy, atoms, index, direction)
    # The stiffness at 1e-5 Å is the cusp's curvature, not the crystal's: it collapses by 1e-2 Å.
    assert r["spread"] > 0.5, r
    assert "vector norm" in T.second_order_limit(legacy)
    with pytest.raises(PropertyNotAvailableError, match="retrain"):
        legacy.get_hessian(atoms)


def test_smooth_norm_differs_from_the_paper_only_near_zero():
    import torch
    from potentials.painn import SmoothNorm, SqrtNorm

    w = torch.tensor([[[0.0]], [[1e-3]], [[30.0]]], dtype=torch.float64).expand(3, 3, 1)
    smooth_, paper = SmoothNorm()(w).squeeze(), SqrtNorm()(w).squeeze()
    assert smooth_[0] == 0 and abs(smooth_[1] / 1.5e-6 - 1) < 1e-5      # |w|^2 / 2 near zero
    assert abs(smooth_[2] - (paper[2] - 1)) < 0.02                    # |w| - 1 far away


def test_hessian_of_emt_like_reference_is_what_ase_finite_differences_give(calc):
    """The calculator's Hessian against ASE's own finite differences (Vibrations) on a molecule."""
    from ase.vibrations import Vibrations

    atoms = STRUCTS["cluster"].copy()
    c = calc("schnet")
    atoms.calc = c
    vib = Vibrations(atoms, indices=[0, 3], delta=1e-3, nfree=4, name=str(pytest.importorskip("tempfile").mkdtemp()))
    vib.run()
    fd = vib.get_vibrations().get_hessian_2d()
    h = c.get_hessian(atoms, indices=[0, 3])
    assert np.abs(0.5 * (h + h.T) - fd).max() <= 1e-6 * np.abs(fd).max()


def test_index_block_and_batch_equal_the_full_single_hessian(calc):
    c = calc("painn")
    a, b = STRUCTS["slab"], STRUCTS["cluster"]
    full_a, full_b = c.get_hessian(a), c.get_hessian(b)
    assert full_a.shape == (3 * len(a), 3 * len(a))
    idx = [len(a) - 1, 2, 5]
    cols = (3 * np.array(idx)[:, None] + np.arange(3)).reshape(-1)
    block = c.get_hessian(a, indices=idx)
    assert np.abs(block - full_a[np.ix_(cols, cols)]).max() <= 1e-12 * np.abs(full_a).max()
    batch = c.predict_hessian([a, b, a], [None, None, idx])
    assert np.abs(batch[0] - full_a).max() <= 1e-12 * np.abs(full_a).max()
    assert np.abs(batch[1] - full_b).max() <= 1e-12 * np.abs(full_b).max()
    assert np.abs(batch[2] - block).max() <= 1e-12 * np.abs(full_a).max()


def test_small_batches_of_directions_give_the_same_hessian(calc):
    """Chunking (bounded memory) changes nothing."""
    import torch
    from eqcalc.atoms import to_tensors
    from eqcalc.neighbors import compute_neighbors

    c = calc("nequip")
    atoms = STRUCTS["small_triclinic"]
    t = to_tensors([atoms])
    e, s = compute_neighbors(t.positions, t.cell, t.pbc, c.model.cutoff, t.system)
    rows = torch.arange(3 * len(atoms))
    big = c.model.hessian(t, e, s, rows, max_batch=64)
    small = c.model.hessian(t, e, s, rows, max_batch=2)
    assert torch.allclose(big, small, rtol=0, atol=1e-12 * float(big.abs().max()))


def test_batched_rows_are_zero_outside_their_system(calc):
    """derivatives.hessian on a batch of two systems (one backward pass serves a row of each):
    every row is exactly zero in the other system's columns and equals the single-system Hessian
    in its own."""
    import torch
    from eqcalc.atoms import to_tensors
    from eqcalc.neighbors import compute_neighbors

    c = calc("painn")
    a, b = STRUCTS["slab"], STRUCTS["cluster"]
    t = to_tensors([a, b])
    e, s = compute_neighbors(t.positions, t.cell, t.pbc, c.model.cutoff, t.system)
    h = c.model.hessian(t, e, s, torch.arange(3 * (len(a) + len(b)))).numpy()
    na = 3 * len(a)
    assert not h[:na, na:].any() and not h[na:, :na].any()
    for block, single in ((h[:na, :na], c.get_hessian(a)), (h[na:, na:], c.get_hessian(b))):
        assert np.abs(block - single).max() <= 1e-12 * np.abs(single).max()


def test_cpu_groups_of_systems_give_the_one_graph_hessian(calc, monkeypatch):
    """A CPU batch cut into groups of systems (one graph each) gives what one graph of the whole
    batch gives, for rows picked in any order across systems, and zero across groups."""
    import torch
    from eqcalc import derivatives
    from eqcalc.atoms import consecutive_ranges, to_tensors
    from eqcalc.neighbors import compute_neighbors

    c = calc("painn")
    a, b = STRUCTS["slab"], STRUCTS["cluster"]
    t = to_tensors([a, b, a, b])
    e, s = compute_neighbors(t.positions, t.cell, t.pbc, c.model.cutoff, t.system)
    n = len(a) + len(b)
    rows = torch.tensor([3 * n + 4, 1, 3 * (n + len(a)) + 2, 3 * len(a) + 5, 7, 3 * n + 1])
    one_graph = c.model.hessian(t, e, s, rows, max_batch=1)
    edges = torch.bincount(t.system[e[0]]).tolist()
    monkeypatch.setattr(derivatives, "HESSIAN_CPU_EDGES", max(edges[0], edges[1]))
    assert consecutive_ranges(edges, derivatives.HESSIAN_CPU_EDGES) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    grouped = c.model.hessian(t, e, s, rows)
    assert torch.allclose(grouped, one_graph, rtol=0, atol=1e-12 * float(one_graph.abs().max()))
    assert float(one_graph.abs().max()) > 0


def test_hessian_bad_input_gets_typed_errors(calc):
    c = calc("painn")
    atoms = STRUCTS["cluster"].copy()
    for bad, match in [([], "non-empty"), ([0, 0], "twice"), ([len(atoms)], "out of range"),
                       ([0.5], "integers")]:
        with pytest.raises(InvalidOptionError, match=match):
            c.get_hessian(atoms, indices=bad)
    nan = atoms.copy()
    nan.positions[1] = np.nan
    with pytest.raises(InvalidAtomsError, match="NaN"):
        c.get_hessian(nan)
    overlap = atoms.copy()
    overlap.positions[1] = overlap.positions[0] + 0.01
    with pytest.raises(InvalidAtomsError, match="overlap"):
        c.get_hessian(overlap)
    with pytest.raises(InvalidOptionError, match="needs atoms"):
        EquivariantCalculator(c.model).get_hessian()
    with pytest.raises(InvalidOptionError, match="one list"):
        c.predict_hessian([atoms, atoms], [None])


@pytest.mark.parametrize("name", ["default", "schnet"])
def test_shipped_models_are_smooth_and_restoring_at_symmetric_sites(name):
    """Perfect fcc crystals of all seven metals and O in the fcc hollow of Pt(111) are minima:
    the force on a displaced atom grows linearly and pulls it back (float64 on the shipped
    weights, so the check sees the function, not float32 rounding)."""
    c = EquivariantCalculator(name, compile="eager", dtype="float64", device="cpu")
    for metal, a in [("Al", 4.05), ("Ni", 3.52), ("Cu", 3.61), ("Pd", 3.89), ("Ag", 4.09), ("Pt", 3.92), ("Au", 4.08)]:
        crystal = bulk(metal, "fcc", a=a, cubic=True).repeat(2)
        r = T.check_linear_response(c, crystal, 0, (1.0, 0.0, 0.0), hessian_calc=c)
        assert r["spread"] <= T.TOLERANCES["float64"]["linear_response"], (metal, r)
        assert r["stiffness"] > 0.5, (metal, r)   # eV/Å²: EMT gives 3-9 for these metals
        assert r["hessian"] <= 1e-5, (metal, r)
    slab = fcc111("Pt", size=(3, 3, 3), a=3.92, vacuum=6.0)
    slab.pbc = (True, True, False)
    add_adsorbate(slab, "O", 1.2, "fcc")
    r = T.check_linear_response(c, slab, len(slab) - 1, (1.0, 0.0, 0.0), hessian_calc=c)
    assert r["spread"] <= T.TOLERANCES["float64"]["linear_response"] and r["stiffness"] > 0, r


def test_shipped_faenet_refuses_the_hessian():
    c = EquivariantCalculator("faenet", compile="eager", device="cpu")
    with pytest.raises(PropertyNotAvailableError, match="frame averaging"):
        c.get_hessian(bulk("Cu", "fcc", a=3.61))


def test_emt_reference_is_linear_at_the_same_sites():
    """The check itself on the ground truth: EMT passes it (so the tolerance is attainable)."""

    class EMTBatch:
        def predict(self, structures):
            out = []
            for s in structures:
                s = s.copy()
                s.calc = EMT()
                out.append({"forces": s.get_forces()})
            return out

    for site in ("fcc", "adsorbate_hollow"):
        atoms, index, direction = SITES[site]
        r = T.check_linear_response(EMTBatch(), atoms, index, direction)
        assert r["spread"] <= T.TOLERANCES["float64"]["linear_response"] and r["stiffness"] > 0, (site, r)
