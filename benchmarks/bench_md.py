"""The batched MD engine: throughput against a loop of ASE runs, and its physics.

Throughput (``--what throughput``): 16 catalyst slabs of 37-40 atoms (fcc(111) 3x3x4 of Cu, Ni,
Pd, Ag, Pt, Au with O, CO or OH on top, two bottom layers fixed), Langevin at 500 K, 1 fs, the
same model object, the same compiled form and the same number of steps for both:

* engine: ``eqcalc.md.Langevin`` steps on all 16 slabs as one batch (one model call per step
  for the batch, one neighbor list with 0.5 Å skin), no files written;
* ASE loop: for each slab in turn ``ase.md.langevin.Langevin`` with ``EquivariantCalculator``
  (its own neighbor list with the same skin), no observers.

Timed: the MD steps only, after a warm-up of 3 steps each (model loading, first neighbor list
and allocator warm-up excluded for both), paired: one engine step for all 16 slabs, then one
ASE step of each slab, alternating, so a drifting load on a shared machine hits both alike.
The engine side is the integrator step with ``ModelPotential`` (what ``run_md`` runs, without
its file writing); the ASE side is ``dyn.run(1)`` per slab. Result in atom-steps/s →
``benchmarks/results/md_throughput.csv`` and ``.png``.

Physics (``--what physics``): NVT with each engine thermostat on the constrained Pt(111)+O slab
(3x3x4, two bottom layers fixed, relaxed first, 500 K, 1 fs, 5 ps per thermostat, ``--replicas``
copies as one batch, first ps discarded), and NVE energy drift of the default (float32) model on 108-atom fcc
Cu at 600 K (1 ps Langevin equilibration at 600 K, then 5 ps NVE, dt 1 fs; drift = slope of a
linear fit of E_tot(t)) → ``benchmarks/results/md_physics.csv`` and ``md_physics.png``.

The machine matters: run on a quiet machine with one torch thread (the default here) and say so.

    nice -n 15 .venv/bin/python benchmarks/bench_md.py              # everything, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_md.py --quick                 # ~2 min: fewer steps, 1 ps
    .venv/bin/python benchmarks/bench_md.py --what throughput --compile torchscript
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from ase import units

RESULTS = Path(__file__).resolve().parent / "results"


def slabs(n: int = 16):
    """``n`` catalyst slabs, 37-40 atoms each, bottom two layers fixed, no momenta."""
    from ase import Atoms
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    metals = ["Cu", "Ni", "Pd", "Ag", "Pt", "Au"]
    adsorbates = [("O", Atoms("O")), ("CO", Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.15]])),
                  ("OH", Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]]))]
    out = []
    for k in range(n):
        s = fcc111(metals[k % len(metals)], (3, 3, 4), vacuum=8.0)
        name, ads = adsorbates[k % len(adsorbates)]
        add_adsorbate(s, ads, 1.9 if name != "O" else 1.3, "ontop" if name == "CO" else "fcc")
        s.info.pop("adsorbate_info", None)
        s.set_constraint(FixAtoms(mask=np.concatenate([s.get_tags()[:36] >= 3, np.zeros(len(s) - 36, bool)])))
        out.append(s)
    return out


def pt_o_slab():
    """Pt(111) 3x3x4 + O (fcc hollow), two bottom layers fixed: the catalyst NVT check."""
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    s = fcc111("Pt", (3, 3, 4), vacuum=10.0)
    add_adsorbate(s, "O", 1.2, "fcc")
    s.info.pop("adsorbate_info", None)
    s.set_constraint(FixAtoms(mask=np.concatenate([s.get_tags()[:36] >= 3, [False]])))
    return s


def throughput(args) -> list:
    from ase.md.langevin import Langevin

    from eqcalc import EquivariantCalculator
    from eqcalc.engine import md
    from eqcalc.model import Model

    model = Model(args.model, device=args.device, compile=args.compile)
    systems = slabs(args.systems)
    n_atoms = sum(len(s) for s in systems)
    steps = args.steps or (20 if args.quick else 100)
    integrator = md.Langevin(1.0, 500.0, friction_per_fs=0.01)
    generator = torch.Generator().manual_seed(0)
    potential = md.ModelPotential(model, skin=0.5)
    state = md.state_from_atoms(systems)
    state = integrator.init(md.maxwell_boltzmann(state, 500.0, generator, False), potential)
    for _ in range(3):  # warm-up: model, first neighbor list, allocator
        state = integrator.step(state, potential, generator)
    dyns = []
    for k, atoms in enumerate(md.to_atoms(state, systems)):  # the same start for the ASE loop
        atoms = atoms.copy()
        atoms.calc = EquivariantCalculator(model, skin=0.5)
        dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=500.0, friction=0.01 / units.fs, fixcm=False,
                       rng=np.random.RandomState(k), logfile=None)
        dyn.run(3)  # warm-up: first neighbor list and model calls
        dyns.append(dyn)
    builds0 = (potential.neighbors.n_builds, sum(d.atoms.calc.neighbors.n_builds for d in dyns))
    # Paired timing: one engine step (16 slabs), then one ASE step of each slab, alternating, so a
    # drifting load on a shared machine hits both alike (separate blocks of runs measured
    # anywhere from 0.9x to 2.0x on the busy development machine).
    engine_t, ase_t = np.zeros(steps), np.zeros(steps)
    for k in range(steps):
        t = time.perf_counter()
        state = integrator.step(state, potential, generator)
        engine_t[k] = time.perf_counter() - t
        t = time.perf_counter()
        for dyn in dyns:
            dyn.run(1)
        ase_t[k] = time.perf_counter() - t
    builds = (potential.neighbors.n_builds - builds0[0],
              sum(d.atoms.calc.neighbors.n_builds for d in dyns) - builds0[1])
    rows = []
    for name, ts, nb in (("engine (one batch)", engine_t, builds[0]), ("ASE Langevin loop", ase_t, builds[1])):
        rows.append(dict(method=name, compile=model.compile_kind, device=str(model.device), n_systems=len(systems),
                         n_atoms=n_atoms, steps=steps, seconds=float(ts.sum()),
                         median_step_ms=1e3 * float(np.median(ts)), atom_steps_per_s=n_atoms * steps / float(ts.sum()),
                         neighbor_builds=nb, threads=torch.get_num_threads()))
    for r in rows:
        r["speedup_vs_ase"] = r["atom_steps_per_s"] / rows[1]["atom_steps_per_s"]
    rows[0]["paired_median_ratio"] = float(np.median(ase_t / engine_t))
    print(f"engine: {engine_t.sum():.2f} s, ASE loop: {ase_t.sum():.2f} s for {steps} steps x {n_atoms} atoms; "
          f"engine / ASE loop {rows[0]['speedup_vs_ase']:.2f}x ({rows[0]['atom_steps_per_s']:.0f} vs "
          f"{rows[1]['atom_steps_per_s']:.0f} atom-steps/s), median of per-step ratios {rows[0]['paired_median_ratio']:.2f}x; "
          f"list builds {builds[0]} vs {builds[1]}")
    return rows


def physics(args) -> tuple:
    from eqcalc.engine import md
    from eqcalc.engine.drivers import run_md
    from eqcalc.model import Model
    from ase.build import bulk

    model = Model(args.model, device=args.device, compile=args.compile)
    ps = 1.0 if args.quick else 5.0
    steps = int(ps * 1000)
    rows, traces = [], {}
    from eqcalc.engine.relax import relax

    # start from the relaxed slab: the as-built one releases ~0.5 eV and spikes to ~1200 K
    relaxed = relax([pt_o_slab()], md.ModelPotential(model), fmax=0.02).structures[0]
    for name in ("langevin", "bussi", "nose-hoover"):
        integrator = md.make_integrator("nvt", 1.0, name, temperature_K=500.0, friction_per_fs=0.01, tau_fs=100.0)
        systems = [relaxed.copy() for _ in range(args.replicas)]
        t = time.perf_counter()
        run = run_md(systems, md.ModelPotential(model), integrator, steps, temperature_K=500.0, seed=1,
                     log_interval=1, interval=10 ** 9)
        seconds = time.perf_counter() - t
        T = run.log["temperature_K"]
        keep = T[int(len(T) * 0.2):]  # the first fifth (1 ps of 5) is equilibration
        dof = float(run.state.dof[0])
        rows.append(dict(check=f"NVT {name}", system=f"Pt(111)3x3x4+O, 2 layers fixed, {args.replicas} replicas",
                         target_K=500.0, simulated_ps=ps, mean_T_K=float(keep.mean()),
                         mean_T_per_replica_K=" ".join(f"{x:.1f}" for x in keep.mean(0)),
                         deviation_pct=100 * (float(keep.mean()) / 500.0 - 1), std_T_K=float(keep.std()),
                         canonical_std_T_K=500.0 * np.sqrt(2 / dof), dof=dof, seconds=seconds))
        traces[name] = (run.log["step"] * 1e-3, T.mean(1) if T.ndim > 1 else T)
        print(f"NVT {name}: <T> = {keep.mean():.1f} K (target 500, dof {dof:.0f}), std {keep.std():.1f} K "
              f"(canonical {500 * np.sqrt(2 / dof):.1f} K), {seconds:.0f} s")

    # ASE's own NoseHooverChainNVT on the same constrained slab (why the docs call it unsafe there)
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    try:  # ASE >= 3.29 name
        from ase.md.velocitydistribution import thermalize_momenta as thermalize
    except ImportError:  # pragma: no cover
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize

    from eqcalc import EquivariantCalculator

    atoms = relaxed.copy()
    atoms.calc = EquivariantCalculator(model)
    thermalize(atoms, temperature_K=500.0, rng=np.random.RandomState(0))
    dyn = NoseHooverChainNVT(atoms, 1.0 * units.fs, temperature_K=500.0, tdamp=100 * units.fs)
    ase_T = []
    dyn.attach(lambda: ase_T.append(atoms.get_temperature()))
    t = time.perf_counter()
    dyn.run(steps // 2)
    keep = np.asarray(ase_T[len(ase_T) // 5:])
    rows.append(dict(check="NVT ASE NoseHooverChainNVT", system="Pt(111)3x3x4+O, 2 layers fixed, 1 replica",
                     target_K=500.0, simulated_ps=ps / 2, mean_T_K=float(keep.mean()),
                     deviation_pct=100 * (float(keep.mean()) / 500.0 - 1), std_T_K=float(keep.std()),
                     dof=float(atoms.get_number_of_degrees_of_freedom()), seconds=time.perf_counter() - t))
    traces["ase-nhc"] = (np.arange(len(ase_T)) * 1e-3, np.asarray(ase_T))
    print(f"ASE NoseHooverChainNVT with FixAtoms: <T> = {keep.mean():.1f} K (target 500)")

    cu = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)  # 108 atoms
    t = time.perf_counter()
    eq = run_md([cu], md.ModelPotential(model), md.Langevin(1.0, 600.0, friction_per_fs=0.02), 1000 if not args.quick else 300,
                temperature_K=600.0, seed=2, interval=10 ** 9)
    hot = md.to_atoms(eq.state, [cu])
    run = run_md(hot, md.ModelPotential(model), md.NVE(1.0), steps, log_interval=1, interval=10 ** 9)
    seconds = time.perf_counter() - t
    time_ps = run.log["step"] * 1e-3
    etot = run.log["etot_eV"][:, 0]
    slope = np.polyfit(time_ps, etot, 1)[0]
    drift = 1e3 * slope / len(cu)
    T = run.log["temperature_K"][:, 0]
    rows.append(dict(check="NVE drift", system="fcc Cu 108 atoms, default model float32", target_K=600.0,
                     simulated_ps=ps, mean_T_K=float(T.mean()), std_T_K=float(T.std()),
                     drift_meV_per_atom_per_ps=float(drift),
                     etot_std_meV_per_atom=1e3 * float(etot.std()) / len(cu),
                     max_abs_drift_meV_per_atom=1e3 * float(np.abs(etot - etot[0]).max()) / len(cu), seconds=seconds))
    traces["nve"] = (time_ps, etot, run.log["epot_eV"][:, 0])
    print(f"NVE Cu108: drift {drift:+.4f} meV/atom/ps, E_tot std {1e3 * etot.std() / len(cu):.4f} meV/atom, "
          f"<T> {T.mean():.0f} K, {seconds:.0f} s")
    return rows, traces


def write_csv(path: Path, rows, model_sha: str = "") -> None:
    rows = [dict(r, model_sha256=model_sha[:16]) for r in rows]  # which weights were measured
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot_throughput(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = [f"{r['method']}\n{r['threads']} thread(s)" for r in rows]
    ax.bar(labels, [r["atom_steps_per_s"] for r in rows], color=["C0" if r["method"].startswith("engine") else "C1"
                                                               for r in rows])
    for k, r in enumerate(rows):
        ax.text(k, r["atom_steps_per_s"], f"{r['atom_steps_per_s']:.0f} ({r['speedup_vs_ase']:.2f}x)", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylim(0, 1.15 * max(r["atom_steps_per_s"] for r in rows))
    ax.set_ylabel("atom-steps / s")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"{rows[0]['n_systems']} slabs, {rows[0]['n_atoms']} atoms, {rows[0]['steps']} Langevin steps "
                 f"(paired timing), {rows[0]['compile']}, {rows[0]['device']}; speed-up vs the ASE loop "
                 "at the same thread count", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_physics(traces, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 1, figsize=(7, 6))
    for name in ("langevin", "bussi", "nose-hoover"):
        t, T = traces[name]
        ax[0].plot(t, T, lw=0.6, label=f"eqcalc.md {name}")
    if "ase-nhc" in traces:
        t, T = traces["ase-nhc"]
        ax[0].plot(t, T, lw=0.6, color="0.5", label="ASE NoseHooverChainNVT (FixAtoms)")
    ax[0].axhline(500, color="k", ls="--", lw=0.8)
    ax[0].set_xlabel("time (ps)"), ax[0].set_ylabel("T (K), mean of replicas")
    ax[0].set_title("NVT, Pt(111)+O, two bottom layers fixed, target 500 K", fontsize=9)
    ax[0].legend(fontsize=8)
    t, etot, epot = traces["nve"]
    ax[1].plot(t, 1e3 * (etot - etot[0]) / 108, lw=0.8, label="E_tot")
    ax[1].plot(t, 1e3 * (epot - epot.mean()) / 108, lw=0.5, alpha=0.5, label="E_pot - mean")
    ax[1].set_xlabel("time (ps)"), ax[1].set_ylabel("meV / atom")
    ax[1].set_title("NVE, 108-atom Cu, ~600 K, 1 fs, default model (float32)", fontsize=9)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["throughput", "physics", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="fewer steps (throughput 20, physics 1 ps)")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="eager", help="same for engine and ASE loop: eager | torchscript | aoti")
    p.add_argument("--systems", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="throughput steps (default 100, quick 20)")
    p.add_argument("--replicas", type=int, default=4, help="NVT copies run as one batch")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch intra-op threads; several counts run the throughput once per count")
    p.add_argument("--output-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    threads = args.threads
    torch.set_num_threads(threads[0])  # a benchmark script, not library code
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    from eqcalc import package

    sha = package.read(package.resolve(args.model)).metadata["weights_sha256"]
    if args.what in ("throughput", "all"):
        rows = []
        for n in threads:
            torch.set_num_threads(n)
            rows += throughput(args)  # each row records torch.get_num_threads()
        write_csv(out / f"md_throughput{suffix}.csv", rows, sha)
        plot_throughput(rows, out / f"md_throughput{suffix}.png")
    if args.what in ("physics", "all"):
        rows, traces = physics(args)
        write_csv(out / f"md_physics{suffix}.csv", rows, sha)
        plot_physics(traces, out / f"md_physics{suffix}.png")
    print(f"wrote results to {out}")


if __name__ == "__main__":
    main()
