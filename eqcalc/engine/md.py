"""Batched molecular dynamics on the device: one state, pure ``init``/``step`` integrators.

Many systems of different sizes and periodicities (bulk, slab, molecule) move together: one
model call per step evaluates the whole batch and one neighbor list (with skin reuse) serves it.
Nothing leaves the device between steps except the per-step finiteness check.

Units are eqcalc's (:mod:`eqcalc.keys`): Å, eV, amu, ASE time units; momenta in
amu·Å/(ASE time). Arguments that take other units say so (``timestep_fs``, ``temperature_K``,
``friction_per_fs``, ``tau_fs``).

Integrators (frozen dataclasses; ``init(state, potential)`` then ``step(state, potential, rng)``
returning a new :class:`MDState`, the old one untouched):

* :class:`NVE` velocity Verlet (the same update as ``ase.md.verlet.VelocityVerlet``);
* :class:`Langevin` BAOAB (Leimkuhler & Matthews 2013), per-system friction and temperature;
* :class:`NoseHooverChain` (Martyna, Klein & Tuckerman 1992), one chain per system, Trotter
  half-steps around velocity Verlet;
* :class:`Bussi` stochastic velocity rescaling (Bussi, Donadio & Parrinello 2007, eq. A7).

FixAtoms: fixed atoms carry no momenta and feel no force (their positions never change) and
count no degrees of freedom.

Degrees of freedom of system ``s`` (the rule behind every temperature here)::

    dof_s = 3 * n_free_s - (3 if the integrator conserves total momentum and s has no fixed atom)

NVE, Nosé–Hoover chain and Bussi conserve total momentum (initial velocities are drawn with zero
centre-of-mass momentum for such systems), so those 3 degrees of freedom never thermalise and are
not counted; Langevin noise and fixed atoms (which push on the rest) break the conservation, so
nothing is removed there. Rotations of isolated molecules are not removed. ASE instead always
counts ``3 n - n_fixed * 3`` (no centre-of-mass removal).

Randomness comes only from the ``torch.Generator`` passed to ``step`` (never the global RNG), so
a run is reproducible from its seed and restartable from the generator's saved state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Sequence, Union

import numpy as np
import torch
from ase import units
from torch import Tensor

from eqcalc import keys
from eqcalc.errors import InvalidAtomsError, InvalidOptionError, UnstableSimulationError

__all__ = ["MDState", "ModelPotential", "NVE", "Langevin", "NoseHooverChain", "Bussi",
           "THERMOSTATS", "make_integrator", "state_from_atoms", "maxwell_boltzmann",
           "kinetic_energy", "temperature", "degrees_of_freedom", "to_atoms"]

PerSystem = Union[float, Sequence[float]]

#: The per-system check after every step (:func:`check_physical`) stops a run whose temperature
#: or largest force passes these. No sane simulation reaches them: hot MLIP MD runs stay below
#: ~5000 K and forces in a thermalised solid or liquid below ~20 eV/Å (a relaxation may start
#: near 100 eV/Å); an exploding run passes both within a few steps (issue 13: 3.1e6 K at step 5).
MAX_TEMPERATURE_K = 1e5
MAX_FORCE = 1e3  # eV/Å


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------
@dataclass
class MDState:
    """A batch of systems in motion (float64 throughout; see :mod:`eqcalc.keys`).

    ``positions`` ``(n_atoms, 3)`` Å; ``momenta`` ``(n_atoms, 3)`` amu·Å/ASE-time; ``masses``
    ``(n_atoms,)`` amu; ``numbers`` ``(n_atoms,)``; ``cell`` ``(n_systems, 3, 3)`` Å;
    ``pbc`` ``(n_systems, 3)``; ``system`` ``(n_atoms,)``; ``fixed`` ``(n_atoms,)`` bool (FixAtoms);
    ``energy`` ``(n_systems,)`` eV, ``forces`` ``(n_atoms, 3)`` eV/Å (zero on fixed atoms) and
    ``stress`` ``(n_systems, 3, 3)`` eV/Å³ at ``positions``; ``dof`` ``(n_systems,)`` degrees of
    freedom (module docstring); ``thermostat`` the integrator's own per-system variables.
    """

    positions: Tensor
    momenta: Tensor
    masses: Tensor
    numbers: Tensor
    cell: Tensor
    pbc: Tensor
    system: Tensor
    fixed: Tensor
    energy: Optional[Tensor] = None
    forces: Optional[Tensor] = None
    stress: Optional[Tensor] = None
    dof: Optional[Tensor] = None
    step: int = 0
    thermostat: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_systems(self) -> int:
        return self.cell.shape[0]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def replace(self, **changes) -> "MDState":
        """A copy with ``changes`` (tensors shared, not copied). Cheaper than
        ``dataclasses.replace`` (no ``__init__`` round trip): integrators call it every step."""
        if not changes.keys() <= self.__dict__.keys():
            raise TypeError(f"MDState has no field(s) {sorted(set(changes) - set(self.__dict__))}")
        new = object.__new__(type(self))
        new.__dict__ = {**self.__dict__, **changes}
        return new

    @property
    def constants(self) -> "_Constants":
        """What the integrators derive from ``masses`` and ``fixed`` (built once, then shared by
        every state :meth:`replace` makes from this one, and rebuilt when either tensor changes)."""
        c = self.__dict__.get("_constants")
        if c is None or c.masses is not self.masses or c.fixed is not self.fixed:
            c = self.__dict__["_constants"] = _Constants(self.masses, self.fixed)
        return c

    def select(self, keep: Tensor) -> "MDState":
        """The systems where ``keep`` ``(n_systems,)`` bool is True, renumbered in order (how
        converged systems leave a batch). Thermostat variables are not carried: a state with
        some raises :class:`InvalidOptionError`."""
        if self.thermostat:
            raise InvalidOptionError("select() drops systems of a state without thermostat variables only; "
                                     "select before the integrator's init")
        atoms = keep[self.system]
        system = torch.cumsum(keep.to(torch.int64), 0)[self.system[atoms]] - 1
        per_atom = {k: getattr(self, k)[atoms] for k in ("positions", "momenta", "masses", "numbers", "fixed")}
        per_system = {k: getattr(self, k)[keep] for k in ("cell", "pbc", "energy", "stress", "dof")
                      if getattr(self, k) is not None}
        forces = None if self.forces is None else self.forces[atoms]
        return self.replace(system=system, forces=forces, **per_atom, **per_system)


class _Constants:
    """Per-atom constants of a batch, derived once instead of every step: ``mass_column``
    ``(n_atoms, 1)`` amu; ``free`` ``(n_atoms, 1)`` bool, ``None`` when no atom is fixed (then
    forces need no masking); ``screens`` the weights of :func:`_within_limits` by field set."""

    def __init__(self, masses: Tensor, fixed: Tensor):
        self.masses, self.fixed = masses, fixed
        self.mass_column = masses.unsqueeze(1)
        self.free = (~fixed).unsqueeze(1) if bool(fixed.any()) else None
        self.screens: Dict[tuple, Tensor] = {}


def _segment_sum(values: Tensor, system: Tensor, n_systems: int) -> Tensor:
    """Sum ``values`` ``(n_atoms, ...)`` per system → ``(n_systems, ...)``."""
    out = torch.zeros((n_systems,) + values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add(0, system, values)


def kinetic_energy(state: MDState) -> Tensor:
    """Kinetic energy per system ``(n_systems,)``, eV."""
    per_atom = 0.5 * (state.momenta ** 2).sum(1) / state.masses
    return _segment_sum(per_atom, state.system, state.n_systems)


def degrees_of_freedom(state: MDState, conserves_momentum: bool) -> Tensor:
    """``dof`` ``(n_systems,)`` float64 by the rule of the module docstring."""
    free = _segment_sum((~state.fixed).to(torch.float64), state.system, state.n_systems)
    n_fixed = _segment_sum(state.fixed.to(torch.float64), state.system, state.n_systems)
    com = (n_fixed == 0).to(torch.float64) * 3.0 if conserves_momentum else 0.0
    dof = 3.0 * free - com
    return dof.clamp(min=1.0)  # a single free atom with conserved momentum: avoid 0 / 0


def temperature(state: MDState) -> Tensor:
    """Instantaneous temperature per system ``(n_systems,)``, K: ``2 K / (dof kB)``."""
    return 2.0 * kinetic_energy(state) / (state.dof * units.kB)


def _per_system(name: str, value: PerSystem, n_systems: int, device, positive=True) -> Tensor:
    """A scalar or one value per system → ``(n_systems,)`` float64, checked finite and > 0."""
    t = torch.as_tensor(np.asarray(value, dtype=np.float64), device=device)
    if t.dim() == 0:
        t = t.expand(n_systems)
    if t.shape != (n_systems,):
        raise InvalidOptionError(
            f"{name} has {t.numel()} values but the batch holds {n_systems} systems; give one value "
            "or one per system")
    if not bool(torch.isfinite(t).all()) or (positive and bool((t <= 0).any())):
        raise InvalidOptionError(f"{name}={np.asarray(value).tolist()} must be finite and > 0")
    return t.clone()


# ----------------------------------------------------------------------------------------------
# building a state from ASE Atoms, and back
# ----------------------------------------------------------------------------------------------
def fixed_mask(atoms) -> np.ndarray:
    """``(n_atoms,)`` bool from the Atoms' FixAtoms constraints; other constraints are an error."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if not isinstance(c, FixAtoms):
            raise InvalidOptionError(
                f"constraint {type(c).__name__} is not supported by the eqcalc engine (only FixAtoms); "
                "remove it or run ASE's own dynamics with EquivariantCalculator")
        mask[c.index] = True
    return mask


def state_from_atoms(structures, device="cpu", species=None) -> MDState:
    """Stack ASE ``Atoms`` (validated; momenta and FixAtoms read from them) into an :class:`MDState`."""
    from eqcalc.atoms import to_ase, to_tensors, validate

    structures = [to_ase(s) for s in structures]
    if not structures:
        raise InvalidOptionError("no structures given; pass at least one Atoms")
    for s in structures:
        validate(s, species)
    t = to_tensors(structures, device)
    f64 = dict(dtype=torch.float64, device=device)
    fixed = torch.as_tensor(np.concatenate([fixed_mask(s) for s in structures]), device=device)
    momenta = np.concatenate([s.get_momenta() for s in structures])
    masses = np.concatenate([s.get_masses() for s in structures])
    bad = np.where(~np.isfinite(momenta).all(1))[0]
    if len(bad):
        raise InvalidAtomsError(
            f"momenta of atoms {bad[:10].tolist()} (counted over all inputs) are NaN or inf; set finite "
            "momenta (atoms.set_momenta) or none, and let temperature_K draw them")
    bad = np.where(~(np.isfinite(masses) & (masses > 0)))[0]
    if len(bad):
        raise InvalidAtomsError(
            f"atoms {bad[:10].tolist()} (counted over all inputs) have masses {masses[bad[:10]].tolist()} amu; "
            "every atom needs a finite mass > 0 (atoms.set_masses(), or leave ASE's defaults)")
    momenta = torch.as_tensor(momenta, **f64) * (~fixed).unsqueeze(1)
    masses = torch.as_tensor(masses, **f64)
    return MDState(positions=t.positions, momenta=momenta, masses=masses, numbers=t.numbers,
                   cell=t.cell, pbc=t.pbc, system=t.system, fixed=fixed)


def to_atoms(state: MDState, templates) -> list:
    """One ASE ``Atoms`` per system (copies of ``templates`` with constraints and info), holding
    the state's positions, momenta and a single-point calculator with energy, forces (and stress
    where periodic)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    counts = torch.bincount(state.system, minlength=state.n_systems).tolist()
    pos = state.positions.cpu().numpy()
    mom = state.momenta.cpu().numpy()
    frc = state.forces.cpu().numpy() if state.forces is not None else None
    out, start = [], 0
    for s, (template, n) in enumerate(zip(templates, counts)):
        a = template.copy()
        a.info.pop("adsorbate_info", None)  # ase.build's helper dict: extxyz cannot store it
        a.set_cell(state.cell[s].cpu().numpy())
        a.positions = pos[start:start + n]  # plain assignment: constraints must not move them
        a.set_momenta(mom[start:start + n], apply_constraint=False)
        results = {}
        if state.energy is not None:
            results["energy"] = float(state.energy[s])
            results["free_energy"] = results["energy"]
        if frc is not None:
            results["forces"] = frc[start:start + n]
        if state.stress is not None and a.pbc.all():
            from eqcalc.calculator import full_to_voigt

            results["stress"] = full_to_voigt(state.stress[s].cpu().numpy())
        a.calc = SinglePointCalculator(a, **results)
        out.append(a)
        start += n
    return out


def maxwell_boltzmann(state: MDState, temperature_K: PerSystem, generator: torch.Generator,
                      conserves_momentum: bool = True) -> MDState:
    """Momenta drawn from the Maxwell–Boltzmann distribution at ``temperature_K`` (per system);
    fixed atoms get none; with ``conserves_momentum`` systems without fixed atoms get zero total
    momentum (matching the dof rule)."""
    T = _per_system("temperature_K", temperature_K, state.n_systems, state.device)
    kT = (T * units.kB)[state.system]
    noise = torch.randn(state.positions.shape, generator=generator, dtype=torch.float64,
                        device=state.device)
    p = noise * torch.sqrt(state.masses * kT).unsqueeze(1) * (~state.fixed).unsqueeze(1)
    if conserves_momentum:
        n_fixed = _segment_sum(state.fixed.to(torch.float64), state.system, state.n_systems)
        total_p = _segment_sum(p, state.system, state.n_systems)
        total_m = _segment_sum(state.masses, state.system, state.n_systems)
        velocity = (total_p / total_m.unsqueeze(1)) * (n_fixed == 0).unsqueeze(1)
        p = p - state.masses.unsqueeze(1) * velocity[state.system]
    return state.replace(momenta=p)


# ----------------------------------------------------------------------------------------------
# the potential: model + neighbor list for the whole batch
# ----------------------------------------------------------------------------------------------
class ModelPotential:
    """Energy, forces and stress of an :class:`MDState` batch from an eqcalc model.

    One :class:`~eqcalc.neighbors.NeighborList` (``cutoff + skin``, rebuilt only when an atom
    moved more than ``skin / 2``) serves the whole batch. ``model`` is a loaded
    :class:`~eqcalc.model.Model` or a name/path loaded with ``device``, ``compile``, ``dtype``.
    Any object with ``__call__(state) -> {"energy", "forces", "stress"}`` and ``reset()`` can
    stand in for it (the tests use cheap analytic potentials).
    """

    def __init__(self, model="default", device="cpu", compile="eager", dtype=None, skin: float = 0.5):
        from eqcalc.model import Model
        from eqcalc.neighbors import NeighborList

        self.model = model if isinstance(model, Model) else Model(model, device=device, compile=compile,
                                                                  dtype=dtype)
        self.neighbors = NeighborList(self.model.cutoff, skin=skin)
        self.species = self.model.species

    def reset(self) -> None:
        """Forget the neighbor list (the next call rebuilds it)."""
        self.neighbors.reset()

    def __call__(self, state: MDState) -> Dict[str, Tensor]:
        from eqcalc.atoms import SystemTensors

        t = SystemTensors(positions=state.positions, numbers=state.numbers, cell=state.cell,
                          pbc=state.pbc, system=state.system)
        edge_index, shifts = self.neighbors.update(t.positions, t.cell, t.pbc, t.system, t.numbers)
        # The model checks overlaps and hands only pairs within the cutoff to the network.
        out = self.model(t, edge_index, shifts)
        return {"energy": out[keys.ENERGY].to(torch.float64),
                "forces": out[keys.FORCES].to(torch.float64),
                "stress": out[keys.STRESS].to(torch.float64)}


def evaluate(state: MDState, potential, check: bool = True) -> MDState:
    """``state`` with energy, forces (zeroed on fixed atoms) and stress at its positions.

    The state is checked finite first, so no NaN reaches the model (``check=False``: the caller
    knows it is, as the integrators do: :func:`check_physical` passed at the end of their last
    step, and the positions since moved by finite momenta)."""
    if check:
        check_physical(state, max_temperature_K=None, max_force=math.inf)
    out = potential(state)
    free = state.constants.free
    forces = out["forces"] if free is None else out["forces"].masked_fill(~free, 0.0)
    return state.replace(energy=out["energy"], forces=forces, stress=out.get("stress"))


# ----------------------------------------------------------------------------------------------
# integrators
# ----------------------------------------------------------------------------------------------
def _check_timestep(timestep_fs: float) -> None:
    if not (isinstance(timestep_fs, (int, float)) and math.isfinite(timestep_fs) and timestep_fs > 0):
        raise InvalidOptionError(f"timestep_fs={timestep_fs!r} must be a finite number > 0 (e.g. 1.0)")


def _drift(state: MDState, momenta: Tensor, dt: float) -> Tensor:
    return torch.addcdiv(state.positions, momenta, state.constants.mass_column, value=dt)


@dataclass(frozen=True)
class NVE:
    """Velocity Verlet at constant energy. ``timestep_fs`` in fs."""

    timestep_fs: float
    conserves_momentum: ClassVar[bool] = True

    def __post_init__(self):
        _check_timestep(self.timestep_fs)

    @property
    def dt(self) -> float:
        return self.timestep_fs * units.fs

    def init(self, state: MDState, potential) -> MDState:
        """Degrees of freedom, thermostat variables and forces (if not already there)."""
        state = state.replace(momenta=state.momenta * (~state.fixed).unsqueeze(1),
                              dof=degrees_of_freedom(state, self.conserves_momentum))
        if state.forces is None:
            state = evaluate(state, potential)
        check_physical(state)  # a start that is already unphysical (e.g. absurd momenta)
        return self._init_thermostat(state)  # keeps variables a restarted state already has

    def _init_thermostat(self, state: MDState) -> MDState:
        return state

    def verlet(self, state: MDState, potential, dt: float, check: bool = True) -> MDState:
        """Velocity Verlet; ``check=False`` when the state was checked at the end of the last step
        and nothing changed it since (plain NVE), so the positions it drifts to are finite."""
        p = torch.add(state.momenta, state.forces, alpha=0.5 * dt)
        state = evaluate(state.replace(positions=_drift(state, p, dt), momenta=p, step=state.step + 1),
                         potential, check=check)
        return state.replace(momenta=p.add_(state.forces, alpha=0.5 * dt))  # p: this step's own tensor

    def step(self, state: MDState, potential, generator: Optional[torch.Generator] = None) -> MDState:
        return _checked(self.verlet(state, potential, self.dt, check=False))


def _checked(state: MDState) -> MDState:
    check_physical(state, positions=False)  # finite before the step, moved by momenta checked here
    return state


def check_physical(state: MDState, max_temperature_K: Optional[float] = MAX_TEMPERATURE_K,
                   max_force: float = MAX_FORCE, positions: bool = True) -> None:
    """Raise :class:`~eqcalc.errors.UnstableSimulationError` naming the first system (and the
    step) whose positions, momenta, forces, energy or stress are non-finite, whose temperature
    exceeds ``max_temperature_K`` (``None``: not checked, e.g. in a relaxation) or whose largest
    force exceeds ``max_force`` eV/Å. A screen of four small kernels and one host sync decides
    (:func:`_within_limits`); the per-system diagnosis runs only when it does not pass.
    ``positions=False`` leaves positions out of the screen where they are known finite (finite
    before a step that moved them by finite momenta)."""
    if _within_limits(state, max_temperature_K, max_force, positions):
        return
    S, system = state.n_systems, state.system
    per_atom = torch.isfinite(state.positions).all(1) & torch.isfinite(state.momenta).all(1)
    force = torch.zeros(S, dtype=torch.float64, device=state.device)
    if state.forces is not None:
        norms = state.forces.norm(dim=1)
        per_atom = per_atom & torch.isfinite(norms)
        force = force.scatter_reduce(0, system, torch.nan_to_num(norms, nan=math.inf), "amax")
    finite = _segment_sum((~per_atom).to(torch.float64), system, S) == 0
    if state.energy is not None:
        finite = finite & torch.isfinite(state.energy)
    if state.stress is not None:
        finite = finite & torch.isfinite(state.stress).flatten(1).all(1)
    hot = torch.zeros(S, dtype=torch.bool, device=state.device)
    T = None
    if max_temperature_K is not None and state.dof is not None:
        T = temperature(state)
        hot = ~(T <= max_temperature_K)
    bad = ~finite | hot | ~(force <= max_force)
    if not bool(bad.any()):
        return
    s = int(torch.nonzero(bad)[0])
    if not bool(finite[s]):
        what = "positions, momenta, forces or energy became NaN or inf"
    elif bool(hot[s]):
        what = f"the temperature reached {float(T[s]):.3g} K (> {max_temperature_K:.0e} K)"
    else:
        what = f"a force reached {float(force[s]):.3g} eV/Å (> {max_force:.0e} eV/Å)"
    raise UnstableSimulationError(
        f"system {s} left physics at step {state.step}: {what}. The time step is probably too large "
        "for it (1-2 fs for metals, 0.5 fs with hydrogen), atoms came too close, or the structure is "
        "far outside the model's training data", system=s, step=state.step)


_SCREENED = ("positions", "momenta", "forces", "energy", "stress")


def _within_limits(state: MDState, max_temperature_K: Optional[float], max_force: float,
                   positions: bool = True) -> bool:
    """A sufficient condition for :func:`check_physical` to pass, in four kernels and one sync:
    every ``|x w|`` over (positions,) momenta, forces, energy and stress is below 1, with
    weights ``w``: 0 for what must only be finite (``0 * inf`` and NaN propagate to the maximum),
    ``sqrt(3) / max_force`` on force components (so every force is below ``max_force``), and
    ``sqrt(3 / (m_i kB max_temperature_K))`` on the momentum components of atom ``i`` (so
    ``p_i² / m_i < kB max_temperature_K`` for every atom, and a system's temperature
    ``sum p_i² / m_i / (dof kB)`` stays below the limit since its moving atoms never outnumber its
    degrees of freedom; fixed atoms carry no momentum). The weights are built once per masses
    tensor and field set (:attr:`MDState.constants`)."""
    d = state.__dict__
    fields = tuple(n for n in _SCREENED if d[n] is not None and (positions or n != "positions"))
    x = torch.cat([d[n].reshape(-1) for n in fields])  # a fresh tensor: scaled in place below
    key = (fields, max_temperature_K if state.dof is not None else None, max_force)
    screens = state.constants.screens
    weights = screens.get(key)
    if weights is None or weights.shape != x.shape:
        def weight(name, t):
            if name == "momenta" and key[1] is not None:
                return (3.0 / (state.masses * units.kB * max_temperature_K)).sqrt().unsqueeze(1).expand(-1, 3)
            if name == "forces":
                return torch.full_like(t, math.sqrt(3.0) / max_force, dtype=torch.float64)
            return torch.zeros_like(t, dtype=torch.float64)

        weights = screens[key] = torch.cat([weight(n, d[n]).reshape(-1) for n in fields])
    return x.mul_(weights).abs_().max().item() < 1.0


class _Thermostat(NVE):
    def targets(self, state: MDState) -> Tensor:
        """Target ``kB T`` per system ``(n_systems,)``, eV."""
        return _per_system("temperature_K", self.temperature_K, state.n_systems, state.device) * units.kB


@dataclass(frozen=True)
class Langevin(_Thermostat):
    """Langevin BAOAB. ``temperature_K`` and ``friction_per_fs`` (1/fs): one value or one per system.

    B: ``p += dt/2 F``; A: ``r += dt/2 p/m``; O: ``p = c p + sqrt((1 - c²) m kT) ξ`` with
    ``c = exp(-γ dt)``; A; new forces; B. Sampled configurations are exact to O(dt²) and the
    kinetic energy is canonical for any friction.
    """

    timestep_fs: float
    temperature_K: PerSystem = 300.0
    friction_per_fs: PerSystem = 0.01
    conserves_momentum: ClassVar[bool] = False

    def __post_init__(self):
        _check_timestep(self.timestep_fs)
        _per_system("temperature_K", self.temperature_K, np.size(self.temperature_K), "cpu")
        _per_system("friction_per_fs", self.friction_per_fs, np.size(self.friction_per_fs), "cpu")

    def step(self, state: MDState, potential, generator: Optional[torch.Generator] = None) -> MDState:
        if generator is None:
            raise InvalidOptionError("Langevin.step needs a torch.Generator (seeded) for its noise")
        dt = self.dt
        gamma = _per_system("friction_per_fs", self.friction_per_fs, state.n_systems, state.device) / units.fs
        c = torch.exp(-gamma * dt)[state.system].unsqueeze(1)
        kT = self.targets(state)[state.system].unsqueeze(1)
        free = (~state.fixed).unsqueeze(1)
        m = state.masses.unsqueeze(1)
        p = state.momenta + 0.5 * dt * state.forces                                   # B
        r = state.positions + 0.5 * dt * p / m                                        # A
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        p = (c * p + torch.sqrt((1.0 - c * c) * m * kT) * noise) * free               # O
        r = r + 0.5 * dt * p / m                                                      # A
        state = evaluate(state.replace(positions=r, momenta=p, step=state.step + 1), potential, check=False)
        return _checked(state.replace(momenta=state.momenta + 0.5 * dt * state.forces))  # B


@dataclass(frozen=True)
class Bussi(_Thermostat):
    """Stochastic velocity rescaling (canonical), then a velocity Verlet step, as ASE's ``Bussi``.

    ``tau_fs``: coupling time (fs). The rescale factor follows eq. (A7) of Bussi et al. with the
    sum of ``dof - 1`` squared normals drawn explicitly (no global RNG; ``torch`` has no seeded
    gamma sampler).
    """

    timestep_fs: float
    temperature_K: PerSystem = 300.0
    tau_fs: PerSystem = 100.0
    conserves_momentum: ClassVar[bool] = True

    def __post_init__(self):
        _check_timestep(self.timestep_fs)
        _per_system("temperature_K", self.temperature_K, np.size(self.temperature_K), "cpu")
        _per_system("tau_fs", self.tau_fs, np.size(self.tau_fs), "cpu")

    def _init_thermostat(self, state: MDState) -> MDState:
        # Which (atom, component) slots feed the chi-square sum of dof - 1 normals per system.
        first = torch.zeros(state.n_systems, dtype=torch.int64, device=state.device)
        counts = torch.bincount(state.system, minlength=state.n_systems)
        first[1:] = torch.cumsum(counts, 0)[:-1]
        rank = (torch.arange(len(state.system), device=state.device) - first[state.system]).unsqueeze(1) * 3
        rank = rank + torch.arange(3, device=state.device)
        slots = (rank < (state.dof - 1).to(torch.int64)[state.system].unsqueeze(1)).to(torch.float64)
        energy = state.thermostat.get("energy")
        if energy is None:
            energy = torch.zeros(state.n_systems, dtype=torch.float64, device=state.device)
        return state.replace(thermostat={"slots": slots, "energy": energy})

    def step(self, state: MDState, potential, generator: Optional[torch.Generator] = None) -> MDState:
        if generator is None:
            raise InvalidOptionError("Bussi.step needs a torch.Generator (seeded) for its noise")
        tau = _per_system("tau_fs", self.tau_fs, state.n_systems, state.device) * units.fs
        c = torch.exp(-self.dt / tau)
        kinetic = kinetic_energy(state)
        target = 0.5 * state.dof * self.targets(state)
        factor = (1.0 - c) * target / kinetic.clamp(min=1e-300) / state.dof
        noise = torch.randn(len(state.system) * 3 + state.n_systems, generator=generator,
                            dtype=torch.float64, device=state.device)
        r1 = noise[:state.n_systems]
        chi2 = _segment_sum((noise[state.n_systems:].view(-1, 3) ** 2 * state.thermostat["slots"]).sum(1),
                            state.system, state.n_systems)
        alpha2 = c + factor * (chi2 + r1 * r1) + 2.0 * r1 * torch.sqrt(c * factor)
        alpha = torch.where(kinetic > 0, torch.sqrt(alpha2.clamp(min=0.0)), torch.ones_like(alpha2))
        thermostat = dict(state.thermostat, energy=state.thermostat["energy"] + (alpha2 - 1.0) * kinetic)
        state = state.replace(momenta=state.momenta * alpha[state.system].unsqueeze(1), thermostat=thermostat)
        return _checked(self.verlet(state, potential, self.dt))


@dataclass(frozen=True)
class NoseHooverChain(_Thermostat):
    """Nosé–Hoover chain of ``chain`` thermostats per system, ``tau_fs`` its period (fs).

    Masses ``Q_0 = dof kT τ²``, ``Q_k = kT τ²``; the chain is propagated for ``dt/2`` before and
    after a velocity Verlet step (Martyna, Tuckerman, Tobias & Klein 1996, one Trotter slice).
    :func:`conserved_energy` gives the quantity it conserves.
    """

    timestep_fs: float
    temperature_K: PerSystem = 300.0
    tau_fs: PerSystem = 100.0
    chain: int = 3
    conserves_momentum: ClassVar[bool] = True

    def __post_init__(self):
        _check_timestep(self.timestep_fs)
        _per_system("temperature_K", self.temperature_K, np.size(self.temperature_K), "cpu")
        _per_system("tau_fs", self.tau_fs, np.size(self.tau_fs), "cpu")
        if not (isinstance(self.chain, int) and self.chain >= 1):
            raise InvalidOptionError(f"chain={self.chain!r} must be an integer >= 1 (3 is usual)")

    def _masses(self, state: MDState) -> Tensor:
        kT = self.targets(state)
        tau = _per_system("tau_fs", self.tau_fs, state.n_systems, state.device) * units.fs
        q = (kT * tau * tau).unsqueeze(1).repeat(1, self.chain)
        q[:, 0] = q[:, 0] * state.dof
        return q

    def _init_thermostat(self, state: MDState) -> MDState:
        if "eta" in state.thermostat:
            return state
        zeros = torch.zeros(state.n_systems, self.chain, dtype=torch.float64, device=state.device)
        return state.replace(thermostat={"eta": zeros, "p_eta": zeros.clone()})

    def _half_chain(self, state: MDState, h: float) -> MDState:
        kT = self.targets(state)
        q = self._masses(state)
        p = state.thermostat["p_eta"].clone()
        eta = state.thermostat["eta"].clone()
        kinetic2 = 2.0 * kinetic_energy(state)
        M = self.chain

        def force(k):
            return kinetic2 - state.dof * kT if k == 0 else p[:, k - 1] ** 2 / q[:, k - 1] - kT

        for k in reversed(range(M)):  # top of the chain down, h/2
            if k < M - 1:
                p[:, k] = p[:, k] * torch.exp(-0.25 * h * p[:, k + 1] / q[:, k + 1])
            p[:, k] = p[:, k] + 0.5 * h * force(k)
            if k < M - 1:
                p[:, k] = p[:, k] * torch.exp(-0.25 * h * p[:, k + 1] / q[:, k + 1])
        scale = torch.exp(-h * p[:, 0] / q[:, 0])
        kinetic2 = kinetic2 * scale * scale
        eta = eta + h * p / q
        for k in range(M):  # bottom up, h/2
            if k < M - 1:
                p[:, k] = p[:, k] * torch.exp(-0.25 * h * p[:, k + 1] / q[:, k + 1])
            p[:, k] = p[:, k] + 0.5 * h * force(k)
            if k < M - 1:
                p[:, k] = p[:, k] * torch.exp(-0.25 * h * p[:, k + 1] / q[:, k + 1])
        momenta = state.momenta * scale[state.system].unsqueeze(1)
        return state.replace(momenta=momenta, thermostat={"eta": eta, "p_eta": p})

    def step(self, state: MDState, potential, generator: Optional[torch.Generator] = None) -> MDState:
        state = self._half_chain(state, 0.5 * self.dt)
        state = self.verlet(state, potential, self.dt)
        return _checked(self._half_chain(state, 0.5 * self.dt))


def conserved_energy(state: MDState, integrator) -> Tensor:
    """Total energy plus the integrator's thermostat energy ``(n_systems,)``, eV: constant (up to
    integration error) for NVE, Nosé–Hoover chain and Bussi (energy it exchanged subtracted)."""
    total = state.energy + kinetic_energy(state)
    if isinstance(integrator, NoseHooverChain):
        kT = integrator.targets(state)
        q = integrator._masses(state)
        th = state.thermostat
        total = total + (th["p_eta"] ** 2 / (2 * q)).sum(1) + state.dof * kT * th["eta"][:, 0] \
            + kT * th["eta"][:, 1:].sum(1)
    elif isinstance(integrator, Bussi):
        total = total - state.thermostat["energy"]
    return total


THERMOSTATS = ("langevin", "bussi", "nose-hoover")


def make_integrator(ensemble: str, timestep_fs: float, thermostat: str = "langevin",
                    temperature_K: PerSystem = 300.0, friction_per_fs: PerSystem = 0.01,
                    tau_fs: PerSystem = 100.0):
    """``ensemble`` ``"nve" | "nvt"``; for NVT ``thermostat`` one of :data:`THERMOSTATS`."""
    from eqcalc.errors import check_choice

    check_choice("ensemble", ensemble, ("nve", "nvt"))
    if ensemble == "nve":
        return NVE(timestep_fs)
    check_choice("thermostat", thermostat, THERMOSTATS)
    if thermostat == "langevin":
        return Langevin(timestep_fs, temperature_K, friction_per_fs)
    if thermostat == "bussi":
        return Bussi(timestep_fs, temperature_K, tau_fs)
    return NoseHooverChain(timestep_fs, temperature_K, tau_fs)
