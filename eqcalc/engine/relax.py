"""Batched relaxation (FIRE, L-BFGS): many systems, one model call per step, convergence per system.

The FIRE update is ASE's (``ase.optimize.FIRE``, same defaults: ``dt 0.1``, ``maxstep 0.2 Å``,
``dtmax 1.0``, ``Nmin 5``, ``finc 1.1``, ``fdec 0.5``, ``astart 0.1``, ``fa 0.99``) with every
scalar (time step, mixing, step counter, step-length cap) held per system, so each system
follows the same path it would alone. :class:`LBFGS` is ASE's ``LBFGS`` (no line search) done
the same way, with per-system dot products in the two-loop recursion. A system stops moving
once its largest force on a free atom is at most ``fmax``; the batch stops when all have or
after ``max_steps``.

FixAtoms: fixed atoms get zero force and never move. Cell filter (``cell=True``): fully periodic
systems also relax their cell with ASE's ``UnitCellFilter`` parametrisation: generalised
coordinates are the positions in the reference cell frame ``x = r F^-T`` and ``cell_factor · F``
(deformation gradient ``F``, ``cell = cell_0 F^T``), generalised forces ``f F`` and the virial
``-V σ / cell_factor`` with ``cell_factor = n_atoms`` (ASE's default), so ``fmax`` also bounds
``V |σ| / n_atoms``. Slabs and molecules in the same batch keep their cell.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from eqcalc.engine import md
from eqcalc.errors import InvalidOptionError


class _Segments:
    """Per-system sums and maxima over the rows of the generalised coordinates."""

    def __init__(self, row_system: torch.Tensor, n_systems: int):
        self.row, self.n = row_system, n_systems

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        """``(n_rows, 3)`` → ``(n_systems,)`` sum over the system's rows and components."""
        return torch.zeros(self.n, dtype=v.dtype, device=v.device).index_add(0, self.row, v.sum(1))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.sum(a * b)

    def max_norm(self, v: torch.Tensor) -> torch.Tensor:
        """Largest row norm per system ``(n_systems,)``."""
        return torch.zeros(self.n, dtype=v.dtype, device=v.device).scatter_reduce(
            0, self.row, v.norm(dim=1), "amax", include_self=True)

    def atoms(self, per_system: torch.Tensor) -> torch.Tensor:
        """``(n_systems,)`` → ``(n_rows, 1)`` for broadcasting over rows."""
        return per_system[self.row].unsqueeze(1)


@dataclass(frozen=True)
class FIRE:
    """FIRE (ASE's algorithm, names and defaults; ``dt`` in ASE time units, ``maxstep`` in Å).
    The step length cap applies to the norm of the whole system's step, as in ASE."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99

    def init(self, x: torch.Tensor, n_systems: int) -> dict:
        f64 = dict(dtype=torch.float64, device=x.device)
        return {"vel": None, "dt": torch.full((n_systems,), self.dt, **f64),
                "a": torch.full((n_systems,), self.astart, **f64),
                "n_up": torch.zeros(n_systems, dtype=torch.int64, device=x.device)}

    def step(self, g: torch.Tensor, x: torch.Tensor, st: dict, seg: _Segments) -> torch.Tensor:
        """Displacement ``(n_rows, 3)`` from generalised forces ``g``; updates ``st``."""
        vel, dt, a, n_up = st["vel"], st["dt"], st["a"], st["n_up"]
        if vel is None:
            vel = torch.zeros_like(g)
        else:
            up = seg.dot(g, vel) > 0
            mixed = (1 - seg.atoms(a)) * vel + seg.atoms(a) * g / seg.atoms(
                seg.dot(g, g).clamp(min=1e-300).sqrt()) * seg.atoms(seg.dot(vel, vel).sqrt())
            vel = torch.where(seg.atoms(up), mixed, torch.zeros_like(vel))
            grow = up & (n_up > self.n_min)
            dt = torch.where(grow, (dt * self.finc).clamp(max=self.dtmax), torch.where(up, dt, dt * self.fdec))
            a = torch.where(grow, a * self.fa, torch.where(up, a, torch.full_like(a, self.astart)))
            n_up = torch.where(up, n_up + 1, torch.zeros_like(n_up))
        vel = vel + seg.atoms(dt) * g
        dr = seg.atoms(dt) * vel
        norm = seg.sum(dr * dr).sqrt()
        dr = dr * seg.atoms(torch.where(norm > self.maxstep, self.maxstep / norm.clamp(min=1e-300),
                                        torch.ones_like(norm)))
        st.update(vel=vel, dt=dt, a=a, n_up=n_up)
        return dr


@dataclass(frozen=True)
class LBFGS:
    """L-BFGS as ASE's ``LBFGS`` (no line search): two-loop recursion over the last ``memory``
    steps with ``H0 = 1 / alpha``, the step scaled so no row moves more than ``maxstep`` Å,
    times ``damping``. All dot products are per system."""

    maxstep: float = 0.2
    memory: int = 100
    damping: float = 1.0
    alpha: float = 70.0

    def init(self, x: torch.Tensor, n_systems: int) -> dict:
        return {"s": [], "y": [], "rho": [], "x0": None, "g0": None}

    def step(self, g: torch.Tensor, x: torch.Tensor, st: dict, seg: _Segments) -> torch.Tensor:
        if st["x0"] is not None:
            s_k, y_k = x - st["x0"], st["g0"] - g  # y = change of the gradient (-forces)
            ys = seg.dot(y_k, s_k)
            # systems that did not move (converged, frozen) add no curvature information
            st["rho"].append(torch.where(ys != 0, 1.0 / torch.where(ys != 0, ys, torch.ones_like(ys)),
                                         torch.zeros_like(ys)))
            st["s"].append(s_k)
            st["y"].append(y_k)
            if len(st["s"]) > self.memory:
                for k in ("s", "y", "rho"):
                    st[k].pop(0)
        q = -g
        alphas = []
        for s_i, y_i, rho_i in zip(reversed(st["s"]), reversed(st["y"]), reversed(st["rho"])):
            a_i = rho_i * seg.dot(s_i, q)
            q = q - seg.atoms(a_i) * y_i
            alphas.append(a_i)
        z = q / self.alpha
        for s_i, y_i, rho_i, a_i in zip(st["s"], st["y"], st["rho"], reversed(alphas)):
            b = rho_i * seg.dot(y_i, z)
            z = z + s_i * seg.atoms(a_i - b)
        dr = -z
        longest = seg.max_norm(dr)
        dr = dr * seg.atoms(torch.where(longest >= self.maxstep, self.maxstep / longest.clamp(min=1e-300),
                                        torch.ones_like(longest))) * self.damping
        st["x0"], st["g0"] = x, g.clone()
        return dr


OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS}


@dataclass
class RelaxResult:
    """Relaxed ``structures`` (ASE Atoms with a single-point calculator: energy, forces, stress
    for bulk), per system ``energy`` (eV), ``fmax`` (eV/Å, generalised with the cell filter),
    ``converged`` and ``steps`` (FIRE steps taken), and the wall time."""

    structures: List
    energy: np.ndarray
    fmax: np.ndarray
    converged: List[bool]
    steps: List[int]
    seconds: float


def _bmm_rows(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Row vectors ``x`` ``(n, 3)`` times matrices ``mats`` ``(n, 3, 3)``."""
    return torch.bmm(x.unsqueeze(1), mats).squeeze(1)


def relax(structures: Sequence, potential, fmax: float = 0.05, max_steps: int = 500, cell: bool = False,
          optimizer="fire") -> RelaxResult:
    """Relax ``structures`` (ASE Atoms or pymatgen Structures) as one batch with ``potential``
    (a :class:`~eqcalc.md.ModelPotential`). A system with non-finite energy, forces or stress, or
    a force above :data:`eqcalc.md.MAX_FORCE`, raises
    :class:`~eqcalc.errors.UnstableSimulationError` naming it and the step.

    ``optimizer``: ``"fire"`` | ``"lbfgs"`` or a :class:`FIRE` / :class:`LBFGS` with own parameters.
    """
    if isinstance(optimizer, str):
        from eqcalc.errors import check_choice

        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        optimizer = OPTIMIZERS[optimizer]()
    if not (isinstance(fmax, (int, float)) and np.isfinite(fmax) and fmax > 0):
        raise InvalidOptionError(f"fmax={fmax!r} must be a finite number > 0 (eV/Å), e.g. 0.05")
    if not (isinstance(max_steps, int) and max_steps >= 0):
        raise InvalidOptionError(f"max_steps={max_steps!r} must be an integer >= 0")
    start = time.perf_counter()
    device = getattr(getattr(potential, "model", None), "device", "cpu")
    from eqcalc.atoms import to_ase

    structures = [to_ase(s).copy() for s in structures]
    state = md.state_from_atoms(structures, device, getattr(potential, "species", None))
    S, n = state.n_systems, len(state.system)
    f64 = dict(dtype=torch.float64, device=state.device)
    counts = torch.bincount(state.system, minlength=S).to(torch.float64)
    cell_free = state.pbc.all(1) & torch.tensor(bool(cell), device=state.device)          # (S,)
    cell0 = state.cell.clone()
    row_system = torch.cat([state.system, torch.arange(S, device=state.device).repeat_interleave(3)])
    row_free = torch.cat([~state.fixed, cell_free.repeat_interleave(3)]).unsqueeze(1).to(torch.float64)
    eye = torch.eye(3, **f64).expand(S, 3, 3)
    x = torch.cat([state.positions, (counts.view(S, 1, 1) * eye).reshape(3 * S, 3)])  # generalised coordinates

    def unpack(x):
        deform = x[n:].view(S, 3, 3) / counts.view(S, 1, 1)                            # F, rows as stored
        positions = _bmm_rows(x[:n], deform.transpose(1, 2)[state.system])
        return positions, torch.bmm(cell0, deform.transpose(1, 2)), deform

    def generalised_forces(state, deform):
        f_atoms = _bmm_rows(state.forces, deform[state.system])
        volume = torch.linalg.det(state.cell).abs()
        virial = -volume.view(S, 1, 1) * state.stress / counts.view(S, 1, 1)
        return torch.cat([f_atoms, virial.reshape(3 * S, 3)]) * row_free

    seg = _Segments(row_system, S)
    opt_state = optimizer.init(x, S)
    steps = torch.zeros(S, dtype=torch.int64, device=state.device)
    for iteration in itertools.count():
        positions, cell_now, deform = unpack(x)
        state = md.evaluate(state.replace(positions=positions, cell=cell_now, step=iteration), potential)
        md.check_physical(state, max_temperature_K=None)  # never a NaN fmax reported as a result
        g = generalised_forces(state, deform)
        f_sys = seg.max_norm(g)
        active = f_sys > fmax
        if not bool(active.any()) or int(steps.max()) >= max_steps:
            break
        dr = optimizer.step(g, x, opt_state, seg)
        # converged systems no longer move; torch.where (not dr * mask) so that a frozen
        # system's step can never leak a non-finite value into its coordinates
        x = torch.where(seg.atoms(active), x + dr, x)
        steps = steps + active.to(torch.int64)
    fmax_sys = f_sys.cpu().numpy()
    relaxed = md.to_atoms(state, structures)
    return RelaxResult(structures=relaxed, energy=state.energy.cpu().numpy(), fmax=fmax_sys,
                       converged=(fmax_sys <= fmax).tolist(), steps=steps.tolist(),
                       seconds=time.perf_counter() - start)
