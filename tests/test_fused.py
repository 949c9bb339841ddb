"""potentials.fused: the compiled edge tensor product against the same sums in torch operations.

The reference here is written out from the formula ``out[i] = sum_{e=(i,j)} r[e] * (F[e] @ h[j])``
(gather, batched matmul, index_add), not taken from the kernel; gradients come from torch's
autograd through it. Then whole models (NequIP with per-degree widths, MACE) with the kernel
against the same models with it switched off: energies, forces, stress and Hessians.
"""
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from eqcalc import EquivariantCalculator, _native
from eqcalc.errors import InvalidAtomsError
from potentials import fused

SHAPES = [(1, 1), (1, 3), (3, 1), (3, 3), (3, 5), (5, 3), (5, 7), (7, 7)]  # (2l1+1, 2l3+1)


def reference(h, F, r, edge_index):
    i, j = edge_index
    m = torch.bmm(F, h.index_select(0, j) * r.unsqueeze(1))
    return torch.zeros(h.shape[0], F.shape[1], h.shape[2], dtype=h.dtype).index_add(0, i, m)


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def inputs(M1, M3, dtype, n_atoms=60, n_edges=5000, channels=24, seed=0):
    """Strided h (a block of a wider tensor) and r (columns of a wider R), unsorted edges that
    leave atoms 50..59 without any, so every layout and gap the kernel must handle is there."""
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, 50, (2, n_edges), generator=g)
    wide_h = torch.randn(n_atoms, M1 + 2, channels + 5, dtype=dtype, generator=g).requires_grad_(True)
    F = torch.randn(n_edges, M3, M1, dtype=dtype, generator=g).requires_grad_(True)
    wide_r = torch.randn(n_edges, 2 * channels, dtype=dtype, generator=g).requires_grad_(True)
    return wide_h, F, wide_r, edge_index, (lambda: wide_h[:, 1:M1 + 1, :channels]), (lambda: wide_r[:, channels:])


def test_the_kernels_are_built():
    assert _native.tensor_product_library() is not None, "pip install -e . builds eqcalc/_native/tensor_product.c"


def test_the_baseline_and_avx2_builds_agree(monkeypatch):
    builds = {stem: _native.tensor_product_build(stem) for stem in ("_tensor_product", "_tensor_product_avx2")}
    assert builds["_tensor_product"] is not None
    if builds["_tensor_product_avx2"] is None:  # a CPU or compiler without AVX2: nothing to compare
        assert not {"avx2", "fma"} <= _native._cpu_flags()
        return
    wide_h, F, wide_r, edge_index, h, r = inputs(5, 3, torch.float64)
    results = []
    for lib in builds.values():
        monkeypatch.setattr(_native, "tensor_product_library", lambda lib=lib: lib)
        out = fused.edge_product(h(), F, r(), edge_index)
        results.append((out, *torch.autograd.grad(out, (wide_h, F, wide_r), torch.ones_like(out))))
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-13 * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M1,M3", SHAPES)
def test_sums_and_gradients_match_torch(M1, M3, dtype, threads):
    wide_h, F, wide_r, edge_index, h, r = inputs(M1, M3, dtype)
    assert fused.available(h())
    out, expected = fused.edge_product(h(), F, r(), edge_index), reference(h(), F, r(), edge_index)
    compare(out, expected, (wide_h, F, wide_r), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M1,M3", [(1, 1), (3, 5)])
def test_edges_sharing_rows_of_weights_match_torch(M1, M3, dtype, threads):
    """``row``: edges read shared rows of ``r`` (a pair of reverse edges, one radial weight);
    any sharing, rows no edge reads included (their gradient is zero)."""
    wide_h, F, wide_r, edge_index, h, r = inputs(M1, M3, dtype)
    row = torch.randint(0, 3000, (edge_index.shape[1],), generator=torch.Generator().manual_seed(2))
    weights = lambda: r()[:3200]  # noqa: E731  (rows 3000.. are read by no edge)
    out = fused.edge_product(h(), F, weights(), edge_index, row)
    expected = reference(h(), F, weights().index_select(0, row), edge_index)
    got = compare(out, expected, (wide_h, F, wide_r), dtype)
    assert got[2][3000:3200].abs().max() == 0


def compare(out, expected, leaves, dtype):
    """Sums and gradients (a non-contiguous incoming one) equal to rounding; returns the kernel's."""
    # a non-contiguous incoming gradient (the kernel reads a contiguous copy it must keep alive)
    g = torch.randn(out.shape[2], out.shape[1], out.shape[0], dtype=dtype).permute(2, 1, 0)
    got = torch.autograd.grad(out, leaves, g, retain_graph=True)
    want = torch.autograd.grad(expected, leaves, g)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip((out,) + got, (expected,) + want):
        assert (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()
    assert out[50:].abs().max() == 0 and got[0][50:].abs().max() == 0  # atoms without edges
    return got


# (first component, M1, channels, first column of r): a layer's paths over blocks 0e (1), 1o (3),
# 2e (5) of h, narrowed channels, columns of one R in path order; two paths read block 1o
LAYER = [(0, 1, 10, 0), (1, 3, 8, 10), (0, 1, 10, 18), (4, 5, 6, 28), (1, 3, 8, 34)]
LAYER_M3 = [1, 3, 3, 5, 1]


def layer_inputs(dtype, n_atoms=40, n_edges=3000, seed=4):
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, 35, (2, n_edges), generator=g)
    # h strided (channels of a wider tensor): its element offsets differ from dL/dh's
    h = torch.randn(n_atoms, 9, 15, dtype=dtype, generator=g)[:, :, :12].requires_grad_(True)
    Fs = [torch.randn(n_edges, M3, M1, dtype=dtype, generator=g).requires_grad_(True)
          for M3, (_, M1, _, _) in zip(LAYER_M3, LAYER)]
    R = torch.randn(n_edges // 2 + 7, 42 + 3, dtype=dtype, generator=g).requires_grad_(True)
    row = torch.randint(0, n_edges // 2, (n_edges,), generator=g)
    return h, Fs, R, edge_index, row


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("budget", ["copies", "atoms"])
def test_a_layer_of_paths_in_one_call_matches_each_path_in_torch(dtype, budget, threads, monkeypatch):
    """All paths of a layer in one call (blocks of one h, narrowed channels, columns of one R,
    two paths on one block, rows shared, columns and channels no path reads): the sums, dL/dh
    (each block's sum, zero elsewhere), dL/dR (zero in unread columns and rows) and each dL/dF."""
    if budget == "atoms":
        monkeypatch.setattr(fused, "PRIVATE_BYTES", 0)
    h, Fs, R, edge_index, row = layer_inputs(dtype)
    outs = fused.edge_products(h, Fs, R, LAYER, edge_index, row)
    expected = [reference(h[:, b:b + M1, :C], F, R[:, c0:c0 + C].index_select(0, row), edge_index)
                for F, (b, M1, C, c0) in zip(Fs, LAYER)]
    gs = [torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(k)) for k, x in enumerate(outs)]
    got = torch.autograd.grad(outs, (h, R, *Fs), gs)
    want = torch.autograd.grad(expected, (h, R, *Fs), gs)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(outs + list(got), expected + list(want)):
        assert a.shape == b.shape and (a - b).abs().max() <= tol * b.abs().max(), (a - b).abs().max()
    assert got[0][:, 1:4, 8:].abs().max() == 0 and got[0][:, 4:, 6:].abs().max() == 0
    assert got[1][:, 42:].abs().max() == 0 and got[1][row.max() + 1:].abs().max() == 0


def test_second_derivatives_through_a_layer():
    """create_graph through the one-call layer: torch's gradients, themselves differentiable."""
    h, Fs, R, edge_index, row = layer_inputs(torch.float64, n_atoms=7, n_edges=24)
    edge_index = edge_index % 7
    product = lambda h, R, *Fs: fused.edge_products(h, Fs, R, LAYER, edge_index, row)  # noqa: E731
    assert torch.autograd.gradcheck(product, (h, R, *Fs))
    assert torch.autograd.gradgradcheck(product, (h, R, *Fs))


@pytest.mark.parametrize("shared_rows", [False, True])
def test_atom_passes_without_per_thread_copies_agree(monkeypatch, shared_rows):
    """Above PRIVATE_BYTES each thread owns atoms instead of rows: the same sums and gradients,
    with a row per edge and with rows shared by pairs of edges."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        wide_h, F, wide_r, edge_index, h, r = inputs(3, 5, torch.float64)
        row = torch.arange(edge_index.shape[1]) // 2 if shared_rows else None
        results = []
        for budget in (fused.PRIVATE_BYTES, 0):
            monkeypatch.setattr(fused, "PRIVATE_BYTES", budget)
            out = fused.edge_product(h(), F, r(), edge_index, row)
            g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
            results.append((out, *torch.autograd.grad(out, (wide_h, F, wide_r), g)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_any_thread_count_gives_the_same_sums_and_a_repeat_the_same_bits():
    """Threads sum into copies that are added in thread order: reproducible for one thread
    count, equal to rounding across thread counts."""
    wide_h, F, wide_r, edge_index, h, r = inputs(3, 3, torch.float64)
    before, outs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3, 3):
            torch.set_num_threads(n)
            outs.append(fused.edge_product(h(), F, r(), edge_index))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[2], outs[3])
    for out in outs[1:]:
        assert (out - outs[0]).abs().max() <= 1e-13 * outs[0].abs().max()


def test_second_derivatives_through_the_kernel():
    """Hessians and training on forces differentiate the backward pass (create_graph)."""
    g = torch.Generator().manual_seed(1)
    edge_index = torch.randint(0, 6, (2, 20), generator=g)
    args = [torch.randn(6, 3, 4, dtype=torch.float64, generator=g).requires_grad_(True),
            torch.randn(20, 5, 3, dtype=torch.float64, generator=g).requires_grad_(True),
            torch.randn(20, 4, dtype=torch.float64, generator=g).requires_grad_(True)]
    product = lambda h, F, r: fused.edge_product(h, F, r, edge_index)  # noqa: E731
    assert torch.autograd.gradcheck(product, args)
    assert torch.autograd.gradgradcheck(product, args)


def test_an_edge_to_a_missing_atom_is_a_typed_error():
    h, F, r = torch.randn(4, 1, 8, dtype=torch.float64), torch.randn(3, 3, 1, dtype=torch.float64), \
        torch.randn(3, 8, dtype=torch.float64)
    for bad in ([[0, 1, 4], [1, 0, 0]], [[0, 1, 2], [1, -1, 0]]):
        with pytest.raises(InvalidAtomsError, match="outside 0..3"):
            fused.edge_product(h, F, r, torch.tensor(bad))


def test_not_used_where_tensors_are_traced():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not fused.available(torch.empty(3, 1, 4))
    assert not fused.available(torch.empty(3, 1, 4, dtype=torch.float16))
    seen = []
    torch.func.vmap(lambda x: (seen.append(fused.available(x)), x)[1])(torch.empty(2, 3, 1, 4))
    assert seen == [False]


SYMMETRIC_CUTOFFS = tuple(tuple(3.6 + 0.15 * (a + b) for b in range(5)) for a in range(5))
# centre-neighbour cutoffs that differ from neighbour-centre ones: no radial features per pair
ASYMMETRIC_CUTOFFS = tuple(tuple(3.6 + 0.3 * a + 0.05 * b for b in range(5)) for a in range(5))


@pytest.mark.parametrize("arch,hyper", [
    ("nequip", dict(hidden_l=2, channels_per_degree=(8, 6, 4), parity=True, num_interactions=2)),
    ("nequip", dict(edge_cutoffs=SYMMETRIC_CUTOFFS, pair_repulsion="zbl_lammps")),
    ("nequip", dict(edge_cutoffs=ASYMMETRIC_CUTOFFS)),
    ("mace", dict()),
    ("mace", dict(normalization="density", distance_transform="agnesi")),
])
def test_models_with_and_without_the_kernel_and_pairs_agree(package_path, monkeypatch, arch, hyper):
    """Energy, forces, stress and Hessian of whole models, float64, with the compiled kernel and
    the radial networks once per pair of reverse edges, each on and off, against neither."""
    from potentials.mace import TensorProductPotential

    path = package_path(arch, "float64", **hyper)
    systems = [bulk("Cu", "fcc", a=3.7).repeat((2, 2, 2)), molecule("CH3OH"), bulk("Pt", "fcc", a=3.9)]
    systems[0].rattle(0.05, seed=1)
    systems[1].set_cell([9.0, 9.0, 9.0])
    systems[1].pbc = True
    systems[2].rattle(0.05, seed=2)  # one atom, a cell smaller than the cutoff: pairs of its own images
    available, usable = fused.available, TensorProductPotential._pairs_usable
    results = []
    for kernel, pairs in ((False, False), (True, True), (True, False), (False, True)):
        monkeypatch.setattr(fused, "available", available if kernel else (lambda h: False))
        monkeypatch.setattr(TensorProductPotential, "_pairs_usable", usable if pairs else (lambda self, x: False))
        calc = EquivariantCalculator(path, compile="eager", device="cpu")
        row = []
        for atoms in systems:
            atoms = atoms.copy()
            atoms.calc = calc
            row += [atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(),
                    calc.get_hessian(atoms, indices=[0])]
        results.append(row)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert np.allclose(a, b, rtol=1e-10, atol=1e-10), np.abs(np.asarray(a) - np.asarray(b)).max()
