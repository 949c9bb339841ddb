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

import time
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from eqcalc.engine import md
from eqcalc.errors import InvalidOptionError


class Segments:
    """Sums and maxima per group over the rows of a ``(n_rows, 3)`` tensor; a group is a system
    (relaxation) or all interior images of one band (NEB). ``row_system`` ``(n_rows,)`` names
    each row's group."""

    def __init__(self, row_system: torch.Tensor, n_systems: int):
        self.row, self.n = row_system, n_systems

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        """``(n_rows, 3)`` → ``(n_systems,)`` sum over the system's rows and components."""
        return torch.zeros(self.n, dtype=v.dtype, device=v.device).index_add(0, self.row, v.sum(1))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.sum(a * b)

    def dots(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Several dot products at once: ``a``, ``b`` ``(k, n_rows, 3)`` → ``(n_systems, k)``."""
        rows = (a * b).sum(2).T
        return torch.zeros((self.n, rows.shape[1]), dtype=rows.dtype, device=rows.device).index_add(0, self.row, rows)

    def max_norm(self, v: torch.Tensor) -> torch.Tensor:
        """Largest row norm per system ``(n_systems,)``."""
        return torch.zeros(self.n, dtype=v.dtype, device=v.device).scatter_reduce(
            0, self.row, v.norm(dim=1), "amax", include_self=True)

    def atoms(self, per_system: torch.Tensor) -> torch.Tensor:
        """``(n_systems,)`` → ``(n_rows, 1)`` (or ``(n_systems, k)`` → ``(n_rows, k)``) for
        broadcasting over rows."""
        out = per_system[self.row]
        return out.unsqueeze(1) if per_system.dim() == 1 else out


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

    def step(self, g: torch.Tensor, x: torch.Tensor, st: dict, seg: Segments) -> torch.Tensor:
        """Displacement ``(n_rows, 3)`` from generalised forces ``g``; updates ``st``."""
        vel, dt, a, n_up = st["vel"], st["dt"], st["a"], st["n_up"]
        if vel is None:
            vel = torch.zeros_like(g)
        else:
            gv, gg, vv = seg.dots(torch.stack([g, g, vel]), torch.stack([vel, g, vel])).unbind(1)
            up = gv > 0
            # where the power is positive v <- (1 - a) v + a |v| g / |g|, elsewhere v <- 0
            zero = torch.zeros_like(a)
            mix = seg.atoms(torch.stack([torch.where(up, 1 - a, zero),
                                         torch.where(up, a * vv.sqrt() / gg.clamp(min=1e-300).sqrt(), zero)], 1))
            vel = mix[:, :1] * vel + mix[:, 1:] * g
            grow = up & (n_up > self.n_min)
            dt = torch.where(grow, (dt * self.finc).clamp(max=self.dtmax), torch.where(up, dt, dt * self.fdec))
            a = torch.where(grow, a * self.fa, torch.where(up, a, torch.full_like(a, self.astart)))
            n_up = torch.where(up, n_up + 1, torch.zeros_like(n_up))
        dt_rows = seg.atoms(dt)
        vel = torch.addcmul(vel, dt_rows, g)
        dr = dt_rows * vel
        norm = seg.sum(dr * dr).sqrt()
        dr = dr * seg.atoms(torch.where(norm > self.maxstep, self.maxstep / norm.clamp(min=1e-300),
                                        torch.ones_like(norm)))
        st.update(vel=vel, dt=dt, a=a, n_up=n_up)
        return dr

    @staticmethod
    def select(st: dict, keep: torch.Tensor, rows: torch.Tensor) -> dict:
        """Optimizer state of the systems where ``keep`` ``(n_systems,)`` holds (``rows``: their rows)."""
        return {"vel": None if st["vel"] is None else st["vel"][rows],
                **{k: st[k][keep] for k in ("dt", "a", "n_up")}}


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

    def step(self, g: torch.Tensor, x: torch.Tensor, st: dict, seg: Segments) -> torch.Tensor:
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

    @staticmethod
    def select(st: dict, keep: torch.Tensor, rows: torch.Tensor) -> dict:
        """Optimizer state of the systems where ``keep`` ``(n_systems,)`` holds (``rows``: their rows)."""
        return {"s": [v[rows] for v in st["s"]], "y": [v[rows] for v in st["y"]],
                "rho": [v[keep] for v in st["rho"]],
                **{k: None if st[k] is None else st[k][rows] for k in ("x0", "g0")}}


OPTIMIZERS = {"fire": FIRE, "lbfgs": LBFGS}


def make_optimizer(optimizer):
    """``"fire"`` | ``"lbfgs"`` → the optimizer with ASE's defaults; an instance passes through."""
    if isinstance(optimizer, str):
        from eqcalc.errors import check_choice

        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        return OPTIMIZERS[optimizer]()
    if not isinstance(optimizer, tuple(OPTIMIZERS.values())):
        raise InvalidOptionError(f"optimizer={optimizer!r} must be 'fire', 'lbfgs' or a FIRE/LBFGS instance")
    return optimizer


def check_fmax(fmax) -> None:
    if not (isinstance(fmax, (int, float)) and np.isfinite(fmax) and fmax > 0):
        raise InvalidOptionError(f"fmax={fmax!r} must be a finite number > 0 (eV/Å), e.g. 0.05")


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


class _Coordinates:
    """How the optimizer sees the systems of a batch: generalised coordinates ``x`` and forces.

    Without a free cell ``x`` is the positions ``(n_atoms, 3)``. With the cell filter (module
    docstring) ``x`` is ``(n_atoms + 3 n_systems, 3)``: positions in the reference cell frame,
    then ``cell_factor · F`` (three rows per system, zero force where the cell stays).
    """

    def __init__(self, state: md.MDState, cell: bool, cell0: torch.Tensor = None):
        S = state.n_systems
        self.system, self.fixed, self.n_atoms = state.system, state.fixed, len(state.system)
        self.cell_filter = bool(cell)
        self.counts = torch.bincount(state.system, minlength=S).to(torch.float64).view(S, 1, 1)
        self.cell0 = state.cell.clone() if cell0 is None else cell0
        if self.cell_filter:
            cell_free = state.pbc.all(1)
            row_system = torch.cat([state.system, torch.arange(S, device=state.device).repeat_interleave(3)])
            free = torch.cat([~state.fixed, cell_free.repeat_interleave(3)])
        else:
            row_system, free = state.system, ~state.fixed
        self.row_free = free.unsqueeze(1).to(torch.float64)
        self.seg = Segments(row_system, S)

    def initial(self, state: md.MDState) -> torch.Tensor:
        if not self.cell_filter:
            return state.positions.clone()
        eye = torch.eye(3, dtype=torch.float64, device=state.device).expand(state.n_systems, 3, 3)
        return torch.cat([state.positions, (self.counts * eye).reshape(-1, 3)])

    def evaluate(self, state: md.MDState, x: torch.Tensor, potential):
        """``state`` at coordinates ``x`` with energy and forces, and the generalised forces."""
        if not self.cell_filter:
            state = md.evaluate(state.replace(positions=x), potential)
            return state, state.forces * self.row_free
        n, S = self.n_atoms, len(self.counts)
        deform = x[n:].view(S, 3, 3) / self.counts                                     # F, rows as stored
        positions = _bmm_rows(x[:n], deform.transpose(1, 2)[self.system])
        state = md.evaluate(state.replace(positions=positions,
                                          cell=torch.bmm(self.cell0, deform.transpose(1, 2))), potential)
        f_atoms = _bmm_rows(state.forces, deform[self.system])
        virial = -torch.linalg.det(state.cell).abs().view(S, 1, 1) * state.stress / self.counts
        return state, torch.cat([f_atoms, virial.reshape(3 * S, 3)]) * self.row_free

    def rows(self, keep: torch.Tensor) -> torch.Tensor:
        """``(n_rows,)`` bool: the rows of the systems where ``keep`` ``(n_systems,)`` holds."""
        atoms = keep[self.system]
        return torch.cat([atoms, keep.repeat_interleave(3)]) if self.cell_filter else atoms

    def select(self, state: md.MDState, keep: torch.Tensor) -> "_Coordinates":
        """The layout of ``state.select(keep)``."""
        return _Coordinates(state, self.cell_filter, self.cell0[keep])


def relax(structures: Sequence, potential, fmax: float = 0.05, max_steps: int = 500, cell: bool = False,
          optimizer="fire") -> RelaxResult:
    """Relax ``structures`` (ASE Atoms or pymatgen Structures) as one batch with ``potential``
    (a :class:`~eqcalc.md.ModelPotential`). A system with non-finite energy, forces or stress, or
    a force above :data:`eqcalc.md.MAX_FORCE`, raises
    :class:`~eqcalc.errors.UnstableSimulationError` naming it and the step.

    ``optimizer``: ``"fire"`` | ``"lbfgs"`` or a :class:`FIRE` / :class:`LBFGS` with own parameters.
    A system leaves the batch at the step it converges and is not evaluated again; every system
    follows the path it would follow alone.
    """
    optimizer = make_optimizer(optimizer)
    check_fmax(fmax)
    if not (isinstance(max_steps, int) and max_steps >= 0):
        raise InvalidOptionError(f"max_steps={max_steps!r} must be an integer >= 0")
    start = time.perf_counter()
    device = getattr(getattr(potential, "model", None), "device", "cpu")
    from eqcalc.atoms import to_ase

    structures = [to_ase(s).copy() for s in structures]
    state = md.state_from_atoms(structures, device, getattr(potential, "species", None))
    coords = _Coordinates(state, cell)
    x = coords.initial(state)
    opt_state = optimizer.init(x, state.n_systems)
    ids = list(range(state.n_systems))  # input index of each system still in the batch
    finished = {}                       # input index -> (final state of that system, fmax, steps)
    step = 0
    while True:
        state, g = coords.evaluate(state.replace(step=step), x, potential)
        md.check_physical(state, max_temperature_K=None)  # never a NaN fmax reported as a result
        f_sys = coords.seg.max_norm(g)
        leaving = f_sys <= fmax if step < max_steps else torch.ones_like(f_sys, dtype=torch.bool)
        if bool(leaving.any()):  # the step's one host sync while nothing leaves
            f_host = f_sys.tolist()
            for s in torch.nonzero(leaving).flatten().tolist():
                alone = torch.zeros_like(leaving)
                alone[s] = True
                finished[ids[s]] = (state.select(alone), f_host[s], step)
            keep = ~leaving
            if not bool(keep.any()):
                break
            rows = coords.rows(keep)
            x, g = x[rows], g[rows]
            opt_state = optimizer.select(opt_state, keep, rows)
            state = state.select(keep)
            coords = coords.select(state, keep)
            ids = [i for i, k in zip(ids, keep.tolist()) if k]
        x = x + optimizer.step(g, x, opt_state, coords.seg)
        step += 1
    done = [finished[k] for k in range(len(structures))]
    fmax_sys = np.array([f for _, f, _ in done])
    return RelaxResult(structures=[md.to_atoms(st, [a])[0] for (st, _, _), a in zip(done, structures)],
                       energy=np.array([float(st.energy[0]) for st, _, _ in done]), fmax=fmax_sys,
                       converged=(fmax_sys <= fmax).tolist(), steps=[n for _, _, n in done],
                       seconds=time.perf_counter() - start)
