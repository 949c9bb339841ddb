"""The batched MD engine (eqcalc.md, eqcalc.drivers) and ASE's own dynamics with the calculator.

Physics checked: NVE equals ASE's VelocityVerlet step for step, energy conservation, each
thermostat's mean temperature and canonical fluctuations with FixAtoms and per-system targets,
mixed-periodicity batches equal separate runs, exact restart, typed errors on bad input.
Thermostat statistics use a cheap Morse potential (tests/md_potentials.py) so thousands of steps
stay fast; everything comparing to ASE uses a real (small, float64) PaiNN package.
"""
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import add_adsorbate, bulk, fcc100, fcc111, molecule
from ase.constraints import FixAtoms, FixBondLength

from eqcalc import EquivariantCalculator
from eqcalc.engine import md
from eqcalc.engine.drivers import load_checkpoint, run_md
from eqcalc.errors import InvalidOptionError, NonFiniteOutputError
from eqcalc.model import Model
from tests.md_potentials import MorsePotential


@pytest.fixture(scope="module")
def model(package_path):
    return Model(package_path("painn", "float64", features=8, num_interactions=2), device="cpu", compile="eager")


def pt_slab(rattle=0.05, seed=1):
    s = fcc111("Pt", (2, 2, 3), a=3.92, vacuum=6.0)
    add_adsorbate(s, "O", 1.6, "fcc")
    s.info.pop("adsorbate_info")  # not storable in extxyz
    s.set_constraint(FixAtoms(mask=s.get_tags() == 3))
    s.rattle(rattle, seed=seed)
    return s


def cu_slab():
    s = fcc100("Cu", (2, 2, 3), a=3.61, vacuum=6.0)
    s.set_constraint(FixAtoms(mask=s.get_tags() == 3))  # bottom layer: 4 of 12 atoms fixed
    return s


def thermal(atoms, temperature_K, seed):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(len(atoms), 3)) * np.sqrt(atoms.get_masses()[:, None] * units.kB * temperature_K)
    atoms.set_momenta(p)  # ASE applies FixAtoms: fixed atoms get none
    return atoms


def test_nve_matches_ase_velocity_verlet(model):
    from ase.md.verlet import VelocityVerlet

    atoms = thermal(pt_slab(), 600, seed=0)
    ref = atoms.copy()
    ref.calc = EquivariantCalculator(model)
    VelocityVerlet(ref, 1.0 * units.fs, logfile=None).run(50)
    potential = md.ModelPotential(model)
    integrator = md.NVE(1.0)
    state = integrator.init(md.state_from_atoms([atoms]), potential)
    for _ in range(50):
        state = integrator.step(state, potential)
    # The README's promise: identical to ASE's VelocityVerlet to 1e-12 Å in float64 (measured
    # 2.3e-13 Å and 1e-11 in momenta of magnitude ~7; forces rounded to float32 miss by ~1e-7).
    assert np.abs(state.positions.numpy() - ref.positions).max() < 1e-12
    assert np.abs(state.momenta.numpy() - ref.get_momenta()).max() < 1e-10
    assert np.abs(state.positions.numpy() - atoms.positions).max() > 1e-2  # it did move
    assert potential.neighbors.n_builds < 50  # skin reuse across steps


def test_nve_conserves_energy_and_momentum():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    potential = MorsePotential()
    run = run_md([atoms], potential, md.NVE(2.0), 500, temperature_K=600, seed=1, log_interval=1)
    etot, epot = run.log["etot_eV"][:, 0], run.log["epot_eV"][:, 0]
    assert run.state.dof[0] == 3 * 32 - 3  # momentum conserved: centre of mass removed
    assert np.std(etot) < 0.01 * np.std(epot)  # energy exchanged, total kept (Euler would drift)
    assert abs(etot[-1] - etot[0]) < 1e-3 * len(atoms)
    total_p = run.state.momenta.sum(0)
    assert torch.abs(total_p).max() < 1e-9


def small_bulk():
    return bulk("Cu", "fcc", a=3.61, cubic=True)  # 4 atoms: 12 or 9 degrees of freedom


def kinetic_samples(integrator, systems, targets, steps, seed=0):
    """Run ``integrator`` and return, per step after the first, each system's kinetic energy
    ``sum p^2 / 2m`` computed here from the momenta (eV) and the engine's reported temperature."""
    potential = MorsePotential()
    generator = torch.Generator().manual_seed(seed)
    state = md.maxwell_boltzmann(md.state_from_atoms(systems), targets, generator, integrator.conserves_momentum)
    state = integrator.init(state, potential)
    system, masses = state.system.numpy(), state.masses.numpy()
    kinetic, reported = [], []
    for _ in range(steps):
        state = integrator.step(state, potential, generator)
        p = state.momenta.numpy()
        kinetic.append(np.bincount(system, 0.5 * (p * p).sum(1) / masses, minlength=len(systems)))
        reported.append(md.temperature(state).numpy())
    return np.array(kinetic), np.array(reported), state


@pytest.mark.parametrize("integrator", [
    md.Langevin(5.0, [400.0, 800.0] * 8, friction_per_fs=0.02),
    md.Bussi(5.0, [400.0, 800.0] * 8, tau_fs=50.0),
    md.NoseHooverChain(5.0, [400.0, 800.0] * 8, tau_fs=50.0),
], ids=["langevin", "bussi", "nose-hoover"])
def test_thermostat_temperature_with_fixed_atoms(integrator):
    """8 Cu slabs (8 free, 4 fixed atoms) and 8 four-atom Cu crystals at 400 K and 800 K
    alternating, 4 ps. Equipartition, checked on the kinetic energy computed here from the momenta:
    <K> = dof kB T / 2 with the README's rule written out independently: fixed atoms count nothing
    and break momentum conservation; a crystal without fixed atoms has 3N dof under Langevin
    (noise breaks conservation) and 3N - 3 under Bussi and Nosé–Hoover. Counting fixed atoms reads
    50 % off, a wrong centre-of-mass rule 14 % (slabs) or 33 % (crystals); the engine's reported
    temperature must read the target too (Langevin losing 3 dof reads 33 % high)."""
    targets = np.array(integrator.temperature_K)
    systems = [cu_slab() for _ in range(8)] + [small_bulk() for _ in range(8)]
    kinetic, reported, state = kinetic_samples(integrator, systems, targets, 800)
    crystal_dof = 12 if isinstance(integrator, md.Langevin) else 9
    dof = np.array([3 * 8] * 8 + [crystal_dof] * 8)
    ratio = kinetic[160:].mean(0) / (0.5 * dof * units.kB * targets)  # after 0.8 ps of equilibration
    T = reported[160:] / targets
    # measured over seeds (5 fs and 4 fs steps): pooled slabs within 3 %, pooled crystals within
    # 4.7 % (Nosé–Hoover is not quite canonical for 4 atoms), per target group within 8 %
    assert abs(ratio[:8].mean() - 1) < 0.05 and abs(T[:, :8].mean() - 1) < 0.05
    assert abs(ratio[8:].mean() - 1) < 0.10 and abs(T[:, 8:].mean() - 1) < 0.10
    for group in (ratio[0::2], ratio[1::2]):  # per-system targets are honoured
        assert abs(group.mean() - 1) < 0.15
    # canonical kinetic-energy fluctuations of the slabs: std(T)/T = sqrt(2 / dof)
    assert T[:, :8].std() == pytest.approx(np.sqrt(2 / 24), rel=0.08)
    fixed = state.fixed
    assert fixed.sum() == 4 * 8
    assert torch.count_nonzero(state.momenta[fixed]) == 0
    start = md.state_from_atoms(systems)
    assert torch.equal(state.positions[fixed], start.positions[fixed])


def test_deterministic_thermostats_conserve_their_energy():
    atoms = [cu_slab(), bulk("Cu", "fcc", a=3.61, cubic=True)]
    for integrator in (md.NoseHooverChain(2.0, 500.0, 50.0), md.Bussi(2.0, 500.0, 50.0)):
        run = run_md(atoms, MorsePotential(), integrator, 400, temperature_K=500, seed=3, log_interval=1)
        conserved, epot = run.log["conserved_eV"], run.log["epot_eV"]
        assert (np.abs(conserved - conserved[0]).max(0) < 0.05 * np.std(epot, axis=0)).all()


def test_mixed_pbc_batch_equals_separate_runs(model):
    slab = pt_slab()
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=2)
    co = molecule("CO")
    co.center(vacuum=4.0)
    systems = [slab, cu, co]
    batch = md.ModelPotential(model)(md.state_from_atoms(systems))
    for k, s in enumerate(systems):
        alone = md.ModelPotential(model)(md.state_from_atoms([s]))
        start = sum(len(x) for x in systems[:k])
        assert torch.allclose(batch["forces"][start:start + len(s)], alone["forces"], atol=1e-10)
        assert torch.allclose(batch["energy"][k], alone["energy"][0], atol=1e-10)
    # and the dynamics: 10 NVE steps of the batch move each system as it moves alone
    systems = [thermal(s, 400, seed=k) for k, s in enumerate(systems)]
    together = run_md(systems, md.ModelPotential(model), md.NVE(1.0), 10).state.positions
    alone = torch.cat([run_md([s], md.ModelPotential(model), md.NVE(1.0), 10).state.positions for s in systems])
    assert torch.allclose(together, alone, atol=1e-9)
    assert (together - md.state_from_atoms(systems).positions).abs().max() > 1e-3


@pytest.mark.parametrize("integrator", [md.Langevin(2.0, 500.0), md.NoseHooverChain(2.0, 500.0),
                                        md.Bussi(2.0, 500.0)], ids=["langevin", "nose-hoover", "bussi"])
def test_restart_reproduces_uninterrupted_run(tmp_path, integrator):
    import ase.io

    atoms = [cu_slab(), bulk("Cu", "fcc", a=3.61, cubic=True)]
    full = run_md(atoms, MorsePotential(), integrator, 30, temperature_K=500, seed=7, interval=5,
                  output_dir=tmp_path / "full", checkpoint_interval=10)
    part = run_md(atoms, MorsePotential(), integrator, 20, temperature_K=500, seed=7, interval=5,
                  output_dir=tmp_path / "part", checkpoint_interval=10)
    (tmp_path / "part" / "checkpoint.pt").replace(tmp_path / "ck.pt")
    run_md(atoms, MorsePotential(), integrator, 25, temperature_K=500, seed=7, interval=5,  # "killed" at 25
           output_dir=tmp_path / "part", checkpoint_interval=10)
    resumed = run_md(atoms, MorsePotential(), integrator, 30, seed=123, interval=5,  # seed ignored: saved RNG
                     output_dir=tmp_path / "part", checkpoint_interval=10, restart=tmp_path / "ck.pt")
    assert part.state.step == 20 and resumed.state.step == 30
    assert torch.equal(resumed.state.positions, full.state.positions)
    assert torch.equal(resumed.state.momenta, full.state.momenta)
    frames = ase.io.read(tmp_path / "part" / "system0.extxyz", ":")
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20, 25, 30]  # no duplicates after restart
    ref = ase.io.read(tmp_path / "full" / "system0.extxyz", ":")
    np.testing.assert_array_equal(frames[-1].positions, ref[-1].positions)
    state, _, _ = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert state.step == 30


@pytest.mark.parametrize("integrator", [md.Bussi(2.0, 300.0, tau_fs=20.0), md.Langevin(2.0, 300.0)],
                         ids=["bussi", "langevin"])
def test_trajectory_and_md_log_hold_what_the_readme_says(tmp_path, integrator):
    """Frames hold energy, forces, momenta and constraints; md.log holds per system and record
    ``step time_ps system T E_pot E_tot``, each checked against values recomputed here from the
    frames: E_pot by evaluating the potential again at the stored positions, E_tot with ASE's
    kinetic energy of the stored momenta, T with ASE's temperature rescaled by the README's dof
    rule (ASE counts 3N - 3 n_fixed; the engine removes 3 more for a crystal under Bussi, whose
    total momentum is conserved, and not under Langevin, whose noise breaks that)."""
    import ase.io

    systems = [cu_slab(), small_bulk()]
    run = run_md(systems, MorsePotential(), integrator, 10, temperature_K=300,
                 interval=5, output_dir=tmp_path, names=["slab", "cu"])
    slab, cu = (ase.io.read(tmp_path / f"{name}.extxyz", ":") for name in ("slab", "cu"))
    assert [f.info["step"] for f in slab] == [f.info["step"] for f in cu] == [0, 5, 10]
    last = slab[-1]
    np.testing.assert_allclose(last.positions, run.state.positions[:12].numpy(), atol=1e-7)
    np.testing.assert_allclose(last.get_momenta(), run.state.momenta[:12].numpy(), atol=1e-7)
    assert isinstance(last.constraints[0], FixAtoms) and len(last.constraints[0].index) == 4
    log = (tmp_path / "md.log").read_text().splitlines()
    assert log[0].split() == ["#", "step", "time_ps", "system", "temperature_K", "epot_eV", "etot_eV"]
    rows = np.array([[float(x) for x in line.split()] for line in log[1:]])
    assert rows.shape == (3 * 2, 6)
    for r in rows:
        step, time_ps, k, T, epot, etot = r
        frame = (slab, cu)[int(k)][int(step) // 5]
        fresh = MorsePotential()(md.state_from_atoms([frame]))
        np.testing.assert_allclose(frame.get_forces(apply_constraint=False)[~md.fixed_mask(frame)],
                                   fresh["forces"].numpy()[~md.fixed_mask(frame)], atol=1e-6)
        assert time_ps == pytest.approx(step * 2.0 / 1000)
        assert epot == pytest.approx(float(fresh["energy"][0]), abs=2e-6)
        assert frame.get_potential_energy() == pytest.approx(epot, abs=2e-6)
        assert etot == pytest.approx(epot + frame.get_kinetic_energy(), abs=2e-6)
        n = len(frame)
        ase_dof = 3 * n - 3 * len(md.fixed_mask(frame).nonzero()[0])
        ours = ase_dof if k == 0 or isinstance(integrator, md.Langevin) else 3 * n - 3
        assert T == pytest.approx(frame.get_temperature() * ase_dof / ours, abs=0.006)
    assert rows[rows[:, 2] == 1, 3].min() > 50  # the crystal is warm: the check above is not 0 == 0


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(InvalidOptionError, match="thermostat"):
        md.make_integrator("nvt", 1.0, thermostat="berendsen")
    with pytest.raises(InvalidOptionError, match="timestep_fs"):
        md.NVE(-1.0)
    with pytest.raises(InvalidOptionError, match="temperature_K"):
        md.Langevin(1.0, temperature_K=-5)
    with pytest.raises(InvalidOptionError, match="2 systems"):
        run_md([cu_slab(), cu_slab()], MorsePotential(), md.Langevin(1.0, [300, 400, 500]), 2)
    constrained = molecule("CO")
    constrained.set_constraint(FixBondLength(0, 1))
    with pytest.raises(InvalidOptionError, match="FixBondLength"):
        md.state_from_atoms([constrained])


@pytest.mark.parametrize("integrator", [md.NVE(1.0), md.Langevin(1.0, 300.0), md.Bussi(1.0, 300.0),
                                        md.NoseHooverChain(1.0, 300.0)], ids=["nve", "langevin", "bussi", "nose-hoover"])
def test_exploding_step_stops_with_an_error(tmp_path, integrator):
    """A model gone wrong (NaN forces from its 3rd call on) stops the run at the step that blew
    up, with the files holding only the good steps before it."""
    class Exploding(MorsePotential):
        calls = 0

        def __call__(self, state):
            out = super().__call__(state)
            Exploding.calls += 1
            return dict(out, forces=out["forces"] * (float("nan") if Exploding.calls >= 3 else 1.0))

    with pytest.raises(NonFiniteOutputError, match="system 0 left physics at step 2: positions, momenta, forces"):
        run_md([cu_slab()], Exploding(), integrator, 5, temperature_K=300, interval=1, output_dir=tmp_path)
    import ase.io

    frames = ase.io.read(tmp_path / "system0.extxyz", ":")
    assert [f.info["step"] for f in frames] == [0, 1]
    assert all(np.isfinite(f.positions).all() and np.isfinite(f.get_forces()).all() for f in frames)
    assert [int(line.split()[0]) for line in (tmp_path / "md.log").read_text().splitlines()[1:]] == [0, 1]
    # a single step that fails leaves the state it started from untouched
    Exploding.calls = 2
    state = integrator.init(md.state_from_atoms([cu_slab()]), MorsePotential())
    before = state.positions.clone()
    with pytest.raises(NonFiniteOutputError, match="step 1"):
        integrator.step(state, Exploding(), torch.Generator().manual_seed(0))
    assert torch.equal(state.positions, before)


def test_one_model_call_per_step_for_the_whole_batch(model, monkeypatch):
    """The README's promise for eqcalc md and relax: one model call per step evaluates the whole
    batch (a slab, a crystal and a molecule here), and the neighbor list is reused across steps."""
    calls = []
    runner = model.runner
    monkeypatch.setattr(model, "runner", lambda *inputs: calls.append(int(inputs[1].shape[0])) or runner(*inputs))
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    co = molecule("CO")
    co.center(vacuum=4.0)
    potential = md.ModelPotential(model)
    run_md([pt_slab(), cu, co], potential, md.Langevin(1.0, 300.0), 8, temperature_K=300)
    assert calls == [3] * 9  # the start, then one per step, each with all 3 systems
    assert potential.neighbors.n_builds <= 2
    calls.clear()
    from eqcalc.engine.relax import relax

    result = relax([pt_slab(), cu, co], md.ModelPotential(model), fmax=1e-9, max_steps=6)
    # the perfect crystal has zero forces: converged at step 0, it leaves the batch
    assert result.steps == [6, 0, 6] and calls == [3] + [2] * 6


# ---- ASE's own drivers with EquivariantCalculator ------------------------------------------------
def test_ase_velocity_verlet_conserves_energy(model):
    from ase.md.verlet import VelocityVerlet

    atoms = thermal(pt_slab(), 500, seed=1)
    atoms.calc = EquivariantCalculator(model)
    fixed = atoms.positions[atoms.constraints[0].index].copy()
    etot, epot = [], []
    dyn = VelocityVerlet(atoms, 1.0 * units.fs, logfile=None)
    dyn.attach(lambda: (etot.append(atoms.get_total_energy()), epot.append(atoms.get_potential_energy())))
    dyn.run(40)
    assert np.std(etot) < 0.02 * np.std(epot)
    np.testing.assert_array_equal(atoms.positions[atoms.constraints[0].index], fixed)


@pytest.mark.parametrize("driver", ["langevin", "bussi", "nose-hoover-chain"])
def test_ase_thermostats_run_with_the_calculator(model, driver):
    """ASE's own thermostat moves the atoms exactly as it does on an independent reference
    calculator (ASE's neighbor list, no cache or skin: tests/reference.py) with the same noise:
    forces, energies, caching and constraints of EquivariantCalculator are what ASE needs."""
    from ase.md.bussi import Bussi
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import NoseHooverChainNVT

    from tests.reference import ReferenceCalculator

    def run(calc):
        atoms = thermal(pt_slab(), 500, seed=2)
        if driver == "nose-hoover-chain":
            atoms.set_constraint()  # unsafe with FixAtoms (ASE 3.29 settles near 0 K), see README
        atoms.calc = calc
        rng = np.random.RandomState(0)
        dyn = {"langevin": lambda: Langevin(atoms, 1 * units.fs, temperature_K=500, friction=0.02 / units.fs,
                                            fixcm=False, rng=rng),
               "bussi": lambda: Bussi(atoms, 1 * units.fs, temperature_K=500, taut=50 * units.fs, rng=rng),
               "nose-hoover-chain": lambda: NoseHooverChainNVT(atoms, 1 * units.fs, temperature_K=500,
                                                               tdamp=50 * units.fs),
               }[driver]()
        energies = []
        dyn.attach(lambda: energies.append(atoms.get_total_energy()))
        dyn.run(10)
        return atoms, np.array(energies)

    start = thermal(pt_slab(), 500, seed=2).positions
    ours, e_ours = run(EquivariantCalculator(model))
    ref, e_ref = run(ReferenceCalculator(model))
    np.testing.assert_allclose(ours.positions, ref.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.get_momenta(), ref.get_momenta(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(e_ours, e_ref, rtol=0, atol=1e-10)
    moved = np.abs(ours.positions - start).max(1)
    assert moved.max() > 1e-2
    if ours.constraints:
        assert (moved[ours.constraints[0].index] == 0).all()


def test_engine_leaves_global_torch_state_alone():
    rng, dtype, threads = torch.random.get_rng_state(), torch.get_default_dtype(), torch.get_num_threads()
    for integrator in (md.Langevin(1.0, 300.0), md.Bussi(1.0, 300.0)):
        run_md([cu_slab()], MorsePotential(), integrator, 3, temperature_K=300, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # noise only from the run's own generator
    assert torch.get_default_dtype() == dtype and torch.get_num_threads() == threads
    a = run_md([cu_slab()], MorsePotential(), md.Langevin(1.0, 300.0), 5, temperature_K=300, seed=4).state
    b = run_md([cu_slab()], MorsePotential(), md.Langevin(1.0, 300.0), 5, temperature_K=300, seed=4).state
    assert torch.equal(a.positions, b.positions)  # same seed, same trajectory


def test_overlapping_atoms_raise_before_the_model_runs(model):
    from ase import Atoms

    from eqcalc.errors import InvalidAtomsError

    atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0.05]], cell=[8, 8, 8], pbc=True)
    with pytest.raises(InvalidAtomsError, match="overlap"):
        run_md([atoms], md.ModelPotential(model), md.NVE(1.0), 1)


def test_physical_screen_never_passes_what_the_full_check_refuses(monkeypatch):
    """check_physical decides with a cheap sufficient screen (md._within_limits: every momentum
    component below sqrt(m kB T_max / 3), every force component below F_max / sqrt(3), everything
    finite) and runs the per-system diagnosis only when the screen does not pass. The screen is
    strict by design (Maxwell-Boltzmann momenta at 3e4 K already cross it at 1.05 sigma; the
    diagnosis then decides), so its soundness is tested at its boundary: states scaled to just
    inside and just outside it, thermal ones and the worst case for the temperature bound (every
    component at the bound, with a lone atom whose dof is clamped to 1), with NaN planted in every
    field. The screen passes exactly the states inside its bound, and the diagnosis passes
    every one of them."""
    from eqcalc.errors import UnstableSimulationError

    h2o = molecule("H2O")
    h2o.center(vacuum=4.0)
    slab = cu_slab()  # 4 fixed atoms: no momenta, dof 3 per free atom
    lone = Atoms("Cu", positions=[[4.0, 4.0, 4.0]], cell=[8, 8, 8], pbc=True)
    base = md.NVE(1.0).init(md.state_from_atoms([slab, h2o, bulk("Cu", cubic=True), lone]), MorsePotential())
    free = (~base.fixed).unsqueeze(1).to(torch.float64)
    p_bound = (base.masses * units.kB * md.MAX_TEMPERATURE_K / 3).sqrt().unsqueeze(1)
    f_bound = md.MAX_FORCE / np.sqrt(3.0)
    generator = torch.Generator().manual_seed(0)

    def full_check_passes(state):
        with monkeypatch.context() as m:
            m.setattr(md, "_within_limits", lambda *a, **k: False)
            try:
                md.check_physical(state)
                return True
            except UnstableSimulationError:
                return False

    def signs(shape):
        return torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1

    screened = 0
    for shape in ("thermal", "corner"):
        for u in (0.5, 0.999, 1.001):  # largest momentum component / its bound
            for v in (0.5, 0.999, 1.001):  # largest force component / its bound
                if shape == "thermal":
                    p = md.maxwell_boltzmann(base, 1000.0, generator, conserves_momentum=False).momenta
                    p = p * u / (p.abs() / p_bound).max()
                    f = base.forces * v * f_bound / base.forces.abs().max()
                else:
                    p = u * p_bound * signs(base.momenta.shape) * free
                    f = v * f_bound * signs(base.forces.shape)
                for poison in (None, "positions", "momenta", "forces", "energy", "stress"):
                    state = base.replace(momenta=p, forces=f)
                    if poison is not None:
                        t = getattr(state, poison).clone()
                        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=generator))] = float("nan")
                        state = state.replace(**{poison: t})
                    passes = md._within_limits(state, md.MAX_TEMPERATURE_K, md.MAX_FORCE)
                    assert passes == (u < 1 and v < 1 and poison is None), (shape, u, v, poison)
                    if passes:
                        screened += 1
                        assert full_check_passes(state), (shape, u, v)
    assert screened == 8
    # the corner state at the bound is within 0.2 % of the temperature limit for the lone atom
    corner = base.replace(momenta=0.999 * p_bound * free.expand(-1, 3))
    assert float(md.temperature(corner)[3]) > 0.99 * md.MAX_TEMPERATURE_K
    # and an ordinary thermal state with its own forces passes the screen
    assert md._within_limits(md.maxwell_boltzmann(base, 300.0, generator), md.MAX_TEMPERATURE_K, md.MAX_FORCE)


def test_a_system_leaving_physics_is_named_with_its_step_and_reason():
    """The per-step guard (md.check_physical) in a batch of three slabs: the one system whose
    kinetic temperature (computed here, 3 per free atom: fixed atoms break momentum
    conservation) passes 1e5 K, or whose largest force passes 1e3 eV/Å, is named with the step;
    1 % below either limit nothing is raised. Bad masses and momenta are refused at the start,
    naming the atom counted over all inputs."""
    from eqcalc.errors import InvalidAtomsError, UnstableSimulationError

    state = md.NVE(1.0).init(md.state_from_atoms([cu_slab(), cu_slab(), cu_slab()]), MorsePotential())
    state = state.replace(step=7)
    free = (~state.fixed & (state.system == 1)).numpy()
    masses = state.masses.numpy()
    direction = np.random.default_rng(0).normal(size=(int(free.sum()), 3))

    def heated(T):
        p = np.zeros((len(masses), 3))
        p[free] = direction * np.sqrt(masses[free, None])
        kinetic = 0.5 * (p ** 2 / masses[:, None]).sum()
        p *= np.sqrt(0.5 * 3 * free.sum() * units.kB * T / kinetic)
        return state.replace(momenta=torch.as_tensor(p))

    md.check_physical(heated(0.99 * md.MAX_TEMPERATURE_K))
    with pytest.raises(UnstableSimulationError, match=r"system 1 left physics at step 7: the temperature "
                                                      r"reached 1\.01e\+05 K") as hot:
        md.check_physical(heated(1.01 * md.MAX_TEMPERATURE_K))
    assert (hot.value.system, hot.value.step) == (1, 7)

    def pushed(f):
        forces = state.forces.clone()
        forces[int(np.flatnonzero(state.system.numpy() == 2)[-1])] = torch.tensor([0.0, 0.6, 0.8]) * f
        return state.replace(forces=forces)

    md.check_physical(pushed(0.99 * md.MAX_FORCE))
    with pytest.raises(UnstableSimulationError, match=r"system 2 left physics at step 7: a force reached 1\.01e\+03"):
        md.check_physical(pushed(1.01 * md.MAX_FORCE))

    atoms = [cu_slab(), cu_slab()]
    bad_mass = atoms[1].get_masses()
    bad_mass[1] = 0.0
    atoms[1].set_masses(bad_mass)
    with pytest.raises(InvalidAtomsError, match=r"atoms \[13\] .* masses \[0\.0\] amu"):
        md.state_from_atoms(atoms)
    atoms = [cu_slab(), cu_slab()]
    momenta = np.zeros((12, 3))
    momenta[4, 2] = np.nan
    atoms[1].set_momenta(momenta, apply_constraint=False)
    with pytest.raises(InvalidAtomsError, match=r"momenta of atoms \[16\]"):
        md.state_from_atoms(atoms)


@pytest.mark.parametrize("integrator", [md.NVE(1.0), md.Langevin(1.0, 500.0), md.NoseHooverChain(1.0, 500.0)],
                         ids=["nve", "langevin", "nose-hoover"])
def test_step_leaves_its_input_alone_and_follows_new_masses_and_constraints(integrator):
    """The integrators derive constants from masses and FixAtoms once per batch
    (MDState.constants) and add the closing half-kick in place to their own momenta: the state a
    step starts from keeps every tensor it had, and a state given other masses or another FixAtoms
    mask by replace() moves exactly like one built with them from the start (no stale constants)."""
    potential = MorsePotential()
    atoms = thermal(cu_slab(), 500, seed=3)
    start = integrator.init(md.state_from_atoms([atoms]), potential)
    before = {k: getattr(start, k).clone() for k in ("positions", "momenta", "forces", "energy")}
    integrator.step(start, potential, torch.Generator().manual_seed(0))
    for k, v in before.items():
        assert torch.equal(getattr(start, k), v), k

    heavy = atoms.copy()
    heavy.set_masses(2.0 * atoms.get_masses())
    heavy.set_constraint(FixAtoms(indices=range(8)))  # cu_slab fixes fewer
    fresh = integrator.init(md.state_from_atoms([heavy]), potential)
    fixed = torch.as_tensor(md.fixed_mask(heavy))
    reused = integrator.init(start.replace(masses=2.0 * start.masses, fixed=fixed, forces=None,
                                           momenta=start.momenta.masked_fill(fixed.unsqueeze(1), 0.0)),
                             potential)
    assert reused.constants is not start.constants
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        fresh, reused = integrator.step(fresh, potential, g1), integrator.step(reused, potential, g2)
    assert torch.equal(fresh.positions, reused.positions) and torch.equal(fresh.momenta, reused.momenta)
    assert torch.equal(reused.positions[:8], start.positions[:8])  # the newly fixed atoms did not move
