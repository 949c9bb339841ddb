"""Physics checks for any registered architecture, as a library.

Each ``check_*`` function evaluates a property that must hold for a correct potential and
returns the worst error it saw (a float, relative unless stated), so callers can both assert
and report. ``tests/test_physics.py`` runs them over every registered architecture in float32
and float64; the closing figures of an issue come from :func:`report`.

All evaluations go through :class:`eqcalc.EquivariantCalculator` (neighbor list, model,
derivatives), so a check fails if any room of the data flow is wrong. Batches of displaced or
transformed structures are evaluated in one ``predict`` call to keep the checks fast.

Second order: :func:`symmetric_sites` are perfect crystals and an adsorbate on a symmetric site,
where the force on an atom vanishes by symmetry; :func:`check_linear_response` asks that it grows
linearly with a displacement (a cusp in the energy shows up as a stiffness ``-F(u) / u`` that
changes by orders of magnitude between u = 1e-5 and 1e-2 Å) and agrees with the Hessian;
:func:`check_hessian_fd` and :func:`check_hessian_identities` test the Hessian itself. Models that are not twice differentiable by
construction (frame averaging) are named by :func:`second_order_limit`; the calculator refuses
their Hessian.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule

#: Tolerances the issues ask for, per model dtype.
TOLERANCES = {
    "float64": {"fd_forces": 1e-6, "fd_stress": 1e-6, "symmetry": 1e-10, "consistency": 1e-10,
                "compiled": 1e-10, "fd_hessian": 1e-6, "hessian_symmetry": 1e-10,
                "acoustic_sum": 1e-10, "linear_response": 0.01},
    # float32: FD is taken on the same weights in float64, so this measures the fp32 path's error.
    "float32": {"fd_forces": 1e-4, "fd_stress": 1e-4, "symmetry": 1e-5, "consistency": 1e-5,
                "compiled": 5e-5, "fd_hessian": 1e-4, "hessian_symmetry": 1e-5,
                "acoustic_sum": 1e-5, "linear_response": 0.01},
}

#: Frame-averaged models (potentials.frames) in float32: forces and stress through the calculator
#: are equivariant to 1e-4 relative (the issue's target), not 1e-5. The pair vectors are rounded to
#: float32 before the PCA, and near-degenerate eigenvalues (the rattled cubic "bulk" test cell is
#: almost isotropic) amplify that rounding by eigenvalue / gap in the frame and in the conservative
#: forces through it (measured 2.1e-5 on "bulk"; supercell vs cell 1.7e-5). Energies stay within
#: 1e-5; float64 is unchanged. Direct forces of an UNTRAINED head nearly cancel over the 8 frames
#: (the average is ~100x smaller than each frame's output), so their relative error looks ~100x
#: larger (3e-4 measured): 1e-3 for those; a trained head meets 1e-4 (tests/test_faenet.py).
FRAME_AVERAGED = {"float64": {"symmetry": 1e-10, "consistency": 1e-10, "direct_symmetry": 1e-10},
                  "float32": {"symmetry": 1e-4, "consistency": 1e-4, "direct_symmetry": 1e-3}}


def tolerance(metadata, dtype: str, check: str, forces: str = "conservative") -> float:
    """Tolerance of ``check`` ("symmetry", "consistency", ...) for a model (its package
    ``metadata``) evaluated in ``dtype``: :data:`TOLERANCES`, or :data:`FRAME_AVERAGED` for
    frame-averaged models."""
    if metadata.get("frame_averaging", "none") != "none" and check in ("symmetry", "consistency"):
        key = "direct_symmetry" if check == "symmetry" and forces == "direct" else check
        return FRAME_AVERAGED[dtype][key]
    return TOLERANCES[dtype][check]


# ---- structures ---------------------------------------------------------------------------
def _assign(atoms: Atoms, species: Sequence[str], rng) -> Atoms:
    atoms.set_chemical_symbols(rng.choice(list(species), size=len(atoms)))
    return atoms


def structures(species: Sequence[str], seed: int = 0) -> Dict[str, Atoms]:
    """Test structures made of ``species``: rattled bulk, a strained triclinic cell smaller than a
    5 Å cutoff, a mixed-pbc slab with an overhanging atom, and a non-periodic cluster."""
    rng = np.random.default_rng(seed)
    out = {}
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1))
    a.rattle(0.08, seed=seed)
    out["bulk"] = _assign(a, species, rng)
    t = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))  # primitive fcc: heights ~2.1 Å << cutoff
    t.set_cell(t.cell.array @ (np.eye(3) + rng.normal(scale=0.03, size=(3, 3))), scale_atoms=True)
    t.rattle(0.05, seed=seed + 1)
    out["small_triclinic"] = _assign(t, species, rng)
    s = fcc111("Cu", size=(2, 2, 3), a=3.6, vacuum=5.0)
    s.pbc = (True, True, False)
    s.rattle(0.05, seed=seed + 2)
    s.positions[0] += s.cell[0] * 1.3  # outside the cell: must not matter
    out["slab"] = _assign(s, species, rng)
    m = molecule("CH3CH2OH")
    m.rattle(0.05, seed=seed + 3)
    m.positions *= 1.25  # spread out a little so any species sits comfortably
    out["cluster"] = _assign(m, species, rng)
    return out


def random_orthogonal(rng, reflect: bool) -> np.ndarray:
    """A random O(3) element, a reflection when ``reflect``."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return -q if reflect else q


def _rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ---- checks -------------------------------------------------------------------------------
def _central_differences(reference, atoms: Atoms, picks, h: float, key: str) -> np.ndarray:
    """``∂ result[key] / ∂ r[i, k]`` for each ``(i, k)`` of ``picks`` by 4th-order central
    differences (one batched ``reference.predict`` of the 4 displacements of each), flattened:
    ``(len(picks), size of result[key])``."""
    displaced = []
    for i, k in picks:
        for step in (h, -h, 2 * h, -2 * h):
            d = atoms.copy()
            d.positions[i, k] += step
            displaced.append(d)
    values = np.array([np.asarray(r[key], dtype=float).reshape(-1) for r in reference.predict(displaced)])
    values = values.reshape(len(picks), 4, -1)
    return (8 * (values[:, 0] - values[:, 1]) - (values[:, 2] - values[:, 3])) / (12 * h)


def check_forces_fd(calc, atoms: Atoms, reference=None, n_components: int = 6, h: float = 1e-3,
                    seed: int = 0) -> float:
    """Forces vs 4th-order central differences of the energy (``reference`` calculator, default
    ``calc``), on random components; max |ΔF| / max |F|."""
    reference = reference or calc
    rng = np.random.default_rng(seed)
    picks = [(rng.integers(len(atoms)), rng.integers(3)) for _ in range(n_components)]
    fd = -_central_differences(reference, atoms, picks, h, "energy")[:, 0]
    forces = calc.predict([atoms])[0]["forces"]
    analytic = np.array([forces[i, k] for i, k in picks])
    return float(np.abs(analytic - fd).max() / max(np.abs(forces).max(), 1e-12))


def strained(atoms: Atoms, deformation: np.ndarray) -> Atoms:
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ deformation, scale_atoms=False)
    out.positions = atoms.positions @ deformation
    return out


def check_stress_fd(calc, atoms: Atoms, reference=None, h: float = 1e-4) -> float:
    """Stress vs central differences of E under symmetric strain: σ_ab = (1/V) dE/dε_ab."""
    reference = reference or calc
    displaced = []
    pairs = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]  # ASE Voigt order
    for a, b in pairs:
        e = np.zeros((3, 3))
        e[a, b] += 0.5
        e[b, a] += 0.5
        for step in (h, -h, 2 * h, -2 * h):
            displaced.append(strained(atoms, np.eye(3) + step * e))
    energies = np.array([r["energy"] for r in reference.predict(displaced)]).reshape(-1, 4)
    fd = (8 * (energies[:, 0] - energies[:, 1]) - (energies[:, 2] - energies[:, 3])) / (12 * h)
    fd /= abs(atoms.cell.volume)
    stress = calc.predict([atoms])[0]["stress"]
    return _rel(stress, fd)


def check_symmetry(calc, atoms: Atoms, n: int = 100, seed: int = 0) -> Dict[str, float]:
    """Energy invariance and force/stress equivariance under ``n`` random O(3) elements (half of
    them reflections) combined with a random translation and atom permutation."""
    rng = np.random.default_rng(seed)
    base = calc.predict([atoms])[0]
    copies, transforms = [], []
    for k in range(n):
        q = random_orthogonal(rng, reflect=bool(k % 2))
        perm = rng.permutation(len(atoms))
        c = atoms[perm]
        c.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
        c.positions = atoms.positions[perm] @ q.T + rng.normal(scale=3.0, size=3)
        copies.append(c)
        transforms.append((q, perm))
    worst = {"energy": 0.0, "forces": 0.0, "stress": 0.0}
    for r, (q, perm) in zip(calc.predict(copies), transforms):
        worst["energy"] = max(worst["energy"], abs(r["energy"] - base["energy"]) / max(abs(base["energy"]), 1e-12))
        worst["forces"] = max(worst["forces"], _rel(r["forces"], base["forces"][perm] @ q.T))
        if "stress" in base:
            s0 = _voigt_to_full(base["stress"])
            worst["stress"] = max(worst["stress"], _rel(_voigt_to_full(r["stress"]), q @ s0 @ q.T))
    return worst


def _voigt_to_full(v: np.ndarray) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def check_extensive(calc, atoms: Atoms, reps=(2, 1, 2)) -> float:
    """Energy per atom, forces and stress of a supercell equal those of the cell."""
    a, b = calc.predict([atoms, atoms.repeat(reps)])
    n = int(np.prod(reps))
    errors = [abs(b["energy"] / n - a["energy"]) / max(abs(a["energy"]), 1e-12),
              _rel(b["forces"][: len(atoms)], a["forces"]), _rel(b["stress"], a["stress"])]
    return max(errors)


def check_batch(calc, systems: Sequence[Atoms]) -> float:
    """A batch of different systems gives what each gives alone (no cross-talk)."""
    batched = calc.predict(list(systems))
    worst = 0.0
    for s, b in zip(systems, batched):
        single = calc.predict([s])[0]
        worst = max(worst, abs(b["energy"] - single["energy"]) / max(abs(single["energy"]), 1e-12),
                    _rel(b["forces"], single["forces"]))
    return worst


def check_wrapping(calc, atoms: Atoms, seed: int = 0) -> float:
    """Moving atoms by whole lattice vectors (along periodic directions) changes nothing."""
    rng = np.random.default_rng(seed)
    moved = atoms.copy()
    shifts = rng.integers(-2, 3, size=(len(atoms), 3)) * atoms.pbc
    moved.positions += shifts @ atoms.cell.array
    wrapped = atoms.copy()
    wrapped.wrap()
    a, b, c = calc.predict([atoms, moved, wrapped])
    return max(abs(b["energy"] - a["energy"]) / abs(a["energy"]), _rel(b["forces"], a["forces"]),
               abs(c["energy"] - a["energy"]) / abs(a["energy"]), _rel(c["forces"], a["forces"]))


def check_cutoff(calc, species: Sequence[str]) -> Dict[str, float]:
    """Dimer forces: exactly zero at and beyond the cutoff, and going continuously to zero just
    inside it (``force_inside_1e-3`` at ``rc - 1e-3`` Å and ``force_inside_1e-4`` at ``rc - 1e-4`` Å:
    a smooth envelope makes the second at least ~10x smaller)."""
    rc = calc.model.cutoff
    pair = species[0] + (species[1] if len(species) > 1 else species[0])
    dimers = [Atoms(pair, positions=[[0, 0, 0], [0, 0, d]]) for d in (rc, rc + 1e-9, rc + 0.5, rc - 1e-3, rc - 1e-4)]
    results = calc.predict(dimers)
    isolated = sum(calc.predict([Atoms(s)])[0]["energy"] for s in pair_symbols(pair))
    return {
        "force_beyond": max(float(np.abs(r["forces"]).max()) for r in results[:3]),
        "energy_beyond": max(abs(r["energy"] - isolated) for r in results[:3]),
        "force_inside_1e-3": float(np.abs(results[3]["forces"]).max()),
        "force_inside_1e-4": float(np.abs(results[4]["forces"]).max()),
    }


def pair_symbols(pair: str) -> List[str]:
    return Atoms(pair).get_chemical_symbols()


def check_compiled(calc_compiled, calc_eager, systems: Sequence[Atoms]) -> float:
    """A compiled calculator agrees with the eager one on new structures (dynamic shapes)."""
    worst = 0.0
    for a, b in zip(calc_compiled.predict(list(systems)), calc_eager.predict(list(systems))):
        worst = max(worst, abs(a["energy"] - b["energy"]) / max(abs(b["energy"]), 1e-12),
                    _rel(a["forces"], b["forces"]))
        if "stress" in b:
            worst = max(worst, _rel(a["stress"], b["stress"]))
    return worst


# ---- second order -------------------------------------------------------------------------
#: Displacements (Å) of the linear-response check: four decades.
DISPLACEMENTS = (1e-5, 1e-4, 1e-3, 1e-2)


def symmetric_sites(species: Sequence[str] = ("Cu",), adsorbate: str = "O") -> Dict[str, tuple]:
    """Structures with an atom on a site where the force vanishes by symmetry:
    ``name -> (atoms, atom index, displacement direction)``.

    Perfect fcc, bcc and hcp crystals of ``species[0]`` (every atom a symmetric site; hcp has no
    inversion centre, so its response may hold an even term), and ``adsorbate`` in the fcc
    hollow of a perfect (111) slab of ``species[0]`` displaced in the surface plane (C3v site: no
    in-plane force at the hollow; the height is not a symmetric coordinate).
    """
    metal = species[0]
    out = {
        "fcc": (bulk(metal, "fcc", a=3.6, cubic=True).repeat(2), 0, (1.0, 0.0, 0.0)),
        "bcc": (bulk(metal, "bcc", a=2.9, cubic=True).repeat(3), 0, (1.0, 1.0, 0.0)),
        "hcp": (bulk(metal, "hcp", a=2.55, c=4.16).repeat((3, 3, 2)), 0, (1.0, 0.0, 0.0)),
    }
    slab = fcc111(metal, size=(3, 3, 3), a=3.6, vacuum=6.0)
    slab.pbc = (True, True, False)
    add_adsorbate(slab, adsorbate, 1.2, "fcc")
    out["adsorbate_hollow"] = (slab, len(slab) - 1, (1.0, 0.0, 0.0))
    return out


def check_linear_response(calc, atoms: Atoms, index: int, direction, hessian_calc=None,
                          displacements=DISPLACEMENTS) -> Dict[str, float]:
    """Force on atom ``index`` at a symmetric site when it moves by ``u`` along ``direction``.

    ``F(0) = 0`` by symmetry; a smooth energy gives ``F(u) = -k u + O(u^2)``. Returns
    ``spread``: the largest relative change of the stiffness ``k(u) = -F(u)·d / u`` over
    ``displacements`` (a cusp makes ``k`` grow like 1/u as u → 0); ``stiffness``: ``k`` at the
    smallest u, eV/Å² (positive: restoring, the site is a minimum along ``d``); ``force_at_site``:
    ``|F(0)·d|`` eV/Å (zero by symmetry); ``hessian``: relative mismatch between ``k`` and ``d·H·d`` from
    ``hessian_calc.get_hessian`` (omitted when ``hessian_calc`` is None).
    """
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d)
    moved = []
    for u in (0.0,) + tuple(displacements):
        a = atoms.copy()
        a.positions[index] += u * d
        moved.append(a)
    results = calc.predict(moved)
    k = np.array([-(r["forces"][index] @ d) / u for r, u in zip(results[1:], displacements)])
    out = {"spread": float(np.abs(k - k[0]).max() / max(abs(k[0]), 1e-12)), "stiffness": float(k[0]),
           "force_at_site": float(abs(results[0]["forces"][index] @ d))}
    if hessian_calc is not None:
        h = hessian_calc.get_hessian(atoms, indices=[index])
        dhd = float(d @ h @ d)
        out["hessian"] = abs(dhd - k[0]) / max(abs(dhd), 1e-12)
    return out


def check_hessian_fd(calc, atoms: Atoms, reference=None, n_columns: int = 6, h: float = 1e-3,
                     seed: int = 0) -> float:
    """Hessian columns vs 4th-order central differences of the forces (``reference`` calculator,
    default ``calc``) on random coordinates; max |ΔH| / max |H| over those columns."""
    reference = reference or calc
    rng = np.random.default_rng(seed)
    picks = [(int(rng.integers(len(atoms))), int(rng.integers(3))) for _ in range(n_columns)]
    fd = -_central_differences(reference, atoms, picks, h, "forces")
    hessian = calc.get_hessian(atoms)
    analytic = np.stack([hessian[:, 3 * i + k] for i, k in picks])
    return float(np.abs(analytic - fd).max() / max(np.abs(analytic).max(), 1e-12))


def check_hessian_identities(calc, atoms: Atoms) -> Dict[str, float]:
    """Identities every Hessian obeys, relative to ``max |H|``: ``symmetry`` ``max |H - Hᵀ|``
    (second derivatives commute) and ``acoustic_sum`` ``max_ia,b |Σ_j H[ia, jb]|`` (translating
    every atom changes nothing, so each row sums to zero over the atoms, per axis)."""
    hessian = calc.get_hessian(atoms)
    scale = max(np.abs(hessian).max(), 1e-12)
    sums = hessian.reshape(3 * len(atoms), len(atoms), 3).sum(axis=1)
    return {"symmetry": float(np.abs(hessian - hessian.T).max() / scale),
            "acoustic_sum": float(np.abs(sums).max() / scale)}


def second_order_limit(calc) -> str | None:
    """Why second derivatives of ``calc``'s model are not defined everywhere (a sentence), or
    None when they are. The calculator refuses ``get_hessian`` exactly when this is not None."""
    from eqcalc.errors import PropertyNotAvailableError

    try:
        calc.model.check_smooth()
    except PropertyNotAvailableError as e:
        return str(e)
    return None
