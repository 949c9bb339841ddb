"""Batched nudged elastic band: many reactions, all their images in one model call per step.

The force on an interior image is that of ASE's ``NEB(images, method="improvedtangent",
climb=...)``: improved tangents (Henkelman & Jónsson, J. Chem. Phys. 113, 9978 (2000)) and the
climbing image (Henkelman, Uberuaga & Jónsson, J. Chem. Phys. 113, 9901 (2000)). For image ``i``
with energy ``E_i``, springs ``t+ = R_{i+1} - R_i`` and ``t- = R_i - R_{i-1}`` (whole-image
``3N`` vectors) and the band's spring constant ``k`` (eV/Å²)::

    τ = t+                        if E_{i+1} > E_i > E_{i-1}
        t-                        if E_{i+1} < E_i < E_{i-1}
        t+ ΔV_max + t- ΔV_min     otherwise, if E_{i+1} > E_{i-1} (ΔV: |E_{i±1} - E_i|)
        t+ ΔV_min + t- ΔV_max     otherwise;   then τ ← τ / |τ|
    F_i = F - (F·τ) τ + k (|t+| - |t-|) τ      (F: the model's forces, zero on FixAtoms atoms)
    F_i = F - 2 (F·τ) τ                          for the climbing image (the highest interior one)

Each band is moved by :class:`eqcalc.relax.FIRE` (or :class:`~eqcalc.relax.LBFGS`) with one set
of scalars per band, as an ASE optimizer moves one ``NEB`` object, so a band follows the path
ASE's would. A band has converged when the largest NEB force on any atom of its interior images
(climbing image included) is at most ``fmax``; it then leaves the batch and is not evaluated again.

Batch layout: the interior images of all bands in the batch are the systems of one
:class:`~eqcalc.md.MDState` (band after band, image after image), so one
:class:`~eqcalc.md.ModelPotential` call (one neighbor list with skin reuse) evaluates them all;
the end points (fixed) sit in a separate tensor with their energies, and index tensors give each
atom row its counterpart in the previous and next image.

Periodic images: the final state is unwrapped to the minimum image of the initial one, atom by
atom along periodic directions (``ase.geometry.find_mic``), before interpolation, so every
difference along the band is a plain difference. ``results[k].images[-1]`` holds those
unwrapped positions (the same structure as the input).

Use :func:`neb` (the driver); :func:`init`, :func:`evaluate`, :func:`step` and
:meth:`NEBState.select` are the pure engine pieces it loops over.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from eqcalc.engine import md
from eqcalc.engine.relax import Segments, check_fmax, make_optimizer, relax
from eqcalc.errors import InvalidAtomsError, InvalidOptionError

__all__ = ["neb", "NEBResult", "NEBState", "BandLayout", "init", "evaluate", "step", "interpolate",
           "tangents", "verify_saddles", "saddle_modes", "INTERPOLATIONS"]

log = logging.getLogger("eqcalc.neb")

INTERPOLATIONS = ("idpp", "linear")
#: End points closer than this (largest atom displacement, Å) are the same state: two minima
#: relaxed to fmax 0.03 eV/Å from nearby starts differ by up to ~0.06 Å; a reaction moves atoms more.
IDENTICAL_ENDS = 0.1
#: Interpolated atoms closer than this fraction of their covalent-radius sum overlap.
OVERLAP_FRACTION = 0.5
#: The saddle check (:func:`saddle_modes`) takes the harmonic mode with the largest overlap with
#: the band's tangent at the climbing image as the reaction mode; it must overlap at least this
#: much (cosine of the angle in mass-weighted coordinates; 0.5 is 60°).
TANGENT_OVERLAP = 0.5
#: Imaginary modes other than the reaction mode that are softer than this (cm⁻¹) are not counted:
#: a minimum relaxed to fmax 0.01 eV/Å with a trained model shows soft modes of 10-25i cm⁻¹
#: (flat frustrated rotations and translations of adsorbates, whose sign a residual force of
#: fmax cannot resolve). The reaction mode has no such floor: a shallow barrier (25 meV for N
#: on Pd(111)) has a soft imaginary mode (21i cm⁻¹), and its direction, not its size, says it is
#: the one the band crosses; only a mode softer than the zero floor of
#: :data:`eqcalc.workflows.vibrations.RIGID_BODY_CM1` counts as flat.
SOFT_MODE_CM1 = 30.0


# ----------------------------------------------------------------------------------------------
# layout and state
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BandLayout:
    """Index tensors of a batch of bands with ``n_interior`` interior images each.

    ``atoms_per_band`` (host list); ``band`` ``(n_systems,)`` band of each interior image;
    ``prev_row``/``next_row`` ``(n_atoms,)`` index of the same atom in the previous/next image
    within ``cat([positions, ends])``; ``prev_image``/``next_image`` ``(n_systems,)`` index of the
    previous/next image within ``cat([energy, end_energy])``; ``end_band`` ``(n_end_atoms,)``;
    ``images`` groups rows by image, ``bands`` by band.
    """

    atoms_per_band: Tuple[int, ...]
    n_interior: int
    band: Tensor
    prev_row: Tensor
    next_row: Tensor
    prev_image: Tensor
    next_image: Tensor
    end_band: Tensor
    images: Segments
    bands: Segments


def band_layout(atoms_per_band: Sequence[int], n_interior: int, device) -> BandLayout:
    """The :class:`BandLayout` of bands with ``atoms_per_band`` atoms (built on the host once per
    change of the batch)."""
    n = np.asarray(atoms_per_band, dtype=np.int64)
    B, M = len(n), n_interior
    band = np.repeat(np.arange(B), M)                     # per interior image (system)
    j = np.tile(np.arange(M), B)                          # its position among the band's interior images
    size = n[band]
    first = np.concatenate([[0], np.cumsum(size)[:-1]])   # first row of each system
    n_rows, n_systems = int(size.sum()), B * M
    end_first = n_rows + np.concatenate([[0], np.cumsum(np.repeat(n, 2))[:-1]])  # rows of the ends in the path
    prev_first = np.where(j == 0, end_first[2 * band], first - size)  # images of a band have equal sizes
    next_first = np.where(j == M - 1, end_first[2 * band + 1], first + size)
    row_system = np.repeat(np.arange(n_systems), size)
    atom = np.arange(n_rows) - first[row_system]
    prev_image = np.where(j == 0, n_systems + 2 * band, np.arange(n_systems) - 1)
    next_image = np.where(j == M - 1, n_systems + 2 * band + 1, np.arange(n_systems) + 1)

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)

    return BandLayout(atoms_per_band=tuple(int(v) for v in n), n_interior=M, band=t(band),
                      prev_row=t(prev_first[row_system] + atom), next_row=t(next_first[row_system] + atom),
                      prev_image=t(prev_image), next_image=t(next_image),
                      end_band=t(np.repeat(np.arange(B), 2 * n)),
                      images=Segments(t(row_system), n_systems), bands=Segments(t(band[row_system]), B))


@dataclass
class NEBState:
    """Bands in motion (float64; units of :mod:`eqcalc.keys`).

    ``images``: the interior images, one system each, with the model's energy ``(n_systems,)`` eV
    and forces ``(n_atoms, 3)`` eV/Å; ``ends`` ``(n_end_atoms, 3)`` Å: initial then final state of
    each band; ``end_energy`` ``(2 n_bands,)`` eV; ``k`` ``(n_bands,)`` eV/Å²; ``climb``;
    ``forces`` ``(n_atoms, 3)`` the NEB forces, ``fmax`` ``(n_bands,)`` their largest atom norm per
    band, ``climbing`` ``(n_bands,)`` index of the climbing image among the band's interior
    images; ``optimizer`` and its per-band variables ``opt_state``; ``step`` steps taken.
    """

    images: md.MDState
    ends: Tensor
    end_energy: Tensor
    k: Tensor
    layout: BandLayout
    optimizer: object
    climb: bool = True
    opt_state: dict = field(default_factory=dict)
    forces: Optional[Tensor] = None
    fmax: Optional[Tensor] = None
    climbing: Optional[Tensor] = None
    step: int = 0

    @property
    def n_bands(self) -> int:
        return len(self.layout.atoms_per_band)

    def replace(self, **changes) -> "NEBState":
        return dataclasses.replace(self, **changes)

    def select(self, keep: Tensor) -> "NEBState":
        """The bands where ``keep`` ``(n_bands,)`` bool holds (how converged bands leave the batch)."""
        L = self.layout
        systems = keep[L.band]
        rows = systems[self.images.system]
        kept = [n for n, k in zip(L.atoms_per_band, keep.tolist()) if k]
        opt_state = self.optimizer.select(self.opt_state, keep, rows) if self.opt_state else {}
        return self.replace(
            images=self.images.select(systems), ends=self.ends[keep[L.end_band]],
            end_energy=self.end_energy[keep.repeat_interleave(2)], k=self.k[keep],
            layout=band_layout(kept, L.n_interior, self.ends.device), opt_state=opt_state,
            forces=None if self.forces is None else self.forces[rows],
            fmax=None if self.fmax is None else self.fmax[keep],
            climbing=None if self.climbing is None else self.climbing[keep])


# ----------------------------------------------------------------------------------------------
# pure engine functions
# ----------------------------------------------------------------------------------------------
def init(bands: Sequence[Sequence], end_energy, k, climb: bool = True, optimizer="fire",
         device="cpu", species=None) -> NEBState:
    """A state from ``bands`` (per band, its ``n_images`` ASE Atoms, ends included, all bands with
    the same ``n_images``), ``end_energy`` ``(n_bands, 2)`` eV and spring constants ``k`` (one
    value or one per band, eV/Å²). Positions of the images are used as given."""
    n_images = len(bands[0])
    interior = [a for band in bands for a in band[1:-1]]
    f64 = dict(dtype=torch.float64, device=device)
    ends = torch.as_tensor(np.concatenate([np.concatenate([b[0].positions, b[-1].positions]) for b in bands]), **f64)
    k = md._per_system("k", k, len(bands), device)
    optimizer = make_optimizer(optimizer)
    images = md.state_from_atoms(interior, device, species)
    layout = band_layout([len(b[0]) for b in bands], n_images - 2, device)
    return NEBState(images=images, ends=ends, end_energy=torch.as_tensor(np.asarray(end_energy).reshape(-1), **f64),
                    k=k, layout=layout, optimizer=optimizer, climb=bool(climb),
                    opt_state=optimizer.init(images.positions, len(bands)))


def tangents(state: NEBState) -> Tuple[Tensor, Tensor, Tensor]:
    """The improved tangents ``τ`` ``(n_atoms, 3)`` (unit per image) of the interior images, and
    the springs ``t+``, ``t-`` ``(n_atoms, 3)`` Å, from the positions and the model's energies
    (module docstring)."""
    im, L = state.images, state.layout
    seg = L.images
    x = im.positions
    path = torch.cat([x, state.ends])
    t_next = path[L.next_row] - x
    t_prev = x - path[L.prev_row]
    energy = torch.cat([im.energy, state.end_energy])
    e, e_next, e_prev = im.energy, energy[L.next_image], energy[L.prev_image]
    up = (e_next > e) & (e > e_prev)
    down = (e_next < e) & (e < e_prev)
    dv_next, dv_prev = (e_next - e).abs(), (e_prev - e).abs()
    dv_max, dv_min = torch.maximum(dv_next, dv_prev), torch.minimum(dv_next, dv_prev)
    rising = e_next > e_prev
    one, zero = torch.ones_like(e), torch.zeros_like(e)
    w_next = torch.where(up, one, torch.where(down, zero, torch.where(rising, dv_max, dv_min)))
    w_prev = torch.where(up, zero, torch.where(down, one, torch.where(rising, dv_min, dv_max)))
    tau = seg.atoms(w_next) * t_next + seg.atoms(w_prev) * t_prev
    tau = tau / seg.atoms(seg.dot(tau, tau).sqrt().clamp(min=1e-300))  # two images on top of each other
    return tau, t_next, t_prev


def nudged_forces(state: NEBState) -> NEBState:
    """``state`` with the NEB forces, ``fmax`` per band and the climbing images, from the model's
    energies and forces on ``state.images`` (module docstring for the formulas)."""
    im, L = state.images, state.layout
    seg = L.images
    tau, t_next, t_prev = tangents(state)
    e = im.energy
    f_parallel = seg.dot(im.forces, tau)
    spring = state.k[L.band] * (seg.dot(t_next, t_next).sqrt() - seg.dot(t_prev, t_prev).sqrt())
    climbing = e.view(state.n_bands, L.n_interior).argmax(1)
    is_climbing = torch.zeros(e.shape, dtype=torch.bool, device=e.device)
    if state.climb:
        is_climbing[climbing + L.n_interior * torch.arange(state.n_bands, device=e.device)] = True
    along = torch.where(is_climbing, -2.0 * f_parallel, spring - f_parallel)
    forces = (im.forces + seg.atoms(along) * tau) * (~im.fixed).unsqueeze(1)
    return state.replace(forces=forces, fmax=L.bands.max_norm(forces), climbing=climbing)


def evaluate(state: NEBState, potential) -> NEBState:
    """One model call on all interior images of the batch, then the NEB forces. A non-finite or
    absurd energy or force raises :class:`~eqcalc.errors.UnstableSimulationError` (its system:
    the image's index in the batch)."""
    images = md.evaluate(state.images.replace(step=state.step), potential)
    md.check_physical(images, max_temperature_K=None)  # never a NaN fmax reported as a result
    return nudged_forces(state.replace(images=images))


def step(state: NEBState, potential) -> NEBState:
    """One optimizer step of every band in the batch (from its NEB forces), then :func:`evaluate`.
    ``state`` is left untouched."""
    opt_state = {k: list(v) if isinstance(v, list) else v for k, v in state.opt_state.items()}
    x = state.images.positions
    dr = state.optimizer.step(state.forces, x, opt_state, state.layout.bands)
    moved = state.replace(images=state.images.replace(positions=x + dr), opt_state=opt_state,
                          step=state.step + 1)
    return evaluate(moved, potential)


# ----------------------------------------------------------------------------------------------
# interpolation and input checks
# ----------------------------------------------------------------------------------------------
def _displacement(initial, final) -> np.ndarray:
    """``final - initial`` per atom ``(n_atoms, 3)`` Å, minimum image along periodic directions."""
    d = final.positions - initial.positions
    if initial.pbc.any():
        from ase.geometry import find_mic

        d = find_mic(d, initial.cell, initial.pbc)[0]
    return d


def interpolate(initial, final, n_images: int, method: str = "idpp") -> List:
    """``n_images`` ASE Atoms from ``initial`` to ``final`` (both included; the final unwrapped to
    the minimum image of the initial). ``method``: ``"linear"`` (ASE's ``interpolate``) or
    ``"idpp"`` (then ASE's ``idpp_interpolate``, Smidstrup et al. 2014, with the minimum image
    convention on periodic systems). FixAtoms atoms keep their positions."""
    from eqcalc.errors import check_choice

    check_choice("interpolation", method, INTERPOLATIONS)
    d = _displacement(initial, final) / (n_images - 1.0)
    images = []
    for j in range(n_images):
        a = (initial if j < n_images - 1 else final).copy()
        a.calc = None
        a.positions = initial.positions + j * d  # plain assignment: FixAtoms atoms have d = 0
        images.append(a)
    if method == "idpp":
        import warnings

        from ase.mep import idpp_interpolate

        with warnings.catch_warnings():  # ASE's notice about NEB's default method (IDPP's own band)
            warnings.filterwarnings("ignore", message="The default method has changed")
            idpp_interpolate(images, traj=None, log=None, mic=bool(initial.pbc.any()))
    return images


def _check_reaction(k: int, initial, final) -> None:
    """Typed errors for end points that cannot make one band."""
    where = f"reaction {k}"
    if len(initial) != len(final):
        raise InvalidAtomsError(
            f"{where}: the initial state has {len(initial)} atoms and the final state {len(final)}; "
            "both end points must hold the same atoms (add or remove atoms so they match)")
    diff = np.nonzero(initial.numbers != final.numbers)[0]
    if len(diff):
        i = int(diff[0])
        raise InvalidAtomsError(
            f"{where}: atom {i} is {initial.get_chemical_symbols()[i]} in the initial state but "
            f"{final.get_chemical_symbols()[i]} in the final state; list the atoms in the same order in "
            "both end points (atom i must be the same atom)")
    if (initial.pbc != final.pbc).any():
        raise InvalidAtomsError(f"{where}: pbc differs ({initial.pbc.tolist()} vs {final.pbc.tolist()}); "
                                "give both end points the same periodicity")
    periodic = initial.pbc
    if np.abs(initial.cell.array[periodic] - final.cell.array[periodic]).max(initial=0.0) > 1e-6:
        raise InvalidAtomsError(f"{where}: the end points have different cells; NEB moves atoms in a "
                                "fixed cell: give both end points the same cell")
    fixed = md.fixed_mask(initial)
    if (fixed != md.fixed_mask(final)).any():
        raise InvalidAtomsError(
            f"{where}: FixAtoms differ between the end points (fixed atoms {np.nonzero(fixed)[0].tolist()} vs "
            f"{np.nonzero(md.fixed_mask(final))[0].tolist()}); give both end points the same constraint")
    moved = np.linalg.norm(_displacement(initial, final), axis=1)
    if fixed.any() and moved[fixed].max() > 1e-6:
        raise InvalidAtomsError(f"{where}: fixed atoms sit at different positions in the two end points "
                                f"(up to {moved[fixed].max():.3g} Å); fixed atoms must not move along the path")


def _check_distinct(k: int, initial, final, relaxed: bool) -> None:
    moved = np.linalg.norm(_displacement(initial, final), axis=1).max()
    if moved < IDENTICAL_ENDS:
        fix = ("they relaxed into the same minimum of this model: choose another final state, or pass "
               "relax_endpoints=False to use the end points as given") if relaxed else "give two different states"
        raise InvalidAtomsError(f"reaction {k}: the initial and final states are identical (largest "
                                f"displacement {moved:.2g} Å < {IDENTICAL_ENDS} Å); {fix}")


def _check_overlaps(bands) -> None:
    """Raise if atoms of an interpolated image come closer than :data:`OVERLAP_FRACTION` of
    their covalent-radius sum (the path runs atoms through each other)."""
    from ase.data import covalent_radii

    from eqcalc.atoms import to_tensors
    from eqcalc.neighbors import compute_edge_vectors, compute_neighbors

    interior = [a for band in bands for a in band[1:-1]]
    t = to_tensors(interior)
    radii = torch.as_tensor(covalent_radii)[t.numbers]
    edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, float(radii.max()), system=t.system)
    if edge_index.shape[1] == 0:
        return
    lengths = compute_edge_vectors(t.positions, t.cell, edge_index, shifts, t.system).norm(dim=1)
    ratio = lengths / (radii[edge_index[0]] + radii[edge_index[1]])
    worst = int(torch.argmin(ratio))
    if float(ratio[worst]) >= OVERLAP_FRACTION:
        return
    s = int(t.system[edge_index[0, worst]])
    M = len(bands[0]) - 2
    band, image = divmod(s, M)
    first = int(torch.nonzero(t.system == s)[0])
    i, j = (int(v) - first for v in edge_index[:, worst])
    sym = interior[s].get_chemical_symbols()
    raise InvalidAtomsError(
        f"reaction {band}: in interpolated image {image + 1} atoms {i} ({sym[i]}) and {j} ({sym[j]}) are "
        f"{float(lengths[worst]):.2f} Å apart (less than {OVERLAP_FRACTION} of their covalent radii); the path "
        "runs atoms through each other. Check that each atom is the same atom in both end points (atom "
        "order), use interpolation='idpp', or split the reaction at an intermediate state")


def _as_potential(potential):
    """A model name, path or :class:`~eqcalc.model.Model` becomes a :class:`~eqcalc.md.ModelPotential`."""
    from eqcalc.model import Model

    if isinstance(potential, (str, os.PathLike, Model)):
        return md.ModelPotential(potential, device="auto") if not isinstance(potential, Model) \
            else md.ModelPotential(potential)
    if not callable(potential):
        raise InvalidOptionError(f"potential={potential!r} must be a model name, an .eqm path or an "
                                 "eqcalc.md.ModelPotential")
    return potential


# ----------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------
@dataclass
class NEBResult:
    """One reaction's band: ``images`` (``n_images`` ASE Atoms with a single-point calculator:
    energy and the model's forces), ``energies`` ``(n_images,)`` eV, ``converged`` (band and end
    points), ``steps`` optimizer steps, ``fmax`` final largest NEB force (eV/Å), ``climbing_image``
    (index into ``images``), ``endpoints_converged``, ``tangent`` ``(n_atoms, 3)`` the band's unit
    tangent at the climbing image (the direction the band crosses the barrier); from the saddle
    check (:func:`verify_saddles`; ``None``: not checked, ``saddle_check`` says why)
    ``imaginary_modes`` at the climbing image, ``reaction_mode_cm1`` the signed frequency (cm⁻¹,
    imaginary negative) of the mode along ``tangent`` and ``tangent_overlap`` how well it aligns."""

    images: List
    energies: np.ndarray
    converged: bool
    steps: int
    fmax: float
    climbing_image: int
    endpoints_converged: bool = True
    imaginary_modes: Optional[int] = None
    saddle_check: str = "not checked"
    tangent: Optional[np.ndarray] = None
    reaction_mode_cm1: Optional[float] = None
    tangent_overlap: Optional[float] = None

    @property
    def saddle_verified(self) -> bool:
        """The climbing image was checked: exactly one imaginary mode, and it runs along the band."""
        return (self.imaginary_modes == 1 and self.reaction_mode_cm1 is not None and self.reaction_mode_cm1 < 0
                and self.tangent_overlap >= TANGENT_OVERLAP)

    @property
    def barrier(self) -> float:
        """Forward barrier: highest image minus the initial state, eV."""
        return float(self.energies.max() - self.energies[0])

    @property
    def reaction_energy(self) -> float:
        """Final minus initial state, eV."""
        return float(self.energies[-1] - self.energies[0])


def _band_result(state: NEBState, b: int, templates, ends, end_energy, fmax_b: float, converged: bool,
                 endpoints_converged: bool) -> NEBResult:
    """The result of band ``b`` of the batch (host copies)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    alone = state.layout.band == b
    interior = md.to_atoms(state.images.select(alone), templates[1:-1])
    first, last = templates[0].copy(), templates[-1].copy()  # last: the final state unwrapped
    for a, ref, e in zip((first, last), ends, end_energy):
        a.calc = SinglePointCalculator(a, energy=float(e), free_energy=float(e), forces=ref.get_forces())
    images = [first] + interior + [last]
    energies = np.array([a.get_potential_energy() for a in images])
    climbing = int(state.climbing[b]) + 1
    for j, a in enumerate(images):
        a.info.update(neb_image=j, climbing=(j == climbing and state.climb))
    tau = tangents(state)[0][state.images.system == b * state.layout.n_interior + climbing - 1]
    return NEBResult(images=images, energies=energies, converged=converged and endpoints_converged,
                     steps=state.step, fmax=fmax_b, climbing_image=climbing,
                     endpoints_converged=endpoints_converged, tangent=tau.cpu().numpy())


def saddle_modes(vib, tangent: np.ndarray, soft_cm1: float = SOFT_MODE_CM1) -> Tuple[int, float, float, str]:
    """Is the structure of ``vib`` (an ``ase.vibrations.VibrationsData``) a first-order saddle
    crossed along ``tangent`` ``(n_atoms, 3)``? The reaction mode is the harmonic mode whose
    mass-weighted eigenvector has the largest overlap ``|e · M^½τ| / |M^½τ|`` with the tangent
    (over the atoms the Hessian covers); it counts as imaginary when it is, beyond the zero floor
    :data:`~eqcalc.workflows.vibrations.RIGID_BODY_CM1`, and overlaps at least
    :data:`TANGENT_OVERLAP`; other imaginary modes count beyond ``soft_cm1`` (:data:`SOFT_MODE_CM1`).

    Returns ``(imaginary_modes, reaction_mode_cm1, overlap, text)``: the count (a first-order
    saddle has one, the reaction mode), the reaction mode's signed frequency (cm⁻¹, imaginary
    negative), its overlap and a sentence for ``saddle_check``."""
    from eqcalc.workflows.vibrations import RIGID_BODY_CM1, summary

    nu = summary(vib).frequencies_cm1
    idx = vib.get_indices()
    sqrt_m = np.sqrt(vib.get_atoms().get_masses()[idx])
    _, modes = vib.get_energies_and_modes()                  # Cartesian: eigenvector / sqrt(m)
    e = (modes * sqrt_m[None, :, None]).reshape(len(nu), -1)  # unit mass-weighted eigenvectors
    q = (tangent[idx] * sqrt_m[:, None]).reshape(-1)
    overlaps = np.abs(e @ q) / max(np.linalg.norm(q), 1e-300)
    r = int(np.argmax(overlaps))
    along = nu[r] < -RIGID_BODY_CM1 and overlaps[r] >= TANGENT_OVERLAP
    others = np.sort(np.delete(nu, r))
    others = others[others < -soft_cm1]
    n = int(along) + len(others)
    imaginary = np.sort(nu[nu < 0])
    listed = ", ".join(f"{-f:.0f}i" for f in imaginary[:4]) + (" ..." if len(imaginary) > 4 else "")
    mode = f"{-nu[r]:.0f}i" if nu[r] < 0 else f"{nu[r]:.0f}"
    text = (f"{n} imaginary mode{'' if n == 1 else 's'}: along the band tangent {mode} cm-1 (overlap "
            f"{overlaps[r]:.2f}), {len(others)} other{'' if len(others) == 1 else 's'} above {soft_cm1:g}i "
            f"(all imaginary: {listed or 'none'})")
    if along and n == 1:
        return n, float(nu[r]), float(overlaps[r]), text + ": first-order saddle"
    why = ("no imaginary mode along the band" if not along else "more than one imaginary mode")
    return n, float(nu[r]), float(overlaps[r]), (
        text + f": NOT a first-order saddle ({why}); tighten fmax, add images, or check the end points")


def verify_saddles(results: Sequence[NEBResult], potential, soft_cm1: float = SOFT_MODE_CM1) -> None:
    """The harmonic modes of each converged band's climbing image (autograd Hessian of the atoms
    FixAtoms leaves free, :func:`eqcalc.vibrations.vibrations`, all in one batch), judged by
    :func:`saddle_modes` against the band's tangent into ``results[k].imaginary_modes``,
    ``reaction_mode_cm1``, ``tangent_overlap`` and ``saddle_check`` (a first-order saddle: one
    imaginary mode, along the band; :attr:`NEBResult.saddle_verified`). Where that cannot be
    done (no climbing image, band not converged, a potential without an eqcalc model, a model
    without smooth second derivatives) ``imaginary_modes`` stays ``None`` and ``saddle_check``
    says why."""
    from eqcalc.errors import PropertyNotAvailableError
    from eqcalc.workflows.vibrations import vibrations

    todo = []
    for r in results:
        if not r.converged:
            r.saddle_check = "not checked: band not converged"
        elif not r.images[r.climbing_image].info.get("climbing"):
            r.saddle_check = "not checked: no climbing image"
        else:
            todo.append(r)
    model = getattr(potential, "model", None)
    if not todo:
        return
    if model is None:
        for r in todo:
            r.saddle_check = "not checked: the potential has no eqcalc model for a Hessian"
        return
    t = time.perf_counter()
    try:
        vibs = vibrations([r.images[r.climbing_image] for r in todo], model)
    except PropertyNotAvailableError as e:
        log.warning("saddle check skipped: %s", e)
        for r in todo:
            r.saddle_check = "not checked: the model has no smooth second derivatives"
        return
    for r, v in zip(todo, vibs):
        r.imaginary_modes, r.reaction_mode_cm1, r.tangent_overlap, r.saddle_check = saddle_modes(v, r.tangent, soft_cm1)
    log.info("saddle check of %d climbing images (Hessian of the free atoms) in %.1f s: %s", len(todo),
             time.perf_counter() - t, ", ".join(str(r.imaginary_modes) for r in todo))


def neb(reactions: Sequence, potential, n_images: int = 7, climb: bool = True, fmax: float = 0.03,
        interpolation: str = "idpp", k: Union[float, Sequence[float]] = 0.1, optimizer="fire",
        max_steps: int = 1000, relax_endpoints: bool = True, check_saddles: bool = True,
        output_dir=None, names: Optional[Sequence[str]] = None, progress: bool = False) -> List[NEBResult]:
    """Minimum energy paths of ``reactions`` (``(initial, final)`` ASE Atoms pairs), all bands as one batch.

    ``potential``: a :class:`~eqcalc.md.ModelPotential`, a model name or ``.eqm`` path (or any
    engine potential); ``n_images`` counts the end points (>= 3); ``k`` spring constant(s),
    eV/Å² (one, or one per reaction); ``fmax`` eV/Å for the bands and, unless
    ``relax_endpoints=False``, for the end points (relaxed first, as one batch with
    :func:`eqcalc.relax.relax`); ``optimizer`` ``"fire"`` | ``"lbfgs"``; ``interpolation``
    ``"idpp"`` | ``"linear"``; ``check_saddles``: count the imaginary modes of each converged
    climbing image (:func:`verify_saddles`). With ``output_dir``, each band is written as it
    leaves the batch (``NAME.extxyz`` and ``NAME.png``, ``names`` default ``reaction0``, ...) and
    ``barriers.csv`` at the end (:mod:`eqcalc.drivers`). Returns one :class:`NEBResult` per
    reaction, in order; a band that did not reach ``fmax`` within ``max_steps`` has
    ``converged=False``.
    """
    from eqcalc import outputs
    from eqcalc.engine import drivers

    start = time.perf_counter()
    pairs, names, k_bands = _checked_inputs(reactions, n_images, fmax, interpolation, max_steps, k, names)
    optimizer = make_optimizer(optimizer)
    potential = _as_potential(potential)
    lock = outputs.FolderLock(outputs.writable_dir(output_dir)).acquire() if output_dir is not None else None
    try:
        ends, ends_ok, end_energy = _endpoints(pairs, potential, fmax, max_steps, relax_endpoints)
        t = time.perf_counter()
        bands = []
        for r in range(len(pairs)):
            _check_distinct(r, ends[2 * r], ends[2 * r + 1], relaxed=relax_endpoints)
            bands.append(interpolate(ends[2 * r], ends[2 * r + 1], n_images, interpolation))
        _check_overlaps(bands)
        log.info("%s interpolation of %d bands x %d images in %.1f s", interpolation, len(bands), n_images,
                 time.perf_counter() - t)
        results = _run_bands(bands, ends, ends_ok, end_energy, k_bands, climb, optimizer, fmax, max_steps,
                             potential, names, output_dir, progress)
        if check_saddles:
            verify_saddles(results, potential)
        if output_dir is not None:
            drivers.write_barriers(results, names, output_dir)
    finally:
        if lock is not None:
            lock.release()
    log.info("NEB of %d reactions (%d images, %d atoms in the first batch) in %.1f s: %d converged",
             len(results), n_images, sum(len(b[0]) for b in bands) * (n_images - 2),
             time.perf_counter() - start, sum(r.converged for r in results))
    return results


def _checked_inputs(reactions, n_images, fmax, interpolation, max_steps, k, names):
    """``(pairs, names, k per band)`` from :func:`neb`'s arguments, or a typed error naming the fix."""
    from eqcalc.atoms import to_ase
    from eqcalc.errors import check_choice

    check_fmax(fmax)
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    if not (isinstance(n_images, int) and n_images >= 3):
        raise InvalidOptionError(f"n_images={n_images!r} must be an integer >= 3 (the two end points "
                                 "count); 5-9 is usual")
    if not (isinstance(max_steps, int) and max_steps >= 0):
        raise InvalidOptionError(f"max_steps={max_steps!r} must be an integer >= 0")
    pairs = []
    for r, pair in enumerate(reactions):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidOptionError(f"reaction {r} is {type(pair).__name__}; give (initial, final) pairs of Atoms")
        pairs.append(tuple(to_ase(a).copy() for a in pair))
    if not pairs:
        raise InvalidOptionError("no reactions given; pass a list of (initial, final) pairs")
    names = list(names) if names is not None else [f"reaction{r}" for r in range(len(pairs))]
    if len(names) != len(pairs) or len(set(names)) != len(names):
        raise InvalidOptionError(f"names={names!r} must be {len(pairs)} distinct names, one per reaction")
    k_bands = md._per_system("k", k, len(pairs), "cpu")
    for r, (a, b) in enumerate(pairs):
        _check_reaction(r, a, b)
        _check_distinct(r, a, b, relaxed=False)
    return pairs, names, k_bands


def _endpoints(pairs, potential, fmax, max_steps, relax_endpoints):
    """End points ``[initial0, final0, initial1, ...]`` with energies and forces (relaxed as one
    batch unless ``relax_endpoints`` is False), whether each converged, energies ``(n_bands, 2)``."""
    ends = [a for pair in pairs for a in pair]
    if relax_endpoints:
        res = relax(ends, potential, fmax=fmax, max_steps=max_steps)
        ends, ok = res.structures, res.converged
        log.info("relaxed %d end points as one batch in %.1f s (%d steps at most%s)", len(ends), res.seconds,
                 max(res.steps), "" if all(ok) else f"; NOT converged: {ok.count(False)}")
    else:
        device = getattr(getattr(potential, "model", None), "device", "cpu")
        state = md.evaluate(md.state_from_atoms(ends, device, getattr(potential, "species", None)), potential)
        ends, ok = md.to_atoms(state, ends), [True] * len(ends)
    return ends, ok, np.array([a.get_potential_energy() for a in ends]).reshape(-1, 2)


def _run_bands(bands, ends_flat, ends_ok, end_energy, k_bands, climb, optimizer, fmax, max_steps, potential,
               names, output_dir, progress) -> List[NEBResult]:
    """The loop of :func:`neb`: step the batch, hand out each band as it converges."""
    from tqdm.auto import tqdm

    from eqcalc.engine import drivers

    device = getattr(getattr(potential, "model", None), "device", "cpu")
    state = evaluate(init(bands, end_energy, k_bands, climb, optimizer, device, getattr(potential, "species", None)),
                     potential)
    ids = list(range(len(bands)))       # input index of each band still in the batch
    finished = {}
    with tqdm(total=max_steps, disable=not progress, unit="step", desc="neb") as bar:
        while True:
            f_host = state.fmax.tolist()     # the step's one host sync
            done = [f <= fmax or state.step >= max_steps for f in f_host]
            for b in (b for b, d in enumerate(done) if d):
                r = ids[b]
                finished[r] = _band_result(state, b, bands[r], ends_flat[2 * r:2 * r + 2], end_energy[r],
                                           f_host[b], f_host[b] <= fmax, ends_ok[2 * r] and ends_ok[2 * r + 1])
                log.info("%s: %s after %d steps, barrier %.3f eV, fmax %.3f eV/Å", names[r],
                         "converged" if f_host[b] <= fmax else "NOT converged", state.step,
                         finished[r].barrier, f_host[b])
                if output_dir is not None:
                    drivers.write_band(finished[r], names[r], output_dir)
            if all(done):
                break
            if any(done):
                keep = torch.tensor([not d for d in done], device=state.ends.device)
                state = state.select(keep)
                ids = [i for i, d in zip(ids, done) if not d]
            bar.set_postfix(bands=len(ids), fmax=f"{max(f for f, d in zip(f_host, done) if not d):.3f}")
            bar.update(1)
            state = step(state, potential)
    return [finished[r] for r in range(len(bands))]
