"""Batched NEB (``eqcalc.neb``) against a loop of ASE NEB runs, barriers against EMT, and the
relaxation engine's leave-the-batch accounting and per-step overhead against torch-sim.

The reactions are those of ``tests/neb_cases.py``: O fcc→hcp on Pt(111), O hollow→hollow on
Cu(100), Au adatom hop on Al(100), a vacancy hop in bulk Cu and N fcc→hcp on Pd(111) across the
cell boundary (28-31 atoms each, slabs with the bottom layer fixed).

* ``--what speed``: 5 reactions x 7 images to fmax 0.03 eV/Å with the same model object and the
  same compiled form on both sides, ``--repeats`` runs each in the same process alternating which
  side goes first, everything included
  (end-point relaxation with FIRE to the same fmax, IDPP interpolation with the minimum image,
  climbing-image NEB with improved tangents and FIRE):

  - batched: ``eqcalc.neb.neb(pairs, ModelPotential(model))``: end points relaxed as one batch,
    then all 25 interior images in one model call per step, bands leaving when converged;
  - ASE loop: per reaction, ``ase.optimize.FIRE`` on each end point with its own
    ``EquivariantCalculator``, ``NEB(images, k=0.1, climb=True, method="improvedtangent")``
    with one calculator per image (each its own neighbor list with skin), ``interpolate("idpp",
    mic=True)`` and ``FIRE(neb).run``.

  → ``neb_speed.csv`` (per round: wall time, time in the network and in the model call, calls and
  atoms evaluated on both sides, the speed-up bound of an engine with no overhead, load; per
  reaction: steps and barrier on both sides) and ``neb_speed.png``.
* ``--what same-images``: the "same images, same model" check: end points relaxed once, then
  both sides start from identical IDPP bands (``relax_endpoints=False``); barrier differences.
  → ``neb_same_images.csv``.
* ``--what accuracy``: barriers of the five reactions with EMT (ASE's, through the engine) and
  with the model → ``neb_accuracy.csv`` and ``neb_accuracy.png`` (mean absolute error).
* ``--what saddles``: the saddle check (harmonic modes of each climbing image from the model's
  Hessian against the band's tangent) of the five reactions converged to ``--saddle-fmax`` →
  ``neb_saddles_MODEL_DTYPE.csv``.
* ``--what relax``: atom evaluations of ``eqcalc.relax`` with converged systems leaving the batch
  against what the former loop evaluated (every system until the last converged), on 16 slabs with
  the model; and the engine's per-step overhead against torch-sim 0.3.0 with zero-cost
  potentials, identical on both sides: NVE step functions in short interleaved blocks, the fastest
  block of each side (harmonic wells around the integer grid), and the relaxation drivers (``eqcalc.relax.relax`` vs ``torch_sim.optimize``
  with ASE-style FIRE, a constant push so nothing converges, per step = (T(2N) - T(N)) / N,
  median over interleaved rounds,
  torch-sim checking convergence every step like eqcalc, and every 5 steps, its default)
  → ``relax_engine.csv`` and ``.png``.

The machine is a shared 2-core CPU: load from other jobs slows both sides of a comparison alike
only when they run interleaved; the load average is recorded with each row.

    nice -n 5 .venv/bin/python benchmarks/bench_neb.py --what speed --repeats 4 --threads 1
    nice -n 5 .venv/bin/python benchmarks/bench_neb.py --what saddles --dtype float64 --threads 1
    .venv/bin/python benchmarks/bench_neb.py --what accuracy same-images relax
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_md import write_csv  # noqa: E402

from tests.md_potentials import EMTPotential  # noqa: E402
from tests.neb_cases import REACTIONS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
N_IMAGES, FMAX, K = 7, 0.03, 0.1


def load() -> float:
    return os.getloadavg()[0]


def ase_band(initial, final, model, interpolation="idpp", relax_ends=True, max_steps=1000):
    """One reaction the way a user runs it in ASE: (relax the ends), interpolate, climbing NEB, FIRE."""
    from ase.mep import NEB
    from ase.optimize import FIRE

    from eqcalc import EquivariantCalculator

    ends = []
    for a in (initial, final):
        a = a.copy()
        a.calc = EquivariantCalculator(model)
        if relax_ends:
            FIRE(a, logfile=None).run(fmax=FMAX, steps=max_steps)
        ends.append(a)
    images = [ends[0]] + [ends[0].copy() for _ in range(N_IMAGES - 2)] + [ends[1]]
    for im in images[1:-1]:
        im.calc = EquivariantCalculator(model)
    band = NEB(images, k=K, climb=True, method="improvedtangent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        band.interpolate(method=interpolation, mic=True)
    opt = FIRE(band, logfile=None)
    ok = opt.run(fmax=FMAX, steps=max_steps)
    e = np.array([im.get_potential_energy() for im in images])
    return dict(barrier=float(e.max() - e[0]), steps=opt.nsteps, converged=bool(ok))


class ModelClock:
    """Times what a side spends in the model: the network itself (``Model.runner``: message
    passing and the force backward pass) and the whole ``Model.__call__`` (plus the cutoff filter,
    overlap and finiteness checks), with the calls and atoms evaluated. Installed on one model
    object; :meth:`reset` before each side."""

    def __init__(self, model):
        from eqcalc.model import Model

        self.reset()
        runner, call = model.runner, Model.__call__

        def timed_runner(*a):
            t = time.perf_counter()
            out = runner(*a)
            self.network += time.perf_counter() - t
            return out

        def timed_call(m, t_, *a):
            if m is not model:
                return call(m, t_, *a)
            t = time.perf_counter()
            out = call(m, t_, *a)
            self.model += time.perf_counter() - t
            self.calls += 1
            self.atoms += len(t_.positions)
            return out

        model.runner = timed_runner
        Model.__call__ = timed_call

    def reset(self):
        self.network = self.model = 0.0
        self.calls = self.atoms = 0


def speed(model, args) -> list:
    """Both sides ``--repeats`` times, alternating which goes first (A B, B A, ...), in one process."""
    from eqcalc.engine import md
    from eqcalc.neb import neb

    pairs = [f() for f in REACTIONS.values()]
    neb([pairs[0]], md.ModelPotential(model), n_images=N_IMAGES, fmax=FMAX, max_steps=3, check_saddles=False)
    clock = ModelClock(model)

    def ours():
        return neb(pairs, md.ModelPotential(model), n_images=N_IMAGES, fmax=FMAX, k=K, climb=True,
                   check_saddles=False)  # the ASE loop does no Hessian either

    def theirs():
        return [ase_band(i, f, model) for i, f in pairs]

    rows, runs = [], []
    for rep in range(args.repeats):
        sides = [("eqcalc", ours), ("ase", theirs)]
        timing = {}
        for name, run in (sides if rep % 2 else sides[::-1]):
            clock.reset()
            load0 = load()
            t = time.perf_counter()
            result = run()
            timing[name] = dict(wall=time.perf_counter() - t, network=clock.network, model=clock.model,
                                calls=clock.calls, atoms=clock.atoms, load=0.5 * (load0 + load()), result=result)
        runs.append(timing)
        e, a = timing["eqcalc"], timing["ase"]
        print(f"round {rep}: eqcalc.neb {e['wall']:.1f} s ({100 * e['network'] / e['wall']:.1f} % in the network, "
              f"{e['calls']} calls, {e['atoms']} atoms), ASE loop {a['wall']:.1f} s ({100 * a['network'] / a['wall']:.1f} %, "
              f"{a['calls']} calls, {a['atoms']} atoms) -> {a['wall'] / e['wall']:.2f}x (load {e['load']:.1f}/{a['load']:.1f})")
    for rep, timing in enumerate(runs):
        e, a = timing["eqcalc"], timing["ase"]
        common = dict(round=rep, first="ase" if rep % 2 == 0 else "eqcalc", wall_eqcalc_s=e["wall"],
                      wall_ase_loop_s=a["wall"], speedup=a["wall"] / e["wall"],
                      network_eqcalc_s=e["network"], network_ase_s=a["network"],
                      model_call_eqcalc_s=e["model"], model_call_ase_s=a["model"],
                      network_fraction_eqcalc=e["network"] / e["wall"], network_fraction_ase=a["network"] / a["wall"],
                      model_calls_eqcalc=e["calls"], model_calls_ase=a["calls"],
                      atoms_evaluated_eqcalc=e["atoms"], atoms_evaluated_ase=a["atoms"],
                      network_ms_per_atom_eqcalc=1e3 * e["network"] / e["atoms"],
                      network_ms_per_atom_ase=1e3 * a["network"] / a["atoms"],
                      # even with nothing but the network on the eqcalc side:
                      speedup_bound_network_only=a["wall"] / e["network"],
                      threads=torch.get_num_threads(), compile=model.compile_kind, dtype=model.dtype,
                      load_eqcalc=e["load"], load_ase=a["load"])
        for name, ra, r in zip(REACTIONS, a["result"], e["result"]):
            rows.append(dict(reaction=name, n_atoms=len(r.images[0]), barrier_eqcalc_eV=r.barrier,
                             barrier_ase_eV=ra["barrier"], diff_meV=1e3 * (r.barrier - ra["barrier"]),
                             steps_eqcalc=r.steps, steps_ase=ra["steps"], converged_eqcalc=r.converged,
                             converged_ase=ra["converged"], **common))
            if rep == 0:
                print(f"{name:36s} barrier {r.barrier:.4f} vs ASE {ra['barrier']:.4f} eV, steps {r.steps} vs {ra['steps']}")
    return rows


def same_images(model, args) -> list:
    """Identical starting bands on both sides (end points relaxed once, here, by eqcalc)."""
    from eqcalc.engine import md
    from eqcalc.neb import neb
    from eqcalc.relax import relax

    pairs = [f() for f in REACTIONS.values()]
    ends = relax([a for p in pairs for a in p], md.ModelPotential(model), fmax=0.01).structures
    pairs = [(ends[2 * k], ends[2 * k + 1]) for k in range(len(pairs))]
    ours = neb(pairs, md.ModelPotential(model), n_images=N_IMAGES, fmax=FMAX, k=K, relax_endpoints=False,
               check_saddles=False)
    rows = []
    for name, (i, f), r in zip(REACTIONS, pairs, ours):
        a = ase_band(i, f, model, relax_ends=False)
        rows.append(dict(reaction=name, barrier_eqcalc_eV=r.barrier, barrier_ase_eV=a["barrier"],
                         diff_meV=1e3 * (r.barrier - a["barrier"]), steps_eqcalc=r.steps, steps_ase=a["steps"],
                         compile=args.compile, dtype=model.dtype))
        print(f"{name:36s} same images: barrier {r.barrier:.5f} vs ASE {a['barrier']:.5f} eV "
              f"({1e3 * (r.barrier - a['barrier']):+.2f} meV), steps {r.steps} vs {a['steps']}")
    return rows


def accuracy(model, args) -> list:
    from eqcalc.engine import md
    from eqcalc.neb import neb

    pairs = [f() for f in REACTIONS.values()]
    emt = neb(pairs, EMTPotential(), n_images=N_IMAGES, fmax=FMAX, k=K)
    ml = neb(pairs, md.ModelPotential(model), n_images=N_IMAGES, fmax=FMAX, k=K)
    rows = [dict(reaction=name, barrier_emt_eV=e.barrier, barrier_model_eV=m.barrier,
                 error_eV=m.barrier - e.barrier, reaction_energy_emt_eV=e.reaction_energy,
                 reaction_energy_model_eV=m.reaction_energy, converged=e.converged and m.converged,
                 model=args.model, dtype=model.dtype)
            for name, e, m in zip(REACTIONS, emt, ml)]
    for r in rows:
        print(f"{r['reaction']:36s} EMT {r['barrier_emt_eV']:.3f} eV, {args.model} {r['barrier_model_eV']:.3f} eV "
              f"({1e3 * r['error_eV']:+.0f} meV)")
    print(f"barrier MAE {np.mean([abs(r['error_eV']) for r in rows]):.3f} eV")
    return rows


def saddles(model, args) -> list:
    """The saddle check of each reaction's climbing image with the model's Hessian (the five bands
    in one batch, fmax ``--saddle-fmax``): the verdict, the mode along the band's tangent (its
    frequency and overlap), imaginary modes counted and the list."""
    from eqcalc.engine import md
    from eqcalc.neb import neb

    pairs = [f() for f in REACTIONS.values()]
    t = time.perf_counter()
    bands = neb(pairs, md.ModelPotential(model), n_images=N_IMAGES, fmax=args.saddle_fmax, k=K)
    seconds = time.perf_counter() - t
    rows = [dict(reaction=name, saddle_verified=r.saddle_verified, imaginary_modes=r.imaginary_modes,
                 reaction_mode_cm1=r.reaction_mode_cm1, tangent_overlap=r.tangent_overlap,
                 saddle_check=r.saddle_check, barrier_eV=r.barrier, converged=r.converged, fmax=args.saddle_fmax, model=args.model,
                 dtype=model.dtype, wall_s=seconds, load=load())
            for name, r in zip(REACTIONS, bands)]
    for r in rows:
        print(f"{r['reaction']:36s} {r['saddle_check']}")
    return rows


# ----------------------------------------------------------------------------------------------
# relax: leave-the-batch accounting and engine overhead against torch-sim
# ----------------------------------------------------------------------------------------------
def slabs(n: int, constrained: bool = True):
    """``n`` slabs of 37-40 atoms (fcc(111) 3x3x4 of six metals with O, CO or OH), rattled."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    metals = ["Cu", "Ni", "Pd", "Ag", "Pt", "Au"]
    ads = [("O", Atoms("O")), ("CO", Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]])),
           ("OH", Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]]))]
    out = []
    for k in range(n):
        s = fcc111(metals[k % 6], (3, 3, 4), vacuum=8.0)
        name, mol = ads[k % 3]
        add_adsorbate(s, mol, 1.9 if name != "O" else 1.3, "ontop" if name == "CO" else "fcc")
        s.info.pop("adsorbate_info", None)
        if constrained:
            s.set_constraint(FixAtoms(mask=np.arange(len(s)) < 18))
        s.rattle(0.05, seed=k)
        out.append(s)
    return out


class Counting:
    """Wraps an engine potential and counts the atoms it evaluates."""

    def __init__(self, potential):
        self.potential, self.atoms = potential, 0
        self.model, self.species = potential.model, potential.species

    def reset(self):
        self.potential.reset()

    def __call__(self, state):
        self.atoms += len(state.system)
        return self.potential(state)


def wells(positions):
    """Zero-cost forces for MD: harmonic wells around the integer grid, ``-0.5 (r - round(r))``."""
    return -0.5 * (positions - torch.round(positions))


def push(positions):
    """Zero-cost forces for relaxations that never converge: 0.01 eV/Å along x on every atom."""
    f = torch.zeros_like(positions)
    f[:, 0] = 0.01
    return f


class ZeroCost:
    """An engine potential from a force field ``forces(positions)`` (zero energy)."""

    def __init__(self, forces):
        self.forces = forces

    def reset(self):
        pass

    def __call__(self, state):
        return {"energy": torch.zeros(state.n_systems, dtype=torch.float64), "forces": self.forces(state.positions)}


def torch_sim_zero_cost(forces):
    """The same force field as a torch-sim model."""
    from torch_sim.models.interface import ModelInterface

    class TSZeroCost(ModelInterface):
        def __init__(self):
            super().__init__()
            self._device, self._dtype = torch.device("cpu"), torch.float64
            self._compute_stress, self._compute_forces = False, True

        def forward(self, state, **kwargs):
            return {"energy": torch.zeros(state.n_systems, dtype=torch.float64), "forces": forces(state.positions)}

    return TSZeroCost()


def relax_rows(model, args) -> list:
    from eqcalc.engine import md
    from eqcalc.relax import relax

    rows = []
    structures = slabs(16)
    pot = Counting(md.ModelPotential(model))
    res = relax(structures, pot, fmax=0.05, max_steps=500)
    n = np.array([len(s) for s in structures])
    steps = np.array(res.steps)
    before = int(n.sum() * (steps.max() + 1))       # the former loop: everyone until the last converged
    rows.append(dict(check="relax atom evaluations", systems=16, atoms=int(n.sum()), after=pot.atoms,
                     before=before, ratio=before / pot.atoms, expected_after=int((n * (steps + 1)).sum()),
                     steps_min=int(steps.min()), steps_max=int(steps.max()), all_converged=all(res.converged)))
    print(f"relax 16 slabs: {pot.atoms} atom evaluations with leave-the-batch, {before} before "
          f"({before / pot.atoms:.2f}x); steps {steps.min()}-{steps.max()}")
    rows += overhead(args)
    return rows


def overhead(args) -> list:
    """Per-step time with the zero-cost potential: eqcalc vs torch-sim, paired blocks."""
    import torch_sim as ts
    from ase import units

    from eqcalc.engine import md
    from eqcalc.relax import relax

    rows = []
    for n_sys in args.overhead_systems:
        structures = slabs(n_sys, constrained=False)  # torch-sim 0.3 has no FixAtoms
        # --- NVE step functions
        integ, ours_md = md.NVE(1.0), ZeroCost(wells)
        st = integ.init(md.state_from_atoms(structures), ours_md)
        ts_state = ts.initialize_state(structures, torch.device("cpu"), torch.float64)
        init_fn, update_fn = ts.nve(torch_sim_zero_cost(wells), dt=torch.tensor(1.0 * units.fs, dtype=torch.float64),
                                    kT=torch.tensor(0.0, dtype=torch.float64))
        ts_st = init_fn(ts_state)
        ts_st.momenta = torch.zeros_like(ts_st.positions)
        t_e, t_t = [], []
        for _ in range(args.blocks):  # short interleaved blocks; the fastest block of each side
            t = time.perf_counter()
            for _ in range(args.block_steps):
                st = integ.step(st, ours_md)
            t_e.append((time.perf_counter() - t) / args.block_steps)
            t = time.perf_counter()
            for _ in range(args.block_steps):
                ts_st = update_fn(ts_st)
            t_t.append((time.perf_counter() - t) / args.block_steps)
        rows.append(dict(check="NVE step overhead", systems=n_sys, atoms=len(st.system),
                         eqcalc_us_per_step=1e6 * min(t_e), torch_sim_us_per_step=1e6 * min(t_t),
                         ratio=min(t_e) / min(t_t), median_block_ratio=float(np.median(np.divide(t_e, t_t))),
                         load=load()))
        # --- relaxation drivers, never converging; per step from two lengths
        N, ours_relax, theirs_relax = args.relax_steps, ZeroCost(push), torch_sim_zero_cost(push)

        def ours(steps):
            t = time.perf_counter()
            relax(structures, ours_relax, fmax=0.001, max_steps=steps)
            return time.perf_counter() - t

        def theirs(steps, swaps):
            conv = ts.generate_force_convergence_fn(force_tol=0.001, include_cell_forces=False)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts.optimize(structures, theirs_relax, optimizer=ts.optimizers.fire, convergence_fn=conv,
                            max_steps=steps, steps_between_swaps=swaps)
            return time.perf_counter() - t

        for swaps in (1, 5):  # eqcalc checks convergence every step; torch-sim's default is every 5
            ours(5), theirs(5, swaps)
            per_e, per_t = [], []
            for _ in range(args.rounds):  # interleaved rounds; the median per-step estimate of each side
                per_e.append((-ours(N) + ours(2 * N)) / N)
                per_t.append((-theirs(N, swaps) + theirs(2 * N, swaps)) / N)
            per_e, per_t = float(np.median(per_e)), float(np.median(per_t))
            rows.append(dict(check=f"relax driver per-step overhead (FIRE; torch-sim checks every {swaps})",
                             systems=n_sys, atoms=len(st.system), eqcalc_us_per_step=1e6 * per_e,
                             torch_sim_us_per_step=1e6 * per_t, ratio=per_e / per_t, load=load()))
        for r in rows[-3:]:
            print(f"{r['check']:40s} {n_sys:3d} systems: eqcalc {r['eqcalc_us_per_step']:.0f} us, torch-sim "
                  f"{r['torch_sim_us_per_step']:.0f} us per step ({r['ratio']:.2f}x)")
    return rows


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speed(rows, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.0))
    rounds = [next(r for r in rows if r["round"] == k) for k in sorted({r["round"] for r in rows})]
    x = np.arange(len(rounds))
    for side, dx, color in (("ase", -0.2, "C1"), ("eqcalc", 0.2, "C0")):
        wall = np.array([r["wall_ase_loop_s" if side == "ase" else "wall_eqcalc_s"] for r in rounds])
        net = np.array([r[f"network_{side}_s"] for r in rounds])
        label = "ASE NEB loop" if side == "ase" else "eqcalc.neb (batched)"
        ax[0].bar(x + dx, net, 0.4, color=color, label=f"{label}: in the network")
        ax[0].bar(x + dx, wall - net, 0.4, bottom=net, color=color, alpha=0.35, label=f"{label}: everything else")
    for k, r in enumerate(rounds):
        ax[0].text(k, r["wall_ase_loop_s"], f"{r['speedup']:.2f}x\n(bound {r['speedup_bound_network_only']:.2f}x)\n"
                   f"load {r['load_eqcalc']:.1f}", ha="center", va="bottom", fontsize=7)
    ax[0].set_xticks(x, [f"round {r['round']}\n({r['first']} first)" for r in rounds], fontsize=7)
    ax[0].set_ylabel("wall time (s)")
    ax[0].set_ylim(0, 1.6 * max(r["wall_ase_loop_s"] for r in rounds))
    r0 = rounds[0]
    ax[0].set_title(f"5 reactions x {N_IMAGES} images to fmax {FMAX} eV/Å; network "
                    f"{r0['network_ms_per_atom_eqcalc']:.2f} vs {r0['network_ms_per_atom_ase']:.2f} ms/atom\n"
                    f"({r0['compile']}, {r0['dtype']}, {r0['threads']} thread(s), CPU)", fontsize=8)
    ax[0].legend(fontsize=6, loc="upper center", ncol=2)
    first = [r for r in rows if r["round"] == 0]
    x = np.arange(len(first))
    ax[1].bar(x - 0.2, [r["steps_ase"] for r in first], 0.4, label="ASE NEB", color="C1")
    ax[1].bar(x + 0.2, [r["steps_eqcalc"] for r in first], 0.4, label="eqcalc.neb", color="C0")
    ax[1].set_xticks(x, [r["reaction"].replace(" ", "\n", 1) for r in first], fontsize=6)
    ax[1].set_ylabel("FIRE steps to convergence")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy(rows, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    e = [r["barrier_emt_eV"] for r in rows]
    m = [r["barrier_model_eV"] for r in rows]
    ax.scatter(e, m)
    for r in rows:
        ax.annotate(r["reaction"], (r["barrier_emt_eV"], r["barrier_model_eV"]), fontsize=6)
    top = 1.1 * max(e + m)
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    mae = np.mean(np.abs(np.array(m) - np.array(e)))
    ax.set_xlabel("barrier, EMT (eV)")
    ax.set_ylabel(f"barrier, {rows[0]['model']} model (eV)")
    ax.set_title(f"climbing-image NEB barriers, MAE {mae:.3f} eV", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_relax(rows, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    acc = rows[0]
    ax[0].bar(["every system until\nthe last converged", "converged systems\nleave the batch"],
              [acc["before"], acc["after"]], color=["0.6", "C0"])
    ax[0].set_ylabel("atom evaluations")
    ax[0].set_title(f"FIRE on {acc['systems']} slabs ({acc['atoms']} atoms), fmax 0.05: {acc['ratio']:.2f}x fewer",
                    fontsize=8)
    checks = [c for c in dict.fromkeys(r["check"] for r in rows[1:])]
    for check, marker in zip(checks, "osd^"):
        sel = [r for r in rows if r["check"] == check]
        ax[1].plot([r["atoms"] for r in sel], [r["ratio"] for r in sel], marker=marker, label=check)
    ax[1].axhline(1.0, color="k", ls="--", lw=0.8)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("atoms in the batch")
    ax[1].set_ylabel("eqcalc / torch-sim time per step")
    ax[1].set_title("zero-cost potentials (harmonic wells for MD, constant push for FIRE), float64, CPU",
                    fontsize=8)
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["speed", "same-images", "accuracy", "saddles", "relax"], default=["speed"])
    p.add_argument("--model", default="default")
    p.add_argument("--compile", default="eager", help="eager | torchscript | aoti (both sides)")
    p.add_argument("--dtype", default=None, help="default: the model's own")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=2, help="--what speed: rounds, alternating which side goes first")
    p.add_argument("--saddle-fmax", type=float, default=0.01, help="fmax of the --what saddles bands, eV/Å")
    p.add_argument("--overhead-systems", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--blocks", type=int, default=40, help="interleaved NVE timing blocks")
    p.add_argument("--block-steps", type=int, default=25)
    p.add_argument("--relax-steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the relax-driver timing")
    p.add_argument("--output-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # a benchmark script, not library code
    from eqcalc import package
    from eqcalc.model import Model

    model = Model(args.model, device="cpu", compile=args.compile, dtype=args.dtype)
    sha = package.read(package.resolve(args.model)).metadata["weights_sha256"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "speed" in args.what:
        rows = speed(model, args)
        write_csv(out / "neb_speed.csv", rows, sha)
        plot_speed(rows, out / "neb_speed.png")
    if "same-images" in args.what:
        write_csv(out / "neb_same_images.csv", same_images(model, args), sha)
    if "accuracy" in args.what:
        rows = accuracy(model, args)
        write_csv(out / "neb_accuracy.csv", rows, sha)
        plot_accuracy(rows, out / "neb_accuracy.png")
    if "saddles" in args.what:
        write_csv(out / f"neb_saddles_{args.model}_{model.dtype}.csv".replace("torch.", ""), saddles(model, args), sha)
    if "relax" in args.what:
        rows = relax_rows(model, args)
        write_csv(out / "relax_engine.csv", rows, sha)
        plot_relax(rows, out / "relax_engine.png")
    print(f"wrote results to {out}")


if __name__ == "__main__":
    main()
