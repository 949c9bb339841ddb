"""potentials.o3: harmonics, Wigner-D, Clebsch-Gordan and the equivariant layers under O(3).

The harmonics and Wigner-D matrices are checked against references written out here, not fitted
from the code under test: the real spherical harmonics of the standard table (times sqrt(4 pi),
"component" normalization, m = -l..l), and Wigner-D matrices from explicit rotation formulas: for
l = 1 the rotation matrix itself (Y_1 = sqrt(3) (x, y, z)); for l = 2 and 3 the rotation of each
harmonic's symmetric tensor (Y_m(r) = T_m[a, b, ...] r_a r_b ...), D_mn = <R.T_m, T_n> / <T_n, T_n>.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from potentials import o3
from potentials.testing import random_orthogonal


def unit_vectors(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def table_harmonics(r, l):
    """Real spherical harmonics of degree ``l`` from the standard table, times sqrt(4 pi)
    (homogeneous polynomials of ``r`` ``(n, 3)``, exact on unit vectors)."""
    x, y, z = r[:, 0], r[:, 1], r[:, 2]
    r2 = x * x + y * y + z * z
    rows = {
        0: [np.ones_like(x)],
        1: [math.sqrt(3) * x, math.sqrt(3) * y, math.sqrt(3) * z],
        2: [math.sqrt(15) * x * y, math.sqrt(15) * y * z, math.sqrt(5) / 2 * (3 * z * z - r2),
            math.sqrt(15) * x * z, math.sqrt(15) / 2 * (x * x - y * y)],
        3: [math.sqrt(70) / 4 * y * (3 * x * x - y * y), math.sqrt(105) * x * y * z,
            math.sqrt(42) / 4 * y * (5 * z * z - r2), math.sqrt(7) / 2 * z * (5 * z * z - 3 * r2),
            math.sqrt(42) / 4 * x * (5 * z * z - r2), math.sqrt(105) / 2 * z * (x * x - y * y),
            math.sqrt(70) / 4 * x * (x * x - 3 * y * y)],
    }[l]
    return np.stack(rows, axis=1)


def harmonic_tensors(l):
    """``(2l+1, 3, ..., 3)``: the symmetric tensor of each degree-l harmonic, by polarization
    ``T(v_1..v_l) = 1/(l! 2^l) sum_eps (prod eps) p(sum eps_k v_k)`` on the unit vectors."""
    e = np.eye(3)
    T = np.zeros((2 * l + 1,) + (3,) * l)
    for idx in itertools.product(range(3), repeat=l):
        total = np.zeros(2 * l + 1)
        for eps in itertools.product((1, -1), repeat=l):
            v = sum(s * e[i] for s, i in zip(eps, idx))
            total += np.prod(eps) * table_harmonics(v[None], l)[0]
        T[(slice(None),) + idx] = total / (math.factorial(l) * 2 ** l)
    return T


def reference_D(l, R):
    """Wigner-D of degree ``l`` from explicit rotation formulas: ``Y_l(R r) = D Y_l(r)``."""
    if l == 0:
        return np.ones((1, 1))
    if l == 1:
        return np.array(R, dtype=float)  # Y_1 = sqrt(3) r, so Y_1(R r) = R Y_1(r)
    T = harmonic_tensors(l)
    rotated = T
    for axis in range(1, l + 1):  # (R.T_m)[a, b, ...] = T_m[i, j, ...] R_ia R_jb ...
        rotated = np.moveaxis(np.tensordot(rotated, R, axes=([axis], [0])), -1, axis)
    n = T.reshape(2 * l + 1, -1)
    return rotated.reshape(2 * l + 1, -1) @ n.T / (n * n).sum(1)


def block_D(lmax, R):
    """Block-diagonal Wigner-D of degrees 0..lmax from :func:`reference_D`."""
    D = np.zeros((o3.dim(lmax), o3.dim(lmax)))
    for l in range(lmax + 1):
        s = slice(o3.offset(l), o3.offset(l) + 2 * l + 1)
        D[s, s] = reference_D(l, R)
    return D


def test_harmonics_are_the_standard_table():
    """Basis order (m = -l..l), signs and normalization are the textbook ones, so imported
    weights and degree-1 features (Cartesian vectors) mean what they say."""
    x = unit_vectors(40, seed=5)
    Y = o3.spherical_harmonics_np(x, 3)
    for l in range(4):
        np.testing.assert_allclose(Y[:, o3.offset(l):o3.offset(l) + 2 * l + 1], table_harmonics(x, l),
                                   atol=1e-13)


@pytest.mark.parametrize("reflect", [False, True])
def test_wigner_D_matches_explicit_rotation_formulas(reflect):
    rng = np.random.default_rng(4)
    for _ in range(3):
        R = random_orthogonal(rng, reflect)
        np.testing.assert_allclose(o3.wigner_D(1, R), R, atol=1e-12)
        for l in (2, 3):
            np.testing.assert_allclose(o3.wigner_D(l, R), reference_D(l, R), atol=1e-11)


@pytest.mark.parametrize("reflect", [False, True])
def test_harmonics_are_equivariant_orthogonal_and_normalized(reflect):
    R = random_orthogonal(np.random.default_rng(1), reflect)
    x = unit_vectors(50)
    Y = o3.spherical_harmonics_np(x, 3)
    D = block_D(3, R)
    np.testing.assert_allclose(o3.spherical_harmonics_np(x @ R.T, 3), Y @ D.T, atol=1e-12)
    np.testing.assert_allclose(D @ D.T, np.eye(16), atol=1e-12)      # orthonormal basis per degree
    for l in range(4):                                               # component normalization
        block = Y[:, o3.offset(l):o3.offset(l) + 2 * l + 1]
        np.testing.assert_allclose((block ** 2).sum(1), 2 * l + 1, rtol=1e-12)
    # Natural parity: inversion multiplies degree l by (-1)^l.
    np.testing.assert_allclose(block_D(3, -np.eye(3)), np.diag((-1.0) ** o3.degrees_of(3)), atol=1e-12)
    torch_Y = torch.cat(o3.SphericalHarmonics(3)(torch.tensor(x)), dim=1)
    np.testing.assert_allclose(torch_Y.numpy(), Y, atol=1e-13)


def test_clebsch_gordan_equivariant_and_orthogonal():
    R = random_orthogonal(np.random.default_rng(2), False)
    for l1 in range(4):
        for l2 in range(4):
            blocks = []
            for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                C = o3.clebsch_gordan(l1, l2, l3)
                lhs = np.einsum("abc,ai,bj->ijc", C, o3.wigner_D(l1, R), o3.wigner_D(l2, R))
                np.testing.assert_allclose(lhs, C @ o3.wigner_D(l3, R).T, atol=1e-11)
                blocks.append(C.reshape(-1, 2 * l3 + 1) * np.sqrt(2 * l3 + 1))
            # l1 ⊗ l2 = sum of l3: the CG matrices (unit norm, times sqrt(2 l3 + 1)) together
            # are an orthogonal change of basis.
            Q = np.concatenate(blocks, axis=1)
            np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-11)
            np.testing.assert_allclose(Q @ Q.T, np.eye(Q.shape[0]), atol=1e-11)
    assert not o3.clebsch_gordan(1, 1, 3).any()


@pytest.mark.parametrize("L", [0, 1])
def test_symmetric_coupling_is_equivariant_and_complete(L):
    monos, U = o3.symmetric_coupling(2, 3, L)
    # Independent cubic maps of 0e+1o+2e, counted by hand from the degree multisets: L=0: 000,
    # 011, 022, 112, 222 (5); L=1: 001, 012, 111, 122 (twice: via 0 and via 2) (5).
    rng = np.random.default_rng(3)
    A = rng.normal(size=(5, 9))
    for reflect in (False, True):
        R = random_orthogonal(rng, reflect)
        D = block_D(2, R)
        DL = o3.wigner_D(L, R)  # natural parity: reflections are inside D already
        f = lambda a: np.einsum("pmq,nq->npm", U, np.prod(a[:, monos], axis=2))
        np.testing.assert_allclose(f(A @ D.T), f(A) @ DL.T, atol=1e-11)
    assert U.shape[0] == 5


def test_many_species_evaluation_gives_the_same_numbers():
    """Per-species weights applied per atom (models with many species, e.g. 89 elements) give
    exactly what the one-hot expanded evaluation gives, values and gradients."""
    torch.manual_seed(0)
    n_species, c, n = 12, 6, 40
    species = torch.randint(0, n_species, (n,))
    x = torch.randn(n, 4, c, dtype=torch.float64, requires_grad=True)
    linear = o3.SpeciesLinear(1, n_species, c, [c, c]).double()
    product = o3.SymmetricContraction(2, 1, 3, n_species, c).double()
    A = torch.randn(n, 9, c, dtype=torch.float64, requires_grad=True)
    assert linear.per_atom and any(t.per_atom for p in product.parities for t in p.terms)

    def run():
        out = torch.cat(linear(x, species), 1).pow(2).sum() + product(A, species).pow(2).sum()
        grads = torch.autograd.grad(out, [x, A] + list(linear.parameters()) + list(product.parameters()))
        return out, grads

    per_atom = run()
    linear.per_atom = False
    for parity in product.parities:
        for term in parity.terms:
            term.per_atom = False
    expanded = run()
    torch.testing.assert_close(per_atom[0], expanded[0], rtol=1e-13, atol=0)
    for a, b in zip(per_atom[1], expanded[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
