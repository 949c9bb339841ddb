"""e3nn's conventions, stated in eqcalc's basis, for converting models built with e3nn.

No e3nn code is imported or copied: its conventions are written down and derived from
:mod:`potentials.o3`, and the proof tests compare them with the real library.

* Harmonics: e3nn's real spherical harmonics ("component" normalisation) are eqcalc's
  polynomials evaluated at ``(z, x, y)`` for ``l >= 2`` (y is e3nn's polar axis) and
  ``sqrt(3) (x, y, z)`` for ``l = 1``. Both bases are orthonormal, so for each degree one
  orthogonal matrix relates them: ``Y_e3nn = Q_l Y_eqcalc`` (:func:`basis_change`), and every
  equivariant tensor of e3nn maps onto eqcalc's basis by ``Q^T`` on each of its degree axes
  (:func:`to_eqcalc`).
* Wigner 3j symbols (e3nn 0.4.4, the version mace-torch pins): unit Frobenius norm; for sorted
  ``l1 <= l2 <= l3`` the sign makes the entry ``[l1, l2, l3]`` (the m = 0 components) positive,
  or where that is zero the first non-zero entry; other orders are transposes of the sorted one
  times ``(-1)^(l1+l2+l3)``, the last matching case of e3nn's chain winning.
* Wigner 3j symbols (e3nn >= 0.5, NequIP's): the Condon-Shortley complex Clebsch-Gordan
  coefficients taken to e3nn's real basis by Wikipedia's real form times ``(-i)^l``, unit norm.
  Same as 0.4.4 for even ``l1+l2+l3``; for odd sums (only met with odd-parity features) some
  signs differ: (1,2,2), (1,3,3), (2,3,2) for l <= 3 (measured against e3nn 0.6.0).
* Irreps ``"8x0e+8x1o"``: (multiplicity, degree, parity) triples; features are laid out
  ``mul_ir``: per irrep, channel-major then component.
* ``o3.Linear``: one weight block ``(mul_in, mul_out)`` per instruction, in instruction order,
  multiplied by the instruction's stored ``path_weight``.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, List, Sequence, Tuple

import numpy as np

from eqcalc.errors import ModelFileError
from potentials import o3

Irreps = List[Tuple[int, int, int]]  # (mul, l, parity ±1)


def harmonics(vectors: np.ndarray, lmax: int) -> np.ndarray:
    """e3nn's component-normalised harmonics of unit vectors ``(n, 3)`` → ``(n, (lmax+1)^2)``."""
    x, y, z = vectors[:, 0], vectors[:, 1], vectors[:, 2]
    out = np.stack(o3._sh_terms(z, x, y, lmax), axis=1)
    if lmax >= 1:
        out[:, 1:4] = np.sqrt(3.0) * vectors
    return out


@functools.lru_cache(maxsize=None)
def basis_change(l: int) -> np.ndarray:
    """``Q_l`` ``(2l+1, 2l+1)``, orthogonal, with ``Y_e3nn_l(r) = Q_l @ Y_eqcalc_l(r)``."""
    rng = np.random.default_rng(7)
    points = rng.normal(size=(64, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    block = slice(o3.offset(l), o3.offset(l) + 2 * l + 1)
    ours = o3.spherical_harmonics_np(points, l)[:, block]
    theirs = harmonics(points, l)[:, block]
    Q = np.linalg.lstsq(ours, theirs, rcond=None)[0].T
    assert np.allclose(Q @ Q.T, np.eye(2 * l + 1), atol=1e-12), l
    Q[np.abs(Q) < 1e-14] = 0.0
    return Q


def block_basis_change(ls: Sequence[int]) -> np.ndarray:
    """Block-diagonal ``Q`` of a feature whose components are degrees ``ls`` in order."""
    d = sum(2 * l + 1 for l in ls)
    Q = np.zeros((d, d))
    start = 0
    for l in ls:
        Q[start:start + 2 * l + 1, start:start + 2 * l + 1] = basis_change(l)
        start += 2 * l + 1
    return Q


def to_eqcalc(tensor: np.ndarray, axes_ls: Sequence[Sequence[int]]) -> np.ndarray:
    """A tensor with e3nn-basis axes → eqcalc's basis: ``Q^T`` on each axis ``k`` whose
    components are degrees ``axes_ls[k]``; trailing axes beyond ``len(axes_ls)`` are untouched."""
    out = np.asarray(tensor, dtype=np.float64)
    for axis, ls in enumerate(axes_ls):
        Q = block_basis_change(ls)
        out = np.moveaxis(np.tensordot(Q.T, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


def from_eqcalc(tensor: np.ndarray, axes_ls: Sequence[Sequence[int]]) -> np.ndarray:
    """Inverse of :func:`to_eqcalc` (``Q`` on each axis)."""
    out = np.asarray(tensor, dtype=np.float64)
    for axis, ls in enumerate(axes_ls):
        Q = block_basis_change(ls)
        out = np.moveaxis(np.tensordot(Q, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


@functools.lru_cache(maxsize=None)
def _w3j_sorted(l1: int, l2: int, l3: int) -> np.ndarray:
    """e3nn 0.4.4's stored 3j symbol for ``l1 <= l2 <= l3`` in e3nn's basis."""
    c = from_eqcalc(o3.clebsch_gordan(l1, l2, l3), [[l1], [l2], [l3]])
    c[np.abs(c) < 1e-10] = 0.0
    pivot = c[l1, l2, l3]
    first = pivot if pivot != 0 else c.reshape(-1)[np.flatnonzero(c)[0]]
    return c if first > 0 else -c


@functools.lru_cache(maxsize=None)
def wigner_3j(l1: int, l2: int, l3: int) -> np.ndarray:
    """e3nn 0.4.4's ``wigner_3j(l1, l2, l3)`` ``(2l1+1, 2l2+1, 2l3+1)`` in e3nn's basis."""
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        raise ValueError(f"no coupling {l1} x {l2} -> {l3}")
    sign = (-1) ** (l1 + l2 + l3)
    out = None
    # e3nn's chain of (not exclusive) cases; the last one that matches wins.
    if l1 <= l2 <= l3:
        out = _w3j_sorted(l1, l2, l3)
    if l1 <= l3 <= l2:
        out = _w3j_sorted(l1, l3, l2).transpose(0, 2, 1) * sign
    if l2 <= l1 <= l3:
        out = _w3j_sorted(l2, l1, l3).transpose(1, 0, 2) * sign
    if l3 <= l2 <= l1:
        out = _w3j_sorted(l3, l2, l1).transpose(2, 1, 0) * sign
    if l2 <= l3 <= l1:
        out = _w3j_sorted(l2, l3, l1).transpose(2, 0, 1)
    if l3 <= l1 <= l2:
        out = _w3j_sorted(l3, l1, l2).transpose(1, 2, 0)
    return out


def _condon_shortley(l1: int, m1: int, l2: int, m2: int, l3: int, m3: int) -> float:
    """Complex Clebsch-Gordan coefficient ``<l1 m1 l2 m2 | l3 m3>`` (Racah's formula)."""
    if m3 != m1 + m2 or not abs(l1 - l2) <= l3 <= l1 + l2 or max(abs(m1) - l1, abs(m2) - l2, abs(m3) - l3) > 0:
        return 0.0
    f = math.factorial
    pre = math.sqrt((2 * l3 + 1) * f(l3 + l1 - l2) * f(l3 - l1 + l2) * f(l1 + l2 - l3) / f(l1 + l2 + l3 + 1)
                    * f(l3 + m3) * f(l3 - m3) * f(l1 - m1) * f(l1 + m1) * f(l2 - m2) * f(l2 + m2))
    total = 0.0
    for k in range(0, l1 + l2 - l3 + 1):
        parts = (l1 + l2 - l3 - k, l1 - m1 - k, l2 + m2 - k, l3 - l2 + m1 + k, l3 - l1 - m2 + k)
        if min(parts) >= 0:
            total += (-1) ** k / (f(k) * np.prod([f(x) for x in parts]))
    return pre * total


def _real_to_complex(l: int) -> np.ndarray:
    """``(2l+1, 2l+1)`` complex: row complex ``m``, column e3nn's real component (Wikipedia's
    real form, times ``(-i)^l`` so that the real-basis couplings come out real)."""
    q = np.zeros((2 * l + 1, 2 * l + 1), dtype=np.complex128)
    r = 1 / math.sqrt(2.0)
    for m in range(1, l + 1):
        q[l - m, l + m], q[l - m, l - m] = r, -1j * r
        q[l + m, l + m], q[l + m, l - m] = (-1) ** m * r, 1j * (-1) ** m * r
    q[l, l] = 1.0
    return (-1j) ** l * q


@functools.lru_cache(maxsize=None)
def wigner_3j_cs(l1: int, l2: int, l3: int) -> np.ndarray:
    """e3nn >= 0.5's ``wigner_3j(l1, l2, l3)`` ``(2l1+1, 2l2+1, 2l3+1)`` in e3nn's basis."""
    cg = np.zeros((2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1))
    for m1 in range(-l1, l1 + 1):
        for m2 in range(-l2, l2 + 1):
            if abs(m1 + m2) <= l3:
                cg[l1 + m1, l2 + m2, l3 + m1 + m2] = _condon_shortley(l1, m1, l2, m2, l3, m1 + m2)
    c = np.einsum("ij,kl,nm,ikn->jlm", _real_to_complex(l1), _real_to_complex(l2),
                  _real_to_complex(l3).conj(), cg)
    assert np.abs(c.imag).max() < 1e-10, (l1, l2, l3)
    return c.real / np.linalg.norm(c.real)


#: e3nn's 3j convention by version: ``"0.4"`` (mace-torch's pin) or ``"0.5"`` (e3nn >= 0.5, NequIP).
WIGNER_3J = {"0.4": wigner_3j, "0.5": wigner_3j_cs}


def coupling_sign(l1: int, l2: int, l3: int, convention: str = "0.4") -> float:
    """±1: e3nn's 3j symbol of ``l1 ⊗ l2 → l3`` (``convention``: see :data:`WIGNER_3J`)
    expressed in eqcalc's basis, relative to :func:`potentials.o3.clebsch_gordan` (both are the
    unique invariant up to sign)."""
    w3j = WIGNER_3J[convention](l1, l2, l3)
    overlap = float(np.sum(to_eqcalc(w3j, [[l1], [l2], [l3]]) * o3.clebsch_gordan(l1, l2, l3)))
    assert abs(abs(overlap) - 1.0) < 1e-9, (l1, l2, l3, overlap)
    return 1.0 if overlap > 0 else -1.0


# ---- irreps and instructions of pickled e3nn modules ---------------------------------------
_IRREP = re.compile(r"^\s*(?:(\d+)\s*x\s*)?(\d+)([eo])\s*$")


def parse_irreps(value: Any) -> Irreps:
    """``(mul, l, parity)`` of an irreps string or a pickled ``e3nn.o3.Irreps`` record."""
    if isinstance(value, str):
        out = []
        for part in value.split("+"):
            if not part.strip():
                continue
            match = _IRREP.match(part)
            if match is None:
                raise ModelFileError(f"cannot read irreps {value!r}")
            mul, l, p = match.groups()
            out.append((int(mul or 1), int(l), 1 if p == "e" else -1))
        return out
    try:  # Irreps(tuple of _MulIr((mul, Irrep((l, p)))))
        items = value.args[0]
        out = []
        for mul_ir in items:
            mul, ir = mul_ir.args[0]
            l, p = ir.args[0]
            out.append((int(mul), int(l), int(p)))
        return out
    except (AttributeError, IndexError, TypeError, ValueError) as e:
        raise ModelFileError(f"cannot read irreps from {value!r}") from e


def irreps_str(irreps: Irreps) -> str:
    return "+".join(f"{m}x{l}{'e' if p == 1 else 'o'}" for m, l, p in irreps)


def instructions(record) -> List[tuple]:
    """The ``instructions`` of a pickled e3nn Linear/TensorProduct as plain tuples."""
    out = []
    for ins in record.attr("instructions") or []:
        args = getattr(ins, "args", None)
        if not args:
            raise ModelFileError(f"{record.kind}: unreadable instruction {ins!r}")
        out.append(tuple(args))
    return out


def linear_blocks(record) -> List[Tuple[int, int, np.ndarray]]:
    """``(i_in, i_out, W)`` of a pickled ``e3nn.o3.Linear`` without biases, ``W`` ``(mul_in,
    mul_out)`` already multiplied by its path weight (float64)."""
    if record.tensors.get("bias") is not None and record.tensor("bias").numel() > 0:
        raise ModelFileError(f"{record.kind} has biases; not used by the models this converter reads")
    flat = record.tensor("weight").detach().double().numpy().reshape(-1)
    out, start = [], 0
    for i_in, i_out, shape, path_weight in instructions(record):
        n = int(np.prod(shape))
        out.append((int(i_in), int(i_out), flat[start:start + n].reshape(shape) * float(path_weight)))
        start += n
    if start != flat.size:
        raise ModelFileError(f"{record.kind}: {flat.size} weights for instructions needing {start}")
    return out


def normalize2mom_constant(record) -> float:
    """The activation scale of e3nn's ``normalize2mom`` record (1 when it is the identity)."""
    if record.attr("_is_id", False):
        return 1.0
    return float(record.attr("cst"))
