"""O(3) building blocks for the tensor-product architectures (NequIP, MACE), self-contained.

Conventions
-----------
* By default only *natural-parity* irreps are used: a feature of degree ``l`` has parity
  ``(-1)^l`` (0e, 1o, 2e, 3o), as the spherical harmonics of edge directions. A degree then names
  an irrep, and a coupling ``l1 ⊗ l2 → l3`` is O(3)-equivariant exactly when ``l1 + l2 + l3`` is
  even (the intermediate degrees of longer products may have any parity).
* A *layout* lists the irreps ``(l, parity ±1)`` of a feature's blocks in order. The layers that
  take one (:class:`Linear`, :class:`SpeciesLinear`, :class:`EdgeTensorProduct`, :class:`Gate`)
  also accept an int ``L``, the natural layout of degrees ``0..L`` (:func:`natural`). Odd-parity
  blocks (0o, 1e, 2o, 3e: NequIP with ``parity``) rotate like the natural block of their degree,
  so they use the same harmonics and coupling coefficients; only which couplings are allowed
  differs (the parities multiply: ``p1 (-1)^l2 = p3``).
* Real spherical harmonics, "component" normalization (``sum_m Y_lm(r̂)^2 = 2l + 1``), order ``m =
  -l..l``; ``Y_1 = sqrt(3) (x, y, z)``, so degree-1 features are Cartesian vectors.
* Features of degrees ``0..L`` with ``c`` channels are one contiguous tensor ``(n, (L+1)^2, c)``:
  components along dim 1 (degree blocks in order), channels last, so every channel mixing is a
  plain matmul and every gather moves contiguous rows.
* Coupling coefficients (Clebsch-Gordan in the real basis, and the symmetric coupling tensors of
  MACE's product basis) are computed once per process with numpy, from Wigner-D matrices
  fitted to these harmonics, and stored as buffers. They are canonical (unique, deterministic
  sign and basis order), so saved weights mean the same on every machine.

No Python loop runs over edges or sparse CG entries: each op is a dense contraction over
contiguous small dimensions, scriptable and traceable by ``make_fx(tracing_mode="symbolic")``.
"""
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from eqcalc import keys
from potentials import fused

LMAX = 3  # degrees supported by the spherical harmonics below


def dim(lmax: int) -> int:
    """Number of components of degrees ``0..lmax``: ``(lmax + 1)^2``."""
    return (lmax + 1) * (lmax + 1)


def offset(l: int) -> int:
    """Index of the first component of degree ``l`` in a ``0..L`` layout: ``l^2``."""
    return l * l


# ---- layouts ---------------------------------------------------------------------------------
Irrep = Tuple[int, int]  # (degree l, parity +1 even / -1 odd)


def natural(lmax: int) -> List[Irrep]:
    """The natural-parity layout of degrees ``0..lmax``: 0e, 1o, 2e, 3o."""
    return [(l, (-1) ** l) for l in range(lmax + 1)]


def layout(blocks) -> List[Irrep]:
    """A layout from a list of ``(l, parity)`` or an int ``L`` (:func:`natural`)."""
    return natural(blocks) if isinstance(blocks, int) else [(int(l), int(p)) for l, p in blocks]


def couples(a: Irrep, l_sh: int, b: Irrep) -> bool:
    """Whether ``a ⊗ Y_l_sh → b`` is an O(3)-equivariant coupling (harmonics have natural parity)."""
    return abs(a[0] - l_sh) <= b[0] <= a[0] + l_sh and a[1] * (-1) ** l_sh == b[1]


def reachable(blocks_in: Sequence[Irrep], l_sh: int, targets: Sequence[Irrep]) -> List[Irrep]:
    """The blocks of ``targets`` that a tensor product of ``blocks_in`` with harmonics of degrees
    ``0..l_sh`` produces: those of ``blocks_in`` first, in their order (``Y_0`` keeps every
    input block), then the new ones in ``targets`` order, so that a self-connection from the
    input always lands on a prefix of the output."""
    hit = [b for b in targets if any(couples(a, l2, b) for a in blocks_in for l2 in range(l_sh + 1))]
    return [b for b in blocks_in if b in hit] + [b for b in hit if b not in blocks_in]


# ---- spherical harmonics --------------------------------------------------------------------
def _sh_terms(x: Tensor, y: Tensor, z: Tensor, lmax: int) -> List[Tensor]:
    """The components of ``Y_0..Y_lmax`` of unit vectors (works for numpy and torch)."""
    out = [x * 0.0 + 1.0]
    x2, y2, z2 = x * x, y * y, z * z
    if lmax >= 1:
        s3 = math.sqrt(3.0)
        out += [s3 * x, s3 * y, s3 * z]
    if lmax >= 2:
        s15 = math.sqrt(15.0)
        out += [s15 * x * y, s15 * y * z, 0.5 * math.sqrt(5.0) * (2.0 * z2 - x2 - y2),
                s15 * x * z, 0.5 * s15 * (x2 - y2)]
    if lmax >= 3:
        c70, c105, c42 = math.sqrt(70.0) / 4.0, math.sqrt(105.0), math.sqrt(42.0) / 4.0
        r2 = x2 + y2 + z2
        five_z2 = 5.0 * z2 - r2
        out += [c70 * y * (3.0 * x2 - y2), c105 * x * y * z, c42 * y * five_z2,
                0.5 * math.sqrt(7.0) * z * (5.0 * z2 - 3.0 * r2), c42 * x * five_z2,
                0.5 * c105 * z * (x2 - y2), c70 * x * (x2 - 3.0 * y2)]
    return out


def spherical_harmonics_np(vectors: np.ndarray, lmax: int) -> np.ndarray:
    """``(n, (lmax+1)^2)`` real harmonics of unit vectors ``(n, 3)`` (numpy, build time)."""
    x, y, z = vectors[:, 0], vectors[:, 1], vectors[:, 2]
    return np.stack(_sh_terms(x, y, z, lmax), axis=1)  # the same polynomials on numpy arrays


class SphericalHarmonics(torch.nn.Module):
    """``Y_0..Y_lmax`` of unit vectors ``(n_edges, 3)``, one block per degree; polynomials in
    x, y, z (no trigonometry), so they and their derivatives are exact at the poles."""

    def __init__(self, lmax: int):
        super().__init__()
        if not 0 <= lmax <= LMAX:
            raise ValueError(f"lmax={lmax} must be in 0..{LMAX}")
        self.lmax = lmax

    def forward(self, unit_vectors: Tensor) -> List[Tensor]:
        """Per degree, contiguous: ``[(n_edges, 2l+1) for l in 0..lmax]``."""
        x, y, z = unit_vectors.unbind(1)
        terms = _sh_terms(x, y, z, self.lmax)
        return [torch.stack(terms[l * l:(l + 1) * (l + 1)], dim=1) for l in range(self.lmax + 1)]


# ---- Wigner-D matrices and coupling coefficients (numpy, build time) -------------------------
def rotation_matrix(axis: Sequence[float], angle: float) -> np.ndarray:
    """Rotation by ``angle`` rad about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _real_sh_any(points: np.ndarray, l: int) -> np.ndarray:
    """Orthonormal real harmonics of any degree ``l`` ``(n, 2l+1)`` (associated Legendre
    recursion; build time only, for the Wigner-D matrices of intermediate degrees > 3)."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    phi = np.arctan2(y, x)
    ct = np.clip(z, -1.0, 1.0)
    st = np.sqrt(np.maximum(1.0 - ct * ct, 0.0))
    out = []
    for m in range(-l, l + 1):
        a = abs(m)
        p = (-st) ** a * np.prod(np.arange(1, 2 * a, 2)) if a > 0 else np.ones_like(ct)  # P_a^a
        if l > a:
            p_prev, p = p, ct * (2 * a + 1) * p  # P_{a+1}^a
            for k in range(a + 2, l + 1):
                p_prev, p = p, ((2 * k - 1) * ct * p - (k + a - 1) * p_prev) / (k - a)
        norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - a) / math.factorial(l + a))
        if m == 0:
            out.append(norm * p)
        else:
            out.append(math.sqrt(2.0) * norm * p * (np.cos(a * phi) if m > 0 else np.sin(a * phi)))
    return np.stack(out, axis=1)


def wigner_D(l: int, R: np.ndarray) -> np.ndarray:
    """``(2l+1, 2l+1)`` matrix with ``Y_l(R r̂) = D Y_l(r̂)`` for any orthogonal ``R`` (reflections
    included: then ``D = det(R)^l D(det(R) R)``); fitted exactly on 64 fixed points."""
    rng = np.random.default_rng(12345)
    points = rng.normal(size=(64, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    if l <= LMAX:  # the basis of the features
        sl = slice(offset(l), offset(l) + 2 * l + 1)
        y = spherical_harmonics_np(points, l)[:, sl]
        y_rot = spherical_harmonics_np(points @ R.T, l)[:, sl]
    else:  # intermediate degrees of MACE's couplings: any orthonormal basis
        y, y_rot = _real_sh_any(points, l), _real_sh_any(points @ R.T, l)
    return np.linalg.lstsq(y, y_rot, rcond=None)[0].T


def _generators() -> List[np.ndarray]:
    # Two generic rotations generate a dense subgroup of SO(3): tensors invariant under both
    # are invariant under all rotations. Fixed, so every process computes the same numbers.
    return [rotation_matrix((1.0, 2.0, 3.0), 1.0), rotation_matrix((-2.0, 1.0, 0.5), 2.3)]


def _canonical_sign(v: np.ndarray) -> np.ndarray:
    """Sign fixed by the first entry that is clearly non-zero (deterministic up to rounding)."""
    flat = v.reshape(-1)
    first = flat[np.argmax(np.abs(flat) > 1e-6 * np.abs(flat).max())]
    return v if first > 0 else -v


@functools.lru_cache(maxsize=None)
def clebsch_gordan(l1: int, l2: int, l3: int) -> np.ndarray:
    """Real-basis coupling ``C`` ``(2l1+1, 2l2+1, 2l3+1)`` with ``sum C[a,b,:] x_a y_b``
    transforming as degree ``l3`` when x, y transform as ``l1``, ``l2``; unit Frobenius norm,
    canonical sign. Zeros when ``l3`` is outside ``|l1-l2|..l1+l2``.

    Found as the invariant of ``l1 ⊗ l2 ⊗ l3`` (the null space of ``D1⊗D2⊗D3 - 1`` for two
    generic rotations), which is one-dimensional for SO(3).
    """
    shape = (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        return np.zeros(shape)
    n = int(np.prod(shape))
    gram = np.zeros((n, n))
    for R in _generators():
        k = np.kron(np.kron(wigner_D(l1, R), wigner_D(l2, R)), wigner_D(l3, R)) - np.eye(n)
        gram += k.T @ k
    values, vectors = np.linalg.eigh(gram)
    assert values[0] < 1e-10 and (n == 1 or values[1] > 1e-3), (l1, l2, l3, values[:2])
    return _canonical_sign(vectors[:, 0].reshape(shape))


def degrees_of(lmax: int) -> np.ndarray:
    """Degree ``l`` of each component of a ``0..lmax`` layout, ``((lmax+1)^2,)``."""
    return np.concatenate([np.full(2 * l + 1, l) for l in range(lmax + 1)])


@functools.lru_cache(maxsize=None)
def symmetric_coupling(lmax: int, nu: int, L: int) -> Tuple[np.ndarray, np.ndarray]:
    """Basis of the O(3)-equivariant symmetric maps ``Sym^nu(V) → V_L`` with ``V`` degrees
    ``0..lmax`` (natural parity), as polynomials in the components of one feature vector.

    Returns ``(monomials, U)``: ``monomials`` ``(Q, nu)`` sorted component indices (the
    monomials ``A_a A_b ...`` that occur), ``U`` ``(P, 2L+1, Q)`` so that path ``p`` maps a
    feature ``A`` to ``sum_q U[p, :, q] prod_k A[monomials[q, k]]``. Paths are the iterated
    couplings ``((l1 ⊗ l2)_k ⊗ l3)_L`` with sorted ``l1 <= l2 <= l3``, symmetrised, in a
    fixed order, Gram-Schmidt orthonormalised and with linearly dependent ones dropped: MACE's
    generalised Clebsch-Gordan coefficients of correlation order ``nu``.
    """
    if nu not in (1, 2, 3):
        raise ValueError(f"correlation order {nu} must be 1, 2 or 3")
    d = dim(lmax)
    deg = degrees_of(lmax)
    full = []  # full tensors (2L+1, d, ..., d) of each path before symmetrisation
    blocks = [slice(offset(l), offset(l) + 2 * l + 1) for l in range(lmax + 1)]
    for ls in _sorted_tuples(lmax, nu):
        if (sum(ls) + L) % 2:  # parity: natural-parity inputs, natural-parity output
            continue
        for chain in _coupling_chains(ls, L):
            t = np.zeros((2 * L + 1,) + (d,) * nu)
            t[(slice(None),) + tuple(blocks[l] for l in ls)] = chain
            full.append(t)
    monos = np.array(list(_sorted_tuples_idx(d, nu, deg, L)), dtype=np.int64).reshape(-1, nu)
    if not full or len(monos) == 0:
        return monos, np.zeros((0, 2 * L + 1, len(monos)))
    # Fold each full tensor onto monomial coefficients: coefficient of prod A[mono] is the sum of
    # the tensor over all index orders of that monomial.
    flat_index = {tuple(m): q for q, m in enumerate(monos.tolist())}
    fold = np.zeros((d ** nu, len(monos)))
    for idx in np.ndindex(*(d,) * nu):
        q = flat_index.get(tuple(sorted(idx)))
        if q is not None:
            fold[np.ravel_multi_index(idx, (d,) * nu), q] = 1.0
    vectors = np.stack([t.reshape(2 * L + 1, -1) @ fold for t in full]).reshape(len(full), -1)
    basis: List[np.ndarray] = []
    for v, t in zip(vectors, full):  # Gram-Schmidt in path order (twice, for accuracy)
        w = v.copy()
        for _ in range(2):
            for b in basis:
                w -= (b @ w) * b
        norm = np.linalg.norm(w)
        # Relative to the chain before symmetrisation (unit-size): a chain that symmetrises to
        # zero, e.g. (x × y) × z, or one dependent on earlier paths leaves only rounding noise.
        if norm > 1e-8 * np.linalg.norm(t):
            basis.append(w / norm)
    U = np.stack(basis).reshape(len(basis), 2 * L + 1, len(monos))
    used = np.abs(U).max(axis=(0, 1)) > 1e-12  # drop monomials no path uses
    return monos[used], U[:, :, used]


def _sorted_tuples(lmax: int, nu: int):
    if nu == 1:
        for l in range(lmax + 1):
            yield (l,)
        return
    for rest in _sorted_tuples(lmax, nu - 1):
        for l in range(rest[-1], lmax + 1):
            yield rest + (l,)


def _sorted_tuples_idx(d: int, nu: int, deg: np.ndarray, L: int):
    for t in _sorted_tuples(d - 1, nu):
        if (int(sum(deg[list(t)])) + L) % 2 == 0:
            yield t


def _coupling_chains(ls: Tuple[int, ...], L: int) -> List[np.ndarray]:
    """All iterated couplings of degrees ``ls`` into ``L``: arrays ``(2L+1, 2l1+1, ...)``."""
    if len(ls) == 1:
        return [np.eye(2 * L + 1)] if ls[0] == L else []
    if len(ls) == 2:
        c = clebsch_gordan(ls[0], ls[1], L)
        return [np.transpose(c, (2, 0, 1))] if np.any(c) else []
    out = []
    l1, l2, l3 = ls
    for k in range(abs(l1 - l2), l1 + l2 + 1):
        c12, c3 = clebsch_gordan(l1, l2, k), clebsch_gordan(k, l3, L)
        if np.any(c3):
            out.append(np.einsum("abk,kcM->Mabc", c12, c3))
    return out


# ---- equivariant layers ----------------------------------------------------------------------
def rows_matmul(x: Tensor, w: Tensor) -> Tensor:
    """``x (..., c_in) @ w (c_in, c_out)`` as one matmul over all rows. A block split off a wider
    tensor is strided; ``torch.matmul`` would then broadcast ``w`` to a copy per atom and run a
    batched matmul (and sum the copies' gradients backward), ~3x slower than copying the block."""
    return torch.mm(x.reshape(-1, x.shape[-1]), w).view(list(x.shape[:-1]) + [w.shape[1]])


class Linear(torch.nn.Module):
    """Channel mixing per block: ``(n, (L+1)^2, c_in) → (n, (L+1)^2, c_out)``, one weight
    ``(c_in, c_out)`` per block of the layout ``blocks`` (an int ``L``: degrees 0..L); no bias
    (a bias would break equivariance for l > 0 and MACE and NequIP use none inside layers).
    Weights are scaled by ``1/sqrt(c_in)`` in the forward (e3nn's convention), so they are
    initialised from N(0, 1)."""

    def __init__(self, blocks, c_in: int, c_out: int):
        super().__init__()
        self.sizes: List[int] = [2 * l + 1 for l, _ in layout(blocks)]
        self.weight = torch.nn.Parameter(torch.randn(len(self.sizes), c_in, c_out))
        self.norm = 1.0 / math.sqrt(c_in)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.blocks(x), dim=1) if len(self.sizes) > 1 else self.blocks(x)[0]

    def blocks(self, x: Tensor) -> List[Tensor]:
        """Per block: ``[(n, 2l+1, c_out) for (l, p) in blocks]``."""
        return [rows_matmul(xl, self.weight[k]) * self.norm for k, xl in enumerate(torch.split(x, self.sizes, dim=1))]


#: Up to this many species, per-species weights are applied to one-hot expanded features (one
#: dense matmul, ``n_species`` times the multiply-adds); beyond it each atom gathers its own
#: species' weights (memory-bound, but independent of the species count: 89-element models).
SPECIES_EXPANSION_MAX = 8


class _SpeciesMix(torch.nn.Module):
    def __init__(self, start: int, stop: int, n_species: int, c_in: int, c_out: int):
        super().__init__()
        self.start, self.stop, self.n_species, self.c_in = start, stop, n_species, c_in
        # Row species * c_in + channel (the one-hot expanded layout).
        self.weight = torch.nn.Parameter(torch.randn(n_species * c_in, c_out) / math.sqrt(c_in))

    def forward(self, xs: Tensor) -> Tensor:
        """One-hot expanded features ``(n, components, n_species * c_in)`` → its block."""
        return rows_matmul(xs[:, self.start:self.stop], self.weight)

    def per_atom(self, x_l: Tensor, species: Tensor) -> Tensor:
        """Degree-``l`` block ``(n, 2l+1, c_in)`` times each atom's own species' weights."""
        w = self.weight.view(self.n_species, self.c_in, -1).index_select(0, species)
        return torch.bmm(x_l, w)


class SpeciesLinear(torch.nn.Module):
    """Per-species channel mixing per block (MACE's and NequIP's self-connection: the e3nn
    tensor product of the features with the one-hot species): features of layout ``blocks_in``
    ``(n, components, c_in)`` and species ``(n,)`` → ``[(n, 2l+1, c_out[k]) for the first
    min(len(blocks_in), len(c_out)) blocks]``; the output layout starts with the input's, and
    later output blocks get no self-connection (see :func:`add_blocks`).
    Few species: one matmul on one-hot expanded features; many (> :data:`SPECIES_EXPANSION_MAX`):
    each atom's weights gathered (same parameters, same numbers)."""

    def __init__(self, blocks_in, n_species: int, c_in: int, c_out: Sequence[int]):
        super().__init__()
        blocks = layout(blocks_in)[:len(c_out)]
        self.lmax = len(blocks) - 1  # index of the last block mixed (its degree, natural layouts)
        self.n_species = n_species
        self.per_atom = n_species > SPECIES_EXPANSION_MAX
        self.sizes: List[int] = [2 * l + 1 for l, _ in blocks]
        self.dim = sum(self.sizes)
        starts = np.cumsum([0] + self.sizes).tolist()
        self.mixes = torch.nn.ModuleList([_SpeciesMix(starts[k], starts[k + 1], n_species, c_in, c_out[k])
                                          for k in range(len(blocks))])

    def forward(self, x: Tensor, species: Tensor) -> List[Tensor]:
        n, d, c = x.shape[0], self.dim, x.shape[2]
        if self.per_atom:
            blocks = torch.split(x[:, :d], self.sizes, dim=1)
            return [mix.per_atom(blocks[k], species) for k, mix in enumerate(self.mixes)]
        onehot = (species.unsqueeze(1) == torch.arange(self.n_species, device=species.device)).to(x.dtype)
        xs = (x[:, :d].unsqueeze(2) * onehot.view(n, 1, -1, 1)).reshape(n, d, self.n_species * c)
        return [mix(xs) for mix in self.mixes]


def per_edge(x: Tensor, pair: Optional[Tensor]) -> Tensor:
    """Rows per unordered pair of edges ``(n_pairs, ...)`` → per edge ``(n_edges, ...)``
    (:func:`eqcalc.neighbors.edge_pairs`); ``x`` as it is without pairs."""
    return x if pair is None else x.index_select(0, pair)


def add_blocks(a: List[Tensor], b: List[Tensor]) -> List[Tensor]:
    """Per-block sum of two block lists where ``b`` may stop earlier."""
    out: List[Tensor] = []
    for k in range(len(a)):
        out.append(a[k] + b[k] if k < len(b) else a[k])
    return out


class _Path(torch.nn.Module):
    """One path ``l1 ⊗ l2 → l3`` of :class:`EdgeTensorProduct` from input block ``k1``,
    summed over neighbors."""

    def __init__(self, index: int, k1: int, l1: int, l2: int, l3: int):
        super().__init__()
        self.index, self.k1, self.l1, self.l2, self.l3 = index, k1, l1, l2, l3
        c = clebsch_gordan(l1, l2, l3)  # (m1, m2, m3)
        # cmat[m2, (m3, m1)]: Y_l2 @ cmat is the (2l3+1, 2l1+1) matrix h_j's l1 block goes
        # through. sqrt(2 l3 + 1) keeps component normalization (unit inputs, unit outputs).
        cmat = np.transpose(c, (1, 2, 0)).reshape(2 * l2 + 1, -1) * math.sqrt(2 * l3 + 1)
        self.register_buffer("cmat", torch.tensor(cmat))

    def fold(self, Y: List[Tensor]) -> Tensor:
        """``(n_edges, 2l3+1, 2l1+1)``: the matrix each edge applies to its neighbor's ``l1`` block."""
        return torch.matmul(Y[self.l2], self.cmat).view(-1, 2 * self.l3 + 1, 2 * self.l1 + 1)

    def forward(self, h_j: List[Tensor], Y: List[Tensor], R: List[Tensor], i: Tensor, n_atoms: int) -> Tensor:
        """``h_j[l1]`` ``(n_edges, 2l1+1, c)``, ``Y[l2]`` ``(n_edges, 2l2+1)``, ``R[path]``
        ``(n_edges, c)`` → ``(n_atoms, 2l3+1, c)``."""
        y, r = Y[self.l2], R[self.index]
        if self.l1 == 0 and self.l2 == 0:  # scalars: a broadcast
            m = y.unsqueeze(2) * (h_j[self.k1].squeeze(1) * r).unsqueeze(1)
        elif self.l1 == 0:  # a scalar times the harmonics: an outer product as a K=1 bmm, whose
            # backward needs no full-size temporaries (1.6x faster than a broadcast at 128 channels)
            m = torch.bmm(y.unsqueeze(2), (h_j[self.k1].squeeze(1) * r).unsqueeze(1))
        else:  # the radial weight goes on the small input side of the matmul
            m = torch.bmm(self.fold(Y), h_j[self.k1] * r.unsqueeze(1))
        return torch.zeros(n_atoms, 2 * self.l3 + 1, m.shape[2], dtype=m.dtype,
                           device=m.device).index_add(0, i, m)


class EdgeTensorProduct(torch.nn.Module):
    """Channel-wise ("uvu") tensor product of neighbor features with edge harmonics, one
    weight per path and channel, summed over neighbors:

    ``M_i[path][m3, c] = sum_j R_ij[path, c] sum_{m1 m2} C[m1, m2, m3] h_j[l1 m1, c] Y_ij[l2 m2]``

    for every path ``(k1, l2, k3)`` from input block ``k1`` through harmonics of degree ``l2 <=
    l_sh`` into output block ``k3`` that :func:`couples` (natural layouts: block index = degree,
    so paths are ``(l1, l2, l3)`` with ``l1 + l2 + l3`` even). No sparse CG einsum over edges:
    per path, the harmonics are folded with the CG coefficients (``Y_l2 @ C``, shared by all
    channels) and the channel-wise product is one batched matmul over contiguous ``(n_edges,
    2l+1, channels)`` tensors (degree-0 inputs: a broadcast). Each per-edge tensor is made once
    and summed into its atom. Blocks are taken by ``split``/``unbind`` (whose backward is one
    concatenation), never by slicing, whose backward would zero-fill a full-size gradient per
    slice. (Measured alternative, 2.5x slower on CPU: one batched matmul for all paths, then the
    radial weights per output degree.)

    ``forward(h (n_atoms, components_in, c), Y [(n_edges, 2l+1) for l in 0..l_sh], R (n_edges,
    n_paths, c), edge_index (2, n_edges), pair)`` → per path ``(n_atoms, 2l3+1, c)``, in ``paths``
    order; with ``pair`` ``(n_edges,)``, ``R`` has a row per pair of reverse edges and edge ``e``
    reads row ``pair[e]`` (:func:`eqcalc.neighbors.edge_pairs`). On CPU in eager mode the sums
    run in the compiled kernel of :mod:`potentials.fused` (no per-edge tensors).
    ``blocks_in``/``blocks_out``: layouts (an int ``L``: natural degrees ``0..L``). With
    ``widths`` (channels per input block, each <= c), a path reads only the first ``widths[k1]``
    channels of its input block (NequIP's per-degree feature counts: the edge work skips the
    padding), ``R`` is ``(n_edges, sum(path_widths))`` path-major and each path's output has its
    own width (the narrowing slices atoms' blocks, whose zero-filled backward is per atom, not
    per edge).
    """

    widths_in: List[int]     # may be empty: class-level types for TorchScript
    path_widths: List[int]

    def __init__(self, blocks_in, l_sh: int, blocks_out, widths: Sequence[int] = ()):
        super().__init__()
        self.blocks_in, self.blocks_out = layout(blocks_in), layout(blocks_out)
        self.paths: List[Tuple[int, int, int]] = [
            (k1, l2, k3) for k1, a in enumerate(self.blocks_in) for l2 in range(l_sh + 1)
            for k3, b in enumerate(self.blocks_out) if couples(a, l2, b)]
        self.sizes_in: List[int] = [2 * l + 1 for l, _ in self.blocks_in]
        self.starts_in: List[int] = np.cumsum([0] + self.sizes_in).tolist()[:-1]  # first component per block
        self.widths_in: List[int] = [int(w) for w in widths]
        # channels of each path (empty: all of them, R's last dimension)
        self.path_widths: List[int] = [self.widths_in[k1] for k1, _, _ in self.paths] if widths else []
        self.path_modules = torch.nn.ModuleList(
            [_Path(k, k1, self.blocks_in[k1][0], l2, self.blocks_out[k3][0])
             for k, (k1, l2, k3) in enumerate(self.paths)])

    def forward(self, h: Tensor, Y: List[Tensor], R: Tensor, edge_index: Tensor,
                pair: Optional[Tensor] = None) -> List[Tensor]:
        if not torch.jit.is_scripting() and self._fusable(h):
            return self._fused(h, Y, R, edge_index, pair)
        i, j = edge_index[0], edge_index[1]
        n_atoms = h.shape[0]
        blocks = torch.split(h, self.sizes_in, dim=1)
        if len(self.widths_in) > 0:
            blocks = [x[:, :, :w] for x, w in zip(blocks, self.widths_in)]
        r = [per_edge(x, pair) for x in torch.split(R.flatten(1), self.widths(R), dim=1)]
        h_j = [x.index_select(0, j) for x in blocks]
        return [path(h_j, Y, r, i, n_atoms) for path in self.path_modules]

    def widths(self, R: Tensor) -> List[int]:
        """Channels (columns of ``R``) of each path."""
        return self.path_widths if len(self.path_widths) > 0 else [R.shape[-1]] * len(self.paths)

    @torch.jit.unused
    def _fusable(self, h: Tensor) -> bool:
        return fused.available(h)

    @torch.jit.unused
    def _fused(self, h: Tensor, Y: List[Tensor], R: Tensor, edge_index: Tensor, pair: Optional[Tensor]) -> List[Tensor]:
        """The same sums by the compiled CPU kernel (:mod:`potentials.fused`), all paths in one
        call, no per-edge tensors."""
        widths = self.widths(R)
        columns = np.cumsum([0] + widths).tolist()
        layout = [(self.starts_in[p.k1], self.sizes_in[p.k1], widths[p.index], columns[p.index]) for p in self.path_modules]
        return fused.edge_products(h, [p.fold(Y) for p in self.path_modules], R.flatten(1), layout, edge_index, pair)


class _DegreeMix(torch.nn.Module):
    def __init__(self, paths: List[int], c_in_total: int, c_out: int):
        super().__init__()
        self.paths = paths
        self.weight = torch.nn.Parameter(torch.randn(c_in_total, c_out) / math.sqrt(max(c_in_total, 1)))

    def forward(self, x: List[Tensor]) -> Tensor:
        return torch.matmul(torch.cat([x[p] for p in self.paths], dim=2), self.weight)


class PathLinear(torch.nn.Module):
    """Mixes the per-path output of :class:`EdgeTensorProduct` ``[(n, 2l3+1, c_in)]`` into its
    output blocks: for each block ``k`` one weight ``(n_paths_k * c_in, c_out[k])`` (rows: each
    path's channels, ``tp.path_widths`` when set) over all paths that end in that block.
    ``c_out`` lists the channels per block (NequIP's gates add scalar channels). Returns
    ``[(n, 2l+1, c_out[k]) for k]``."""

    def __init__(self, tp: EdgeTensorProduct, c_in: int, c_out: Sequence[int]):
        super().__init__()
        mixes = []
        for l in range(len(c_out)):
            mine = [k for k, p in enumerate(tp.paths) if p[2] == l]
            rows = sum(tp.path_widths[k] for k in mine) if tp.path_widths else len(mine) * c_in
            mixes.append(_DegreeMix(mine, rows, c_out[l]))
        self.mixes = torch.nn.ModuleList(mixes)

    def forward(self, x: List[Tensor]) -> List[Tensor]:
        return [mix(x) for mix in self.mixes]


class _Correlation(torch.nn.Module):
    """One polynomial degree ``nu`` of one parity class of :class:`SymmetricContraction`.

    Two evaluations of the same numbers, chosen by cost: with fewer species than paths, the
    weights are folded into a dense coupling tensor for every species once per call (``T``) and
    applied to all atoms, each atom later keeping its own species' rows ("expanded"); with many
    species (89-element models), the coupling basis is applied first and each atom's own
    weights last ("per atom")."""

    def __init__(self, U: np.ndarray, monos: np.ndarray, n_species: int, channels: int):
        super().__init__()
        self.nu = monos.shape[1]
        self.n_species = n_species
        self.n_paths = U.shape[0]
        self.register_buffer("U", torch.tensor(U.reshape(U.shape[0], -1)))
        self.m_total = U.shape[1]
        self.register_buffer("monos", torch.tensor(monos.T.copy(), dtype=torch.int64))  # (nu, Q)
        # Weights (species, paths, channels): N(0, 1/paths), the output a sum of `paths` terms.
        self.weight = torch.nn.Parameter(torch.randn(n_species, U.shape[0], channels) / math.sqrt(max(U.shape[0], 1)))
        self.per_atom = self.n_paths < n_species

    def forward(self, At: Tensor, species: Tensor) -> Tensor:
        """``At`` ``(c, components, n_atoms)`` → expanded: every species' output ``(c, species * M,
        n_atoms)``; per atom: ``(c, M, n_atoms)``."""
        c, n = At.shape[0], At.shape[2]
        if self.per_atom:
            # Monomials as (Q, c * n) so that the coupling basis is one plain matmul (a
            # broadcast batched matmul has a very slow backward on CPU), then each atom's W.
            # Rows gathered as embeddings: the fastest gather backward on CPU measured here.
            Ac = At.transpose(0, 1).reshape(At.shape[1], c * n)  # (components, c n)
            mono = torch.nn.functional.embedding(self.monos[0], Ac)
            for d in range(1, self.nu):
                mono = mono * torch.nn.functional.embedding(self.monos[d], Ac)
            V = torch.mm(self.U.view(self.n_paths * self.m_total, -1), mono)
            w = self.weight.index_select(0, species).permute(1, 2, 0).unsqueeze(1)  # (P, 1, c, n)
            out = (V.view(self.n_paths, self.m_total, c, n) * w).sum(0)            # (M, c, n)
            return out.transpose(0, 1)
        mono = At.index_select(1, self.monos[0])
        for d in range(1, self.nu):
            mono = mono * At.index_select(1, self.monos[d])
        # T[c, (species, M), q] = sum_p W[s, p, c] U[p, (M, q)]: dense coupling per channel.
        T = torch.matmul(self.weight.permute(2, 0, 1), self.U).reshape(c, self.n_species * self.m_total, -1)
        return torch.bmm(T, mono)


class _Parity(torch.nn.Module):
    def __init__(self, terms: List[_Correlation], m_total: int):
        super().__init__()
        self.terms = torch.nn.ModuleList(terms)
        self.m_total = m_total

    def forward(self, At: Tensor, species: Tensor) -> Tensor:
        c, n = At.shape[0], At.shape[2]
        m = self.m_total
        expanded = torch.zeros(0, dtype=At.dtype, device=At.device)
        own = torch.zeros(c, m, n, dtype=At.dtype, device=At.device)
        k = 0
        for term in self.terms:
            y = term(At, species)
            if term.per_atom:
                own = own + y
            else:
                expanded = y if k == 0 else expanded + y
                k += 1
        if k == 0:
            return own
        # Each atom takes its own species' rows.
        index = (species * m).view(1, 1, n) + torch.arange(m, device=At.device).view(1, m, 1)
        return own + torch.gather(expanded, 1, index.expand(c, m, n))


class SymmetricContraction(torch.nn.Module):
    """MACE's product basis with its weights: per channel ``c`` and species ``z``,

    ``B_i[L, M, c] = sum_{nu=1..correlation} sum_p W_nu[z_i, p, c] U_{nu,L,p}[M, monomials] · A_i[:, c]^{⊗nu}``

    i.e. a polynomial of degree ``correlation`` in the components of ``A_i[:, c]`` whose
    coefficients are equivariant couplings (:func:`symmetric_coupling`). Evaluated per atom,
    never per edge: the weights are first folded into dense coupling tensors for every species
    ``T[c, (species, M), monomial]`` (a few thousand numbers per channel), the distinct monomials
    of ``A`` are formed by gathering rows of a ``(c, components, n_atoms)`` layout, and one
    batched matmul per polynomial degree gives every species' output; each atom then picks its
    own species. Outputs of one parity (L = 0, 2 / L = 1, 3) share their monomials.

    ``forward(A (n_atoms, (l_A+1)^2, c), species (n_atoms,))`` → ``(n_atoms, (L_out+1)^2, c)``.
    """

    def __init__(self, l_A: int, L_out: int, correlation: int, n_species: int, channels: int):
        super().__init__()
        parities = []
        order: List[int] = []  # output components in (parity, L, M) order
        self.n_paths = 0
        # Where each (nu, L)'s paths sit: (parity module, term, nu, L, first path, n paths), so
        # that weights from elsewhere (model conversion) can be placed.
        self.layout: List[Tuple[int, int, int, int, int, int]] = []
        for parity in (0, 1):
            Ls = [L for L in range(L_out + 1) if L % 2 == parity]
            if not Ls:
                continue
            for L in Ls:
                order += list(range(offset(L), offset(L) + 2 * L + 1))
            m_total = sum(2 * L + 1 for L in Ls)
            terms = []
            for nu in range(1, correlation + 1):
                # Union of the monomials of every L of this parity, U block diagonal in L.
                per_L = [symmetric_coupling(l_A, nu, L) for L in Ls]
                monos = sorted({tuple(m) for ms, _ in per_L for m in ms.tolist()})
                where = {m: q for q, m in enumerate(monos)}
                n_paths = sum(u.shape[0] for _, u in per_L)
                U = np.zeros((n_paths, m_total, len(monos)))
                p0, m0 = 0, 0
                for (ms, u), L in zip(per_L, Ls):
                    cols = np.array([where[tuple(m)] for m in ms.tolist()], dtype=np.int64)
                    for p in range(u.shape[0]):
                        U[p0 + p, m0:m0 + 2 * L + 1, cols] = u[p].T
                    p0, m0 = p0 + u.shape[0], m0 + 2 * L + 1
                if n_paths == 0:
                    continue
                first = 0
                for (_, u), L in zip(per_L, Ls):
                    self.layout.append((len(parities), len(terms), nu, L, first, u.shape[0]))
                    first += u.shape[0]
                terms.append(_Correlation(U, np.array(monos, dtype=np.int64).reshape(-1, nu),
                                          n_species, channels))
                self.n_paths += n_paths
            parities.append(_Parity(terms, m_total))
        self.parities = torch.nn.ModuleList(parities)
        self.register_buffer("order", torch.tensor(np.argsort(order), dtype=torch.int64))
        self.single = len(parities) == 1

    def forward(self, A: Tensor, species: Tensor) -> Tensor:
        At = A.permute(2, 1, 0).contiguous()  # (c, components, n): monomials gather whole rows
        outs = [parity(At, species) for parity in self.parities]
        out = outs[0] if self.single else torch.cat(outs, dim=1).index_select(1, self.order)
        # Contiguous (n, M, c): AOTInductor's CPU code for a matmul/select on the permuted view
        # corrupted the heap (torch 2.13, channels >= 16); the copy is per atom, so cheap.
        return out.permute(2, 1, 0).contiguous()


class ScaledSiLU(torch.nn.Module):
    """``gain * silu(x)``: e3nn's second-moment-normalised SiLU (``gain`` 1.6791767923989418,
    NequIP's gates) or the plain one (``gain`` 1)."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = float(gain)

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x) * self.gain if self.gain != 1.0 else torch.nn.functional.silu(x)


class ScaledTanh(torch.nn.Module):
    """``gain * tanh(x)``: e3nn's second-moment-normalised tanh (``gain`` 1.5937334472592695,
    NequIP's odd scalars) or the plain one."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.gain = float(gain)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x) * self.gain


class Gate(torch.nn.Module):
    """NequIP's gated nonlinearity on a layout ``blocks`` whose first block is 0e:
    ``scalar_act`` on the even scalars, ``odd_act`` (an odd function, so parity is kept) on odd
    scalars (0o), and every block of degree l > 0 multiplied channel-wise by ``gate_act`` of its
    own gate scalars (default: SiLU, sigmoid). Input per-block list from :class:`PathLinear`
    whose 0e block holds ``c * (1 + number of l > 0 blocks)`` channels (features, then one gate
    set per l > 0 block in layout order); output ``(n, components, c)``."""

    gates: List[int]

    def __init__(self, blocks, channels: int, scalar_act: torch.nn.Module = None,
                 gate_act: torch.nn.Module = None, odd_act: torch.nn.Module = None):
        super().__init__()
        blocks = layout(blocks)
        assert blocks[0] == (0, 1), blocks
        self.channels = channels
        # per block after the first: gate set index (l > 0) or -1 (an odd scalar block)
        gated = [k for k, (l, _) in enumerate(blocks) if l > 0]
        self.gates: List[int] = [gated.index(k) + 1 if l > 0 else -1 for k, (l, _) in enumerate(blocks)][1:]
        self.scalar_act = scalar_act if scalar_act is not None else ScaledSiLU()
        self.gate_act = gate_act if gate_act is not None else torch.nn.Sigmoid()
        self.odd_act = odd_act if odd_act is not None else ScaledTanh()

    def forward(self, parts: List[Tensor]) -> Tensor:
        c = self.channels
        scalars = parts[0]
        out = [self.scalar_act(scalars[:, :, :c])]
        for k, g in enumerate(self.gates):
            if g < 0:
                out.append(self.odd_act(parts[k + 1]))
            else:
                out.append(parts[k + 1] * self.gate_act(scalars[:, :, g * c:(g + 1) * c]))
        return torch.cat(out, dim=1)


class NormActivation(torch.nn.Module):
    """e3nn's norm nonlinearity (NequIP's ``norm`` option): every block's channel ``x`` ``(n,
    2l+1)`` scaled by ``act(|x|) / |x|``, ``|x| = sqrt(max(sum_m x_m^2, eps^2))``; parity and
    rotations are kept for any ``act``. Input per-block list, output ``(n, components, c)``."""

    def __init__(self, act: torch.nn.Module, epsilon: float = 1e-8):
        super().__init__()
        self.act = act
        self.eps2 = float(epsilon) ** 2

    def forward(self, parts: List[Tensor]) -> Tensor:
        out: List[Tensor] = []
        for x in parts:
            norm = (x * x).sum(1, keepdim=True).clamp_min(self.eps2).sqrt()
            out.append(x * (self.act(norm) / norm))
        return torch.cat(out, dim=1)


# ---- direct force heads ---------------------------------------------------------------------
class Degree1ForceHead(torch.nn.Module):
    """Direct forces ``(n_atoms, 3)`` eV/Å: a channel mix of the degree-1 block (Cartesian
    components 1:4) of features ``(n_atoms, components, channels)`` (NequIP's features, MACE's
    last atomic basis)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels) / math.sqrt(channels))

    def forward(self, out: Dict[str, Tensor], features: Tensor) -> Dict[str, Tensor]:
        out[keys.FORCES] = torch.matmul(features[:, 1:4], self.weight)
        return out


class NoForceHead(torch.nn.Module):
    """Force head of a model without direct forces: passes the outputs through."""

    def forward(self, out: Dict[str, Tensor], features: Tensor) -> Dict[str, Tensor]:
        return out
